"""THUDM's v2 checkpoint layout (ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B: config model_type "chatglm" with
``padded_vocab_size``), mapped onto transformers' native ``GlmForCausalLM``: query_key_value split by rows into
q/k/v, dense -> o_proj, dense_h_to_4h -> gate_up_proj, dense_4h_to_h -> down_proj, final_layernorm -> model.norm,
output_layer -> lm_head, rotary inv_freq dropped; rope_theta = 10000 * rope_ratio."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from glm_experiments.models.checkpoint_files import CheckpointError
from glm_experiments.models.layouts import Layout, ShapeError, _empty_model, is_v1_config

# the model class is imported where a model is built: reading the family records (every CLI start) stays light
if TYPE_CHECKING:
    from transformers import GlmConfig


def glm_config_from_thudm(cfg: dict) -> GlmConfig:
    """transformers' GlmConfig for a ChatGLM2/3/GLM-4 ``config.json`` dict (rope_ratio kept, unlike
    transformers' own conversion script)."""
    from transformers import GlmConfig

    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("kv_channels") or cfg["hidden_size"] // heads
    kv_heads = cfg.get("multi_query_group_num", heads) if cfg.get("multi_query_attention", False) else heads
    rope_theta = 10000.0 * float(cfg.get("rope_ratio") or 1)
    eos = cfg.get("eos_token_id", 2)
    return GlmConfig(
        vocab_size=cfg["padded_vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        attention_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
        max_position_embeddings=cfg.get("seq_length", 8192),
        rms_norm_eps=cfg.get("layernorm_epsilon", 1e-5),
        use_cache=cfg.get("use_cache", True),
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": 0.5},
        pad_token_id=cfg.get("pad_token_id", 0),
        eos_token_id=eos,
        attention_bias=bool(cfg.get("add_qkv_bias", False)),
    )


# ----------------------------------------------------------------------------------------------- key mapping

_V2_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")
_V2_LAYER_KEYS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_V2_TOP = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_V2_DROP = {"transformer.rotary_pos_emb.inv_freq"}


def map_v2_key(key: str, tensor_loader, config: GlmConfig, num_layers: int) -> list[tuple[str, torch.Tensor]] | None:
    """Native (key, tensor) pairs for one ChatGLM2/3/GLM-4 tensor; [] to drop it, None when unknown."""
    if key in _V2_DROP:
        return []
    if key in _V2_TOP:
        return [(_V2_TOP[key], tensor_loader())]
    match = _V2_LAYER.fullmatch(key)
    if not match or int(match.group(1)) >= num_layers:
        return None
    layer, rest = int(match.group(1)), match.group(2)
    prefix = f"model.layers.{layer}."
    if rest in _V2_LAYER_KEYS:
        return [(prefix + _V2_LAYER_KEYS[rest], tensor_loader())]
    if rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
        kind = rest.rsplit(".", 1)[1]
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        tensor = tensor_loader()
        if tensor.shape[0] != q + 2 * kv:
            raise ShapeError(f"{tuple(tensor.shape)}, expected {q + 2 * kv} rows (= Q {q} + K {kv} + V {kv})")
        return [
            (prefix + f"self_attn.q_proj.{kind}", tensor[:q]),
            (prefix + f"self_attn.k_proj.{kind}", tensor[q : q + kv]),
            (prefix + f"self_attn.v_proj.{kind}", tensor[q + kv :]),
        ]
    return None


_V2_SOURCE = {v: k for k, v in _V2_TOP.items()}


def _v2_source_key(target: str) -> str:
    """The THUDM key a native key comes from (for error messages)."""
    if target in _V2_SOURCE:
        return _V2_SOURCE[target]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", target)
    if m:
        rest = m.group(2)
        for src, dst in _V2_LAYER_KEYS.items():
            if dst == rest:
                return f"transformer.encoder.layers.{m.group(1)}.{src}"
        kind = rest.rsplit(".", 1)[1]
        return f"transformer.encoder.layers.{m.group(1)}.self_attention.query_key_value.{kind}"
    return target


def _check_v2(config_file: Path, cfg: dict) -> None:
    required = ["num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "padded_vocab_size"]
    missing = [k for k in required if k not in cfg]
    if missing:
        raise CheckpointError(f"{config_file}: missing key(s) {', '.join(missing)}")
    unsupported = {
        "rmsnorm": (False, "LayerNorm instead of RMSNorm"),
        "add_bias_linear": (True, "biases on dense/MLP layers"),
        "apply_residual_connection_post_layernorm": (True, "post-layernorm residuals"),
        "post_layer_norm": (False, "no final layernorm"),
    }
    for key, (bad, what) in unsupported.items():
        if cfg.get(key, not bad) == bad:
            raise CheckpointError(f"{config_file}: key {key}={bad} ({what}) is not supported by the native GLM class")
    if cfg.get("quantization_bit"):
        raise CheckpointError(f"{config_file}: key quantization_bit={cfg['quantization_bit']}: quantized THUDM checkpoints are not supported; use the fp16/bf16 release")
    if cfg.get("pre_seq_len"):
        raise CheckpointError(f"{config_file}: key pre_seq_len={cfg['pre_seq_len']}: a P-Tuning v2 checkpoint; load the base model and the prefix encoder separately")


def _build_v2(cfg: dict, dtype: torch.dtype, attn_implementation: str | None):
    from transformers import GlmForCausalLM

    config = glm_config_from_thudm(cfg)
    config.dtype = dtype
    model = _empty_model(GlmForCausalLM, config, attn_implementation)
    layers = config.num_hidden_layers
    return model, lambda key, load: map_v2_key(key, load, config, layers), _v2_source_key
V2 = Layout(
    "chatglm_v2",
    matches=lambda cfg: not is_v1_config(cfg),
    expects="ChatGLM2/3/GLM-4 config keys (padded_vocab_size, kv_channels, multi_query_group_num)",
    described_as="padded_vocab_size/kv_channels: a ChatGLM2/3 or GLM-4 checkpoint",
    check=_check_v2,
    build=_build_v2,
)
