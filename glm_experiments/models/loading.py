"""Build (model, tokenizer) for the chosen model config, whatever the family."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

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


def load_model_and_tokenizer(model_cfg, quantization_config=None):
    with _attention_errors_as_user_errors(model_cfg.attn_implementation):
        return _load(model_cfg, quantization_config)


def _load(model_cfg, quantization_config):
    dtype = resolve_dtype(model_cfg.dtype)
    family = model_cfg.family
    if family == "tiny":
        from glm_experiments.models.tiny import ensure_tiny_checkpoint

        tiny_cfg = OmegaConf.to_object(model_cfg.tiny) if isinstance(model_cfg.tiny, DictConfig) else model_cfg.tiny
        path = ensure_tiny_checkpoint(tiny_cfg)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=model_cfg.attn_implementation, quantization_config=quantization_config
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
    elif family in ("chatglm", "chatglm2", "chatglm3", "glm4", "hf"):
        if not model_cfg.path or not Path(model_cfg.path).is_dir():
            raise UserError(f"model={model_cfg.name} needs model.path=<checkpoint directory>; got {model_cfg.path!r}")
        from glm_experiments.models.thudm import load_checkpoint

        extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
        model, tokenizer = load_checkpoint(model_cfg.path, family, dtype, cached=model_cfg.cache_conversion,
                                           attn_implementation=model_cfg.attn_implementation, **extra)
    else:
        raise UserError(f"model.family={family!r}: expected tiny, chatglm, chatglm2, chatglm3, glm4 or hf")
    tokenizer.padding_side = "left"  # batched generation
    return model, tokenizer
