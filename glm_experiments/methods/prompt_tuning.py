"""Prompt tuning: a learned soft prompt of ``num_virtual_tokens`` vectors at the input embeddings only.

PEFT's PromptTuning ignores position ids, so a left-padded batch is positioned differently from the
same samples alone and batched greedy decoding changes; this small wrapper does it like
``ptuning`` instead (no model-class change):

* the soft prompt is the submodule ``model.soft_prompt`` (``SoftPrompt``); the base is frozen;
* ``model.forward`` is wrapped on the instance. On the first pass (no cache, or the empty cache
  ``generate`` makes) the soft prompt is put in front of the token embeddings, the 2D attention mask
  gets ``num_virtual_tokens`` leading ones and the labels ``-100``; the logits of the virtual
  positions are dropped again, so callers see one logit row per input token. Virtual tokens take
  positions ``0 .. V-1``, real tokens continue from ``V`` counting only attended tokens, so left
  padding does not move them. Later decoding steps only extend the mask and shift positions by V.

``init_text`` (optional) initialises the prompt from the embeddings of its tokens (repeated to fill
``num_virtual_tokens``); it needs the tokenizer: ``apply(model, cfg, tokenizer=tok)``. Without it
the prompt starts as the embeddings of randomly drawn vocabulary tokens.

Saved: ``soft_prompt.safetensors`` + ``method.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from glm_experiments.compat import CACHE, pop_cache
from glm_experiments.config.ranges import AT_LEAST_1, ranged
from glm_experiments.config.schema import MethodConfig
from glm_experiments.errors import SettingError
from glm_experiments.methods.artifacts import cfg_get, check_settings, load_safetensors, read_method_json
from glm_experiments.methods.artifacts import save_safetensors, write_method_json
from glm_experiments.methods.parameters import freeze_all, input_embeddings
from glm_experiments.methods.record import Method, register
from glm_experiments.methods.virtual_tokens import override_method, query_shape, real_position_ids, split_virtual_mask
from glm_experiments.models.family import architecture_of


@dataclass
class PromptTuningMethodConfig(MethodConfig):
    num_virtual_tokens: int = ranged(16, **AT_LEAST_1)
    # text whose embeddings initialise the soft prompt; empty = random
    init_text: str = ""


NAME = "prompt_tuning"
DEFAULTS = PromptTuningMethodConfig()  # the schema owns every default
PROMPT_ATTR = "soft_prompt"
WEIGHTS_FILE = "soft_prompt.safetensors"


class SoftPrompt(nn.Module):
    def __init__(self, num_virtual_tokens: int, hidden_size: int, init: torch.Tensor | None = None):
        super().__init__()
        if num_virtual_tokens <= 0:
            raise SettingError(f"method=prompt_tuning: num_virtual_tokens must be > 0, got {num_virtual_tokens}")
        self.num_virtual_tokens = int(num_virtual_tokens)
        self.embedding = nn.Embedding(self.num_virtual_tokens, hidden_size)
        if init is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(init)

    def forward(self, batch_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        x = self.embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)
        return x.to(dtype) if dtype is not None else x


def _prompt(model: nn.Module) -> SoftPrompt:
    sp = getattr(model, PROMPT_ATTR, None)
    if not isinstance(sp, SoftPrompt):
        raise ValueError(f"method=prompt_tuning has not been applied to this {type(model).__name__}")
    return sp


def _init_vectors(model: nn.Module, n: int, init_text: str, tokenizer: Any) -> torch.Tensor:
    weight = input_embeddings(model).weight
    if init_text:
        if tokenizer is None:
            raise ValueError("method=prompt_tuning: init_text needs the tokenizer: apply(model, cfg, tokenizer=tok)")
        ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise SettingError(f"method=prompt_tuning: init_text {init_text!r} tokenises to nothing")
        ids = (ids * (n // len(ids) + 1))[:n]
        index = torch.tensor(ids, device=weight.device)
    else:
        index = torch.randint(0, weight.shape[0], (n,), device=weight.device)
    return weight.detach()[index].float().clone()


def _forward(model: nn.Module, orig, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
             labels=None, **kwargs: Any):
    """The model's forward with the soft prompt in front of the embeddings (first pass) or in the cache."""
    past_key_values: Cache | None = pop_cache(kwargs)
    sp = _prompt(model)
    n_virtual = sp.num_virtual_tokens
    batch, q_len, device = query_shape(input_ids, inputs_embeds, NAME)
    seen = past_key_values.get_seq_length() if past_key_values is not None else 0
    first = seen == 0
    past_real = 0 if first else seen - n_virtual

    attention_mask, mask_real = split_virtual_mask(attention_mask, past_real, q_len, n_virtual, NAME)
    if position_ids is None:
        position_ids = real_position_ids(mask_real, q_len, past_real, batch, device)
    position_ids = position_ids + n_virtual

    if first:
        if inputs_embeds is None:
            inputs_embeds = input_embeddings(model)(input_ids)
        prompt = sp(batch, dtype=inputs_embeds.dtype)
        inputs_embeds = torch.cat([prompt, inputs_embeds], dim=1)
        input_ids = None
        virt_pos = torch.arange(n_virtual, device=device, dtype=position_ids.dtype).unsqueeze(0)
        position_ids = torch.cat([virt_pos.expand(position_ids.shape[0], -1), position_ids], dim=1)
        if labels is not None:
            pad = torch.full((labels.shape[0], n_virtual), -100, dtype=labels.dtype, device=labels.device)
            labels = torch.cat([pad, labels], dim=1)

    out = orig(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
               inputs_embeds=inputs_embeds, labels=labels, **{CACHE: past_key_values}, **kwargs)
    if first and isinstance(out, ModelOutput) and out.get("logits") is not None:
        logits = out["logits"]
        if logits.shape[1] == n_virtual + q_len:
            out["logits"] = logits[:, n_virtual:]
    return out


