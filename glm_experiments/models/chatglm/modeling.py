"""ChatGLM-6B (v1) as a transformers ``PreTrainedModel``, without ``trust_remote_code``.

The parameter names are THUDM's own, so a ChatGLM-6B state dict loads as it is
(``transformer.word_embeddings.weight``, ``transformer.layers.N.attention.query_key_value.weight``, ...,
``lm_head.weight``). The architecture follows the original ``modeling_chatglm.py``:

* LayerNorm (with bias) before attention and MLP; residual ``alpha * x_norm + f(x_norm)``,
  ``alpha = sqrt(2 * 28)`` for every depth: the original builds ``GLMBlock`` without passing ``num_layers``,
  whose default is 28, so a pruned or test checkpoint with fewer layers still uses sqrt(56);
  GeLU (tanh approximation) MLP; biases everywhere.
* qkv laid out per head: the projection's output is viewed as (heads, 3 * head_dim) and split in q, k, v.
* 2D RoPE: the first half of each head's dims rotates with the position ids, the second half with the block
  position ids (rotate-half style within each half); ``inv_freq`` rounded to fp16 as the original computes it.
  Positions: the context counts 0, 1, ...; every token from ``<sop>`` on keeps the position of the
  [gMASK] (or [MASK]) token; block positions are 0 over the context and 1, 2, ... from ``<sop>`` on.
* The context (the tokens before ``<sop>``) is attended bidirectionally, the rest causally.
* Attention scores are computed like the original (query scaled by 1/(sqrt(d) * (layer+1)), softmax in fp32
  after multiplying the coefficient back, masked scores -10000), so fp16 behaves like the original too.

Differences from the original, on purpose: cos/sin are computed in fp32 and then cast (the original computes
them in the model dtype when the model is in fp16); padding is read from the 2D ``attention_mask`` (left
padding as the original tokenizer produced) instead of a 4D boolean mask.

Importing this module registers ``model_type="chatglm_v1"`` with AutoConfig / AutoModelForCausalLM, so a
converted directory loads with ``AutoModelForCausalLM.from_pretrained`` once ``glm_experiments.models`` is
imported.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from glm_experiments.compat import CACHE, pop_cache

# GLMBlock's num_layers default in the original modeling_chatglm.py; ChatGLMModel never passes its own
# config.num_layers, so the residual scale is sqrt(2 * 28) whatever the checkpoint's depth
ORIGINAL_BLOCK_NUM_LAYERS = 28


class ChatGLMv1Config(PretrainedConfig):
    """Configuration of ChatGLM-6B; defaults are the released model's. THUDM config names are mapped by
    :func:`from_thudm` (num_layers, inner_hidden_size, layernorm_epsilon, max_sequence_length)."""

    model_type = "chatglm_v1"
    keys_to_ignore_at_inference = [CACHE]

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_hidden_layers: int = 28
    num_attention_heads: int = 32
    intermediate_size: int = 16384
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    bos_token_id: int | None = 130004
    eos_token_id: int | list[int] | None = 130005
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    pad_token_id: int | None = 3
    use_cache: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    @classmethod
    def from_thudm(cls, cfg: dict) -> "ChatGLMv1Config":
        """Build from the dict of a THUDM ChatGLM-6B ``config.json``."""
        eos = cfg.get("eos_token_id", 130005)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_hidden_layers=cfg["num_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            intermediate_size=cfg.get("inner_hidden_size") or 4 * cfg["hidden_size"],
            layer_norm_eps=cfg.get("layernorm_epsilon", 1e-5),
            max_position_embeddings=cfg.get("max_sequence_length", 2048),
            bos_token_id=cfg.get("bos_token_id", 130004),
            eos_token_id=eos,
            mask_token_id=cfg.get("mask_token_id", 130000),
            gmask_token_id=cfg.get("gmask_token_id", 130001),
            pad_token_id=cfg.get("pad_token_id", 3),
            use_cache=cfg.get("use_cache", True),
            tie_word_embeddings=False,
        )


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The original's ``gelu_impl`` (OpenAI's tanh approximation)."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class ChatGLMv1Rotary(nn.Module):
    """RoPE over ``dim`` = head_dim / 2 channels (one of the two 2D halves)."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim, self.base = dim, base
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))
        return inv_freq.half().float()  # the original keeps inv_freq in fp16 (precision=torch.half)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.float().to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class ChatGLMv1Attention(nn.Module):
    def __init__(self, config: ChatGLMv1Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, hidden_states, rope, allowed, past_key_values=None):
        bsz, q_len, _ = hidden_states.shape
        mixed = self.query_key_value(hidden_states).view(bsz, q_len, self.num_heads, 3 * self.head_dim)
        query, key, value = mixed.split(self.head_dim, dim=-1)
        (cos1, sin1), (cos2, sin2) = rope  # each (bsz, q_len, head_dim / 2)
        cos1, sin1, cos2, sin2 = (t.unsqueeze(2) for t in (cos1, sin1, cos2, sin2))
        q1, q2 = query.chunk(2, dim=-1)
        k1, k2 = key.chunk(2, dim=-1)
        q1, k1 = q1 * cos1 + rotate_half(q1) * sin1, k1 * cos1 + rotate_half(k1) * sin1
        q2, k2 = q2 * cos2 + rotate_half(q2) * sin2, k2 * cos2 + rotate_half(k2) * sin2
        query = torch.cat([q1, q2], dim=-1).transpose(1, 2)  # (bsz, heads, q_len, head_dim)
        key = torch.cat([k1, k2], dim=-1).transpose(1, 2)
        value = value.transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)

        coeff = float(self.layer_idx + 1)
        query = query / (math.sqrt(self.head_dim) * coeff)
        scores = torch.matmul(query, key.transpose(-1, -2))
        scores = scores.masked_fill(~allowed, -10000.0)
        probs = F.softmax(scores.float() * coeff, dim=-1).to(value.dtype)
        out = torch.matmul(probs, value).transpose(1, 2).reshape(bsz, q_len, -1)
        return self.dense(out)


