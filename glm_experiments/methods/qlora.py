"""QLoRA: LoRA (see ``lora``) on a bitsandbytes 4-bit (nf4/fp4, optional double quantisation) or 8-bit base.

The base must be *loaded* quantised: the model loader passes ``quantization_config(cfg)`` to
``from_pretrained``. ``apply`` then prepares it for k-bit training (PEFT) and adds the adapter.
Needs a CUDA GPU and bitsandbytes; ``check_available()`` says so at once otherwise.

The saved adapter is a plain LoRA adapter: ``load`` works on a quantised base (to continue or to
evaluate) and on an unquantised one; to merge, load the base *without* quantisation, ``load`` the
adapter and ``merge`` (merging into 4-bit weights would round them).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glm_experiments.config.schema import one_of
from glm_experiments.constants import TORCH_DTYPES
from glm_experiments.errors import SettingError, UserError
from glm_experiments.methods import lora
from glm_experiments.methods.artifacts import cfg_get
from glm_experiments.methods.record import Method, register, unwrap_peft


@dataclass
class QloraMethodConfig(lora.LoraMethodConfig):
    bits: int = one_of(4, 4, 8)
    quant_type: str = one_of("nf4", "nf4", "fp4")
    double_quant: bool = True
    compute_dtype: str = one_of("bfloat16", "bfloat16", "float16", "float32")


NAME = "qlora"
DEFAULTS = QloraMethodConfig()  # the schema owns every default
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = TORCH_DTYPES


def _bitsandbytes_importable() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _cuda_available() -> bool:
    return torch.cuda.is_available()


class QloraUnavailable(UserError, RuntimeError):
    """No CUDA or no bitsandbytes: the user's to fix (one line), not a bug."""


def _unavailable(reason: str) -> QloraUnavailable:
    return QloraUnavailable(
        f"method=qlora needs a CUDA GPU and bitsandbytes: {reason}. "
        "Use method=lora on this machine, or run on a CUDA machine with `pip install bitsandbytes`."
    )


def check_available() -> None:
    """Raise a clear QloraUnavailable (a RuntimeError) unless CUDA and bitsandbytes are both there."""
    if not _cuda_available():
        raise _unavailable("torch.cuda.is_available() is False")
    if not _bitsandbytes_importable():
        raise _unavailable("bitsandbytes is not installed")


def validate(cfg: Any) -> None:
    bits = int(cfg_get(cfg, "bits", DEFAULTS.bits))
    if bits not in (4, 8):
        raise SettingError(f"method=qlora: bits must be 4 or 8, got {bits}")
    quant_type = str(cfg_get(cfg, "quant_type", DEFAULTS.quant_type))
    if bits == 4 and quant_type not in QUANT_TYPES:
        raise SettingError(f"method=qlora: quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    compute_dtype = str(cfg_get(cfg, "compute_dtype", DEFAULTS.compute_dtype))
    if compute_dtype not in COMPUTE_DTYPES:
        raise SettingError(f"method=qlora: compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {compute_dtype!r}")


def quantization_config(cfg: Any):
    """The ``BitsAndBytesConfig`` to load the base with (needs bitsandbytes importable)."""
    from transformers import BitsAndBytesConfig

    validate(cfg)
    if not _bitsandbytes_importable():
        raise _unavailable("bitsandbytes is not installed")
    if int(cfg_get(cfg, "bits", DEFAULTS.bits)) == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=str(cfg_get(cfg, "quant_type", DEFAULTS.quant_type)),
        bnb_4bit_use_double_quant=bool(cfg_get(cfg, "double_quant", DEFAULTS.double_quant)),
        bnb_4bit_compute_dtype=COMPUTE_DTYPES[str(cfg_get(cfg, "compute_dtype", DEFAULTS.compute_dtype))],
    )


def is_quantized(model: nn.Module) -> bool:
    return bool(
        getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or getattr(getattr(model, "config", None), "quantization_config", None) is not None
    )


def apply(model: nn.Module, cfg: Any, tokenizer: Any = None) -> nn.Module:
    validate(cfg)
    check_available()
    if not is_quantized(model):
        raise ValueError(
            "method=qlora: the base model is not quantised; load it with "
            "from_pretrained(..., quantization_config=qlora.quantization_config(cfg))"
        )
    from peft import prepare_model_for_kbit_training

    # gradient checkpointing stays the trainer's decision (train.gradient_checkpointing)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return lora.apply(model, cfg)


def _settings_extra(cfg: Any) -> dict:
    return {
        "bits": int(cfg_get(cfg, "bits", DEFAULTS.bits)),
        "quant_type": str(cfg_get(cfg, "quant_type", DEFAULTS.quant_type)),
        "double_quant": bool(cfg_get(cfg, "double_quant", DEFAULTS.double_quant)),
        "compute_dtype": str(cfg_get(cfg, "compute_dtype", DEFAULTS.compute_dtype)),
    }


def save(model: nn.Module, out_dir: Path, cfg: Any) -> None:
    lora.save(model, out_dir, cfg, name=NAME)
    # record the quantisation the adapter was trained against
    import json

    path = Path(out_dir) / "method.json"
    payload = json.loads(path.read_text(encoding="utf-8"))
    if cfg is not None:
        payload["settings"].update(_settings_extra(cfg))
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load(model: nn.Module, in_dir: Path, cfg: Any = None, *, is_trainable: bool = False) -> nn.Module:
    return lora.load(model, in_dir, cfg, is_trainable=is_trainable, name=NAME)


def merge(model: nn.Module) -> nn.Module:
    base = unwrap_peft(model)
    if is_quantized(base):
        raise SettingError(
            "method=qlora: refusing to merge into a quantised base (the merged weights would be re-rounded). "
            "Load the base without quantization_config, qlora.load(base, adapter_dir) and merge that."
        )
    return lora.merge(model)


METHOD = register(
    Method(NAME, QloraMethodConfig, apply, save, load, merge_into_base=merge,
           quantization_config=quantization_config, check_available=check_available)
)