def apply(model: nn.Module, cfg: Any, tokenizer: Any = None, *, init: torch.Tensor | None = None) -> nn.Module:
    if isinstance(getattr(model, PROMPT_ATTR, None), nn.Module):
        raise ValueError(f"method=prompt_tuning is already applied to this {type(model).__name__}")
    refusal = architecture_of(model).no_soft_prompt_because
    if refusal:
        raise SettingError(f"method=prompt_tuning does not support {model.config.model_type}: {refusal}")
    n = int(cfg_get(cfg, "num_virtual_tokens", DEFAULTS.num_virtual_tokens))
    if n <= 0:
        raise SettingError(f"method=prompt_tuning: num_virtual_tokens must be > 0, got {n}")
    if init is None:
        init = _init_vectors(model, n, str(cfg_get(cfg, "init_text", DEFAULTS.init_text) or DEFAULTS.init_text), tokenizer)
    sp = SoftPrompt(n, init.shape[1], init=init).to(input_embeddings(model).weight.device)
    freeze_all(model)
    model.add_module(PROMPT_ATTR, sp)
    override_method(model, "forward", _forward)
    return model


def save(model: nn.Module, out_dir: Path, cfg: Any = None) -> None:
    sp = _prompt(model)
    out_dir = Path(out_dir)
    save_safetensors(sp.state_dict(), out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    write_method_json(
        out_dir,
        NAME,
        {
            "num_virtual_tokens": sp.num_virtual_tokens,
            "init_text": str(cfg_get(cfg, "init_text", DEFAULTS.init_text) or DEFAULTS.init_text),
            "hidden_size": sp.embedding.weight.shape[1],
        },
    )


def load(model: nn.Module, in_dir: Path, cfg: Any = None) -> nn.Module:
    in_dir = Path(in_dir)
    saved = read_method_json(in_dir, NAME)["settings"]
    check_settings(NAME, saved, cfg, ["num_virtual_tokens"], where=str(in_dir))
    hidden = input_embeddings(model).weight.shape[1]
    if saved.get("hidden_size") not in (None, hidden):
        raise SettingError(f"method=prompt_tuning: {in_dir} holds a prompt of width {saved['hidden_size']}, the model's is {hidden}")
    n = int(saved["num_virtual_tokens"])
    apply(model, {"num_virtual_tokens": n}, init=torch.zeros(n, hidden))
    _prompt(model).load_state_dict(load_safetensors(in_dir / WEIGHTS_FILE), strict=True)
    return model


METHOD = register(
    Method(
        NAME, PromptTuningMethodConfig, apply, save, load,
        not_mergeable_because="prompt tuning learns soft-prompt vectors placed before the input embeddings; they are "
        "inputs, not a change to any weight, so no plain checkpoint computes the same function",
        packable=False,  # one soft prompt per row: packed samples would share it
    )
)
