"""DoRA (weight-decomposed LoRA, Liu et al. 2024) through PEFT's ``use_dora``.

Each adapted weight is split into a magnitude (one trained scalar per output row) and a direction that
LoRA's low-rank update changes. Same knobs, targets, save format and merge as ``lora``; PEFT records
``use_dora`` in adapter_config.json, so a saved DoRA adapter reloads as DoRA. Costs more compute per step
than LoRA (the weight norm is recomputed every forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from glm_experiments.methods import lora
from glm_experiments.methods.lora import LoraMethodConfig
from glm_experiments.methods.record import Method, register

NAME = "dora"


@dataclass
class DoraMethodConfig(LoraMethodConfig):
    """LoRA's settings; the decomposition itself has none."""


def apply(model: nn.Module, cfg: Any, tokenizer: Any = None) -> nn.Module:
    from peft import get_peft_model

    config = lora.lora_config(model, cfg)
    config.use_dora = True
    return get_peft_model(model, config)


def save(model: nn.Module, out_dir: Path, cfg: Any) -> None:
    lora.save(model, out_dir, cfg, name=NAME)


def load(model: nn.Module, in_dir: Path, cfg: Any = None, *, is_trainable: bool = False) -> nn.Module:
    return lora.load(model, in_dir, cfg, is_trainable=is_trainable, name=NAME)


METHOD = register(Method(NAME, DoraMethodConfig, apply, save, load, merge_into_base=lora.merge))
