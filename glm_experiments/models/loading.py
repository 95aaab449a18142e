"""Build (model, tokenizer) for the chosen model config, whatever the family."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from glm_experiments.constants import TORCH_DTYPES
from glm_experiments.errors import UserError
from glm_experiments.models.family import get_family

log = logging.getLogger(__name__)


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in TORCH_DTYPES:
        raise UserError(f"model.dtype={name!r}: expected one of auto, {', '.join(TORCH_DTYPES)}")
    if name == "float16":
        warnings.warn(
            "model.dtype=float16: GLM-4 and P-Tuning v2 are known to produce NaN losses in fp16; prefer bfloat16",
            stacklevel=2,
        )
    return TORCH_DTYPES[name]


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
    get_family(model_cfg.family)
    path = checkpoint_dir(model_cfg)
    from glm_experiments.models.checkpoint_files import read_config

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


def checkpoint_dir(model_cfg) -> Path:
    if not model_cfg.path or not Path(model_cfg.path).expanduser().is_dir():
        raise UserError(f"model={model_cfg.name} needs model.path=<checkpoint directory>; got {model_cfg.path!r}")
    return Path(model_cfg.path).expanduser()


def load_model_and_tokenizer(model_cfg, quantization_config=None):
    """(model, tokenizer) as ``model.family``'s record loads them; padding on the left for batched generation."""
    family = get_family(model_cfg.family)
    with _attention_errors_as_user_errors(model_cfg.attn_implementation):
        model, tokenizer = family.load(model_cfg, resolve_dtype(model_cfg.dtype), quantization_config)
    tokenizer.padding_side = "left"
    return model, tokenizer


def template_for(model_cfg):
    """The chat template of a model config: model.template, else its family's own."""
    from glm_experiments.data.templates import get_template

    name = get_family(model_cfg.family).template_name(model_cfg)
    try:
        return get_template(name)
    except ValueError as exc:
        raise UserError(f"model.template={name}: {exc}") from None