class ChatGLMv1MLP(nn.Module):
    def __init__(self, config: ChatGLMv1Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x):
        return self.dense_4h_to_h(gelu_tanh(self.dense_h_to_4h(x)))


class ChatGLMv1Block(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLMv1Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ChatGLMv1Attention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ChatGLMv1MLP(config)
        self.alpha = (2 * ORIGINAL_BLOCK_NUM_LAYERS) ** 0.5

    def forward(self, hidden_states, rope=None, allowed=None, past_key_values=None, use_cache=False):
        attn_input = self.input_layernorm(hidden_states)
        hidden_states = attn_input * self.alpha + self.attention(attn_input, rope, allowed, past_key_values)
        mlp_input = self.post_attention_layernorm(hidden_states)
        return mlp_input * self.alpha + self.mlp(mlp_input)


def chatglm_v1_positions(
    input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, config: ChatGLMv1Config
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """2D position ids (bsz, 2, seq) and the index of ``<sop>`` per row (seq when absent).

    Pad tokens (attention_mask 0) do not count, so left padding gives the same positions as no padding.
    """
    bsz, seq = input_ids.shape
    device = input_ids.device
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask[:, -seq:].bool()
    counted = (valid.long().cumsum(-1) - 1).clamp(min=0)
    position_ids = counted.clone()
    block_ids = torch.zeros_like(counted)
    sop_index = torch.full((bsz,), seq, dtype=torch.long, device=device)
    ids = input_ids.tolist()
    valid_rows = valid.tolist()
    for row in range(bsz):
        row_ids = [t if v else None for t, v in zip(ids[row], valid_rows[row])]
        if config.bos_token_id in row_ids:
            sop = row_ids.index(config.bos_token_id)
            sop_index[row] = sop
            mask_token = config.gmask_token_id if config.gmask_token_id in row_ids else config.mask_token_id
            if mask_token in row_ids:
                position_ids[row, sop:] = counted[row, row_ids.index(mask_token)]
            block_ids[row, sop:] = counted[row, sop:] - counted[row, sop] + 1
    return torch.stack([position_ids, block_ids], dim=1), sop_index


class ChatGLMv1PreTrainedModel(PreTrainedModel):
    config_class = ChatGLMv1Config
    config: ChatGLMv1Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ChatGLMv1Block"]
    _skip_keys_device_placement = [CACHE]
    _supports_sdpa = False
    _supports_flash_attn = False

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, ChatGLMv1Rotary):
            module.inv_freq.copy_(module.compute_inv_freq())


class ChatGLMv1Model(ChatGLMv1PreTrainedModel):
    """The ``transformer`` part: word embeddings, blocks, final LayerNorm."""

    def __init__(self, config: ChatGLMv1Config):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([ChatGLMv1Block(config, i) for i in range(config.num_hidden_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary = ChatGLMv1Rotary(head_dim // 2, base=config.rope_theta)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        past_key_values = pop_cache(kwargs, past_key_values)
        if input_ids is None:
            raise ValueError(
                "ChatGLM-6B needs input_ids: its positions and attention mask depend on where [gMASK] and <sop> are"
                " (inputs_embeds alone, as PEFT prompt tuning passes them, are not supported for this family)"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        bsz, q_len = input_ids.shape
        device = input_ids.device
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask must be 2D (batch, past + new tokens) with 1 = token, 0 = padding")

        # which keys each query may see: padding never; the context (before <sop>) always; the rest causally.
        # A 2D mask shorter than past + new tokens (e.g. P-Tuning v2 prefixes in the cache) leaves the past visible.
        total = past_len + q_len
        if attention_mask is None:
            key_valid = torch.ones(bsz, total, dtype=torch.bool, device=device)
        else:
            key_valid = attention_mask[:, -total:].bool()
            if key_valid.shape[1] < total:
                key_valid = torch.cat(
                    [torch.ones(bsz, total - key_valid.shape[1], dtype=torch.bool, device=device), key_valid], dim=1
                )
        chunk_mask = key_valid[:, past_len:]
        # without explicit position_ids the new tokens are taken as the whole sequence (a prefix in the cache,
        # as P-Tuning v2 puts there, has no position); generate() passes position_ids built from all tokens
        computed, sop_index = chatglm_v1_positions(input_ids, chunk_mask, self.config)
        if position_ids is None:
            position_ids = computed
        has_sop = sop_index < q_len
        context_end = torch.where(has_sop, sop_index + past_len, torch.full_like(sop_index, q_len if not past_len else 0))
        q_pos = torch.arange(past_len, past_len + q_len, device=device)
        k_pos = torch.arange(past_len + q_len, device=device)
        allowed = (k_pos[None, None, :] <= q_pos[None, :, None]) | (k_pos[None, None, :] < context_end[:, None, None])
        allowed = (allowed & key_valid[:, None, :]).unsqueeze(1)  # (bsz, 1, q, k)

        hidden_states = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        dtype = hidden_states.dtype
        rope = (self.rotary(position_ids[:, 0], dtype), self.rotary(position_ids[:, 1], dtype))
        for layer in self.layers:
            hidden_states = layer(
                hidden_states, rope=rope, allowed=allowed, past_key_values=past_key_values, use_cache=use_cache
            )
        hidden_states = self.final_layernorm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE: past_key_values if use_cache else None})


class ChatGLMv1ForCausalLM(ChatGLMv1PreTrainedModel, GenerationMixin):
    def __init__(self, config: ChatGLMv1Config):
        super().__init__(config)
        self.transformer = ChatGLMv1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        past_key_values = pop_cache(kwargs, past_key_values)
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: getattr(outputs, CACHE)})

    def prepare_inputs_for_generation(
        self,
        input_ids,
        next_sequence_length=None,
        past_key_values=None,
        attention_mask=None,
        inputs_embeds=None,
        use_cache=True,
        **kwargs,
    ):
        past_key_values = pop_cache(kwargs, past_key_values)
        # 2D positions need the whole sequence ([gMASK] and <sop> may lie in the part already in the cache)
        position_ids, _ = chatglm_v1_positions(input_ids, attention_mask, self.config)
        if next_sequence_length is None and past_key_values is not None and past_key_values.get_seq_length():
            next_sequence_length = input_ids.shape[1] - past_key_values.get_seq_length()
        if next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
            position_ids = position_ids[:, :, -next_sequence_length:]
        model_inputs = {
            "input_ids": input_ids.contiguous(),
            "position_ids": position_ids.contiguous(),
            CACHE: past_key_values,
            "attention_mask": attention_mask,
            "use_cache": use_cache,
        }
        if "logits_to_keep" in kwargs:
            model_inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return model_inputs


AutoConfig.register(ChatGLMv1Config.model_type, ChatGLMv1Config, exist_ok=True)
AutoModelForCausalLM.register(ChatGLMv1Config, ChatGLMv1ForCausalLM, exist_ok=True)
