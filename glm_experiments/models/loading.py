"""Build (model, tokenizer) for the chosen model config, whatever the family."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from glm_experiments.errors import UserError

log = logging.getLogger(__name__)


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise UserError(f"model.dtype={name!r}: expected one of auto, {', '.join(dtypes)}")
    if name == "float16":
        warnings.warn(
            "model.dtype=float16: GLM-4 and P-Tuning v2 are known to produce NaN losses in fp16; prefer bfloat16",
            stacklevel=2,
        )
    return dtypes[name]


@contextmanager
def _attention_errors_as_user_errors(attn_implementation: str):
    """transformers refuses an unknown or unavailable attention kernel deep inside from_pretrained; say which
    setting it was, in one line."""
    try:
        yield
    except (ImportError, ValueError) as exc:
        message = str(exc)
        if "attn_implementation" not in message and "FlashAttention" not in message:
            raise
        first = message.strip().splitlines()[0]
        raise UserError(f"model.attn_implementation={attn_implementation}: {first} (sdpa, the default, works everywhere)") from None


def max_positions(model_cfg) -> tuple[int, str]:
    """The model's position limit and where it is set, from its config alone (no weights are read)."""
    if model_cfg.family == "tiny":
        return model_cfg.tiny.max_position_embeddings, "model.tiny.max_position_embeddings"
    _check_family(model_cfg.family)
    path = _checkpoint_dir(model_cfg)
    from glm_experiments.models.thudm import read_config

    config = read_config(path)
    # native (transformers) configs, ChatGLM2/3 and GLM-4, ChatGLM-6B: as glm_config_from_thudm / ChatGLMv1Config map them
    for key in ("max_position_embeddings", "seq_length", "max_sequence_length"):
        if isinstance(config.get(key), int):
            return config[key], f"{key} in {path / 'config.json'}"
    raise UserError(f"{path / 'config.json'}: no max_position_embeddings, seq_length or max_sequence_length key")


def check_lengths(cfg) -> None:
    """Training rows (source + target) and generation (source + new tokens) must fit the model's positions;
    prompt tuning's virtual tokens take positions too. Read right after config.json, before any weight."""
    limit, where = max_positions(cfg.model)
    virtual = cfg.method.num_virtual_tokens if cfg.method.name == "prompt_tuning" else 0
    extra = f" + method.num_virtual_tokens {virtual}" if virtual else ""
    d = cfg.data
    for second, value in (("data.max_target_length", d.max_target_length), ("eval.max_new_tokens", cfg.eval.max_new_tokens)):
        total = d.max_source_length + value + virtual
        if total > limit:
            raise UserError(f"data.max_source_length {d.max_source_length} + {second} {value}{extra} = {total} exceeds "
                            f"the model's {limit} positions ({where})")


FAMILIES = ("tiny", "chatglm", "chatglm2", "chatglm3", "glm4", "hf")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise UserError(f"model.family={family!r}: expected tiny, chatglm, chatglm2, chatglm3, glm4 or hf")


def _checkpoint_dir(model_cfg) -> Path:
    if not model_cfg.path or not Path(model_cfg.path).expanduser().is_dir():
        raise UserError(f"model={model_cfg.name} needs model.path=<checkpoint directory>; got {model_cfg.path!r}")
    return Path(model_cfg.path).expanduser()


def load_model_and_tokenizer(model_cfg, quantization_config=None):
    with _attention_errors_as_user_errors(model_cfg.attn_implementation):
        return _load(model_cfg, quantization_config)


def _load(model_cfg, quantization_config):
    dtype = resolve_dtype(model_cfg.dtype)
    family = model_cfg.family
    if family == "tiny":
        from glm_experiments.models.tiny import ensure_tiny_checkpoint

        tiny_cfg = OmegaConf.to_object(model_cfg.tiny) if isinstance(model_cfg.tiny, DictConfig) else model_cfg.tiny
        from glm_experiments.models.thudm import from_pretrained_strict

        path = ensure_tiny_checkpoint(tiny_cfg)
        model = from_pretrained_strict(
            path, dtype=dtype, attn_implementation=model_cfg.attn_implementation, quantization_config=quantization_config
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
    elif family in ("chatglm", "chatglm2", "chatglm3", "glm4", "hf"):
        _checkpoint_dir(model_cfg)
        from glm_experiments.models.thudm import load_checkpoint

        extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
        model, tokenizer = load_checkpoint(model_cfg.path, family, dtype, cached=model_cfg.cache_conversion,
                                           attn_implementation=model_cfg.attn_implementation, **extra)
    else:
        _check_family(family)
    tokenizer.padding_side = "left"  # batched generation
    return model, tokenizer
