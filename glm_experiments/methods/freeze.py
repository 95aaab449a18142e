"""Freeze: train only the last ``num_last_layers`` transformer layers, or exactly the parameters whose
name contains one of ``trainable_patterns`` (the seeds' ``layers.27.,layers.26.,...``).

Saved: ``trainable.safetensors`` (only the trainable tensors, by parameter name) + ``method.json``
(settings and the list of trainable names). ``load`` re-freezes a fresh base the same way and
overwrites those tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from glm_experiments.config.ranges import AT_LEAST_1, ranged
from glm_experiments.config.schema import MethodConfig
from glm_experiments.errors import SettingError, UserError
from glm_experiments.methods.artifacts import cfg_get, check_settings, load_safetensors, read_method_json
from glm_experiments.methods.artifacts import save_safetensors, write_method_json
from glm_experiments.methods.parameters import model_dims, trainable_state_dict
from glm_experiments.methods.record import Method, register


@dataclass
class FreezeMethodConfig(MethodConfig):
    # train the last N transformer layers ...
    num_last_layers: int = ranged(2, **AT_LEAST_1)
    # ... or, if given, exactly the parameters whose name contains one of these
    trainable_patterns: list[str] = field(default_factory=list)


NAME = "freeze"
DEFAULTS = FreezeMethodConfig()  # the schema owns every default
WEIGHTS_FILE = "trainable.safetensors"


def trainable_names(model: nn.Module, cfg: Any) -> list[str]:
    """Names of the parameters the method trains, in ``named_parameters()`` order."""
    patterns = list(cfg_get(cfg, "trainable_patterns", None) or [])
    names = [n for n, _ in model.named_parameters()]
    if patterns:
        chosen = [n for n in names if any(p in n for p in patterns)]
        if not chosen:
            raise SettingError(
                f"method.trainable_patterns={patterns}: no parameter name contains any of them "
                f"(names look like {names[:3]} ... {names[-2:]})"
            )
        return chosen
    num_layers = model_dims(model)[0]
    n_last = int(cfg_get(cfg, "num_last_layers", DEFAULTS.num_last_layers))
    if not 1 <= n_last <= num_layers:
        raise SettingError(f"method.num_last_layers={n_last}: must be in [1, {num_layers}] (the model's layers)")
    indices = "|".join(str(i) for i in range(num_layers - n_last, num_layers))
    regex = re.compile(rf"(^|\.)layers\.({indices})\.")
    chosen = [n for n in names if regex.search(n)]
    if not chosen:
        raise SettingError(f"method=freeze: no parameter matches layers.{{{indices}}}. (names look like {names[:3]})")
    return chosen


def full_precision_modules(cfg: Any, num_layers: int) -> list[str]:
    """On a quantized base (model.quantization) the layers freeze trains are loaded unquantized: transformers'
    ``llm_int8_skip_modules`` patterns for them (a regex matched from the start of a module name up to a ``.``)."""
    patterns = list(cfg_get(cfg, "trainable_patterns", None) or [])
    if patterns:  # "contains": a parameter name's pattern, less a trailing "." or ".weight"/".bias"
        return [".*" + re.escape(re.sub(r"(\.(weight|bias))?\.?$", "", p)) for p in patterns]
    n_last = int(cfg_get(cfg, "num_last_layers", DEFAULTS.num_last_layers))
    indices = "|".join(str(i) for i in range(max(num_layers - n_last, 0), num_layers))
    return [rf".*layers\.({indices})"]


def apply(model: nn.Module, cfg: Any, tokenizer: Any = None) -> nn.Module:
    chosen = set(trainable_names(model, cfg))
    for name, p in model.named_parameters():
        if name in chosen and not p.is_floating_point():  # a bitsandbytes 4/8-bit weight
            raise UserError(f"method=freeze: {name} is quantized (model.quantization) and cannot train; "
                            "method.trainable_patterns must name whole modules, e.g. 'layers.27.'")
        p.requires_grad_(name in chosen)
    return model


def _settings(cfg: Any) -> dict:
    return {
        "num_last_layers": int(cfg_get(cfg, "num_last_layers", DEFAULTS.num_last_layers)),
        "trainable_patterns": list(cfg_get(cfg, "trainable_patterns", None) or []),
    }


def save(model: nn.Module, out_dir: Path, cfg: Any) -> None:
    out_dir = Path(out_dir)
    tensors = trainable_state_dict(model)
    save_safetensors(tensors, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    write_method_json(out_dir, NAME, _settings(cfg), trainable_parameters=sorted(tensors))


def load(model: nn.Module, in_dir: Path, cfg: Any = None) -> nn.Module:
    in_dir = Path(in_dir)
    payload = read_method_json(in_dir, NAME)
    saved = payload["settings"]
    patterns = saved.get("trainable_patterns") or []
    check_settings(NAME, saved, cfg, ["trainable_patterns"] + ([] if patterns else ["num_last_layers"]), where=str(in_dir))
    apply(model, saved)
    tensors = load_safetensors(in_dir / WEIGHTS_FILE)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise SettingError(f"method=freeze: {in_dir} does not fit this model (unexpected {extra[:5]}, missing {missing[:5]})")
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        p = params[name]
        if p.shape != value.shape:
            raise SettingError(f"method=freeze: {name} has shape {tuple(p.shape)} in the model, {tuple(value.shape)} in {in_dir}")
        p.data.copy_(value.to(device=p.device, dtype=p.dtype))
    return model


def merge(model: nn.Module) -> nn.Module:
    """``load`` already put the trained layers into the base: it is the merged model."""
    return model


METHOD = register(Method(NAME, FreezeMethodConfig, apply, save, load, merge_into_base=merge,
                         full_precision_modules=full_precision_modules))
