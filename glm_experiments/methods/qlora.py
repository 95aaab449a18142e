"""QLoRA: LoRA (see ``lora``) on a bitsandbytes-quantized base, 4-bit NF4 unless ``model.quantization`` says otherwise.

The base is *loaded* quantized (``models/quantization.py`` builds the ``BitsAndBytesConfig`` from ``model.*``; this
method's record declares ``base_quantization="4bit"``); ``apply`` prepares it for k-bit training (PEFT) and adds the
adapter. Runs on CUDA and, with bitsandbytes >= 0.50, on the CPU.

The saved adapter is a plain LoRA adapter: ``load`` works on a quantized base (to continue or to
evaluate) and on an unquantized one; to merge, load the base *without* quantization, ``load`` the
adapter and ``merge`` (merging into 4-bit weights would round them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from glm_experiments.errors import SettingError
from glm_experiments.methods import lora
from glm_experiments.methods.record import Method, register, unwrap_peft
from glm_experiments.models.quantization import is_quantized


@dataclass
class QloraMethodConfig(lora.LoraMethodConfig):
    """LoRA on a quantized base: the quantization is the model's (model.quantization, 4bit when null;
    model.quant_type, model.double_quant, model.quant_compute_dtype)."""


NAME = "qlora"


def apply(model: nn.Module, cfg: Any, tokenizer: Any = None) -> nn.Module:
    if not is_quantized(model):
        raise ValueError(
            "method=qlora: the base model is not quantized; load it with from_pretrained(..., "
            "quantization_config=methods.quantized_base.quantization_config(cfg))"
        )
    from peft import prepare_model_for_kbit_training

    # gradient checkpointing stays the trainer's decision (train.gradient_checkpointing)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return lora.apply(model, cfg)


def save(model: nn.Module, out_dir: Path, cfg: Any) -> None:
    lora.save(model, out_dir, cfg, name=NAME)


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


METHOD = register(Method(NAME, QloraMethodConfig, apply, save, load, merge_into_base=merge, base_quantization="4bit"))
