"""Full fine-tuning: every parameter trains; ``save`` is ``model.save_pretrained`` (+ ``method.json``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from glm_experiments.config.schema import MethodConfig
from glm_experiments.errors import MissingFileError, SettingError
from glm_experiments.methods.artifacts import load_safetensors, read_method_json, write_method_json
from glm_experiments.methods.record import Method, register


@dataclass
class FullMethodConfig(MethodConfig):
    pass


NAME = "full"


def apply(model: nn.Module, cfg: Any = None, tokenizer: Any = None) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save(model: nn.Module, out_dir: Path, cfg: Any = None) -> None:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    write_method_json(out_dir, NAME, {})


def _read_weights(in_dir: Path) -> dict:
    single = in_dir / "model.safetensors"
    if single.is_file():
        return load_safetensors(single)
    index = in_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict = {}
        for shard in shards:
            state.update(load_safetensors(in_dir / shard))
        return state
    raise MissingFileError(f"method=full: no model.safetensors(.index.json) in {in_dir}")


def load(model: nn.Module, in_dir: Path, cfg: Any = None) -> nn.Module:
    """Load a full checkpoint into ``model`` (same architecture) and make it trainable."""
    in_dir = Path(in_dir)
    read_method_json(in_dir, NAME)
    state = _read_weights(in_dir)
    result = model.load_state_dict(state, strict=False)
    tied = set()
    for names in (getattr(model, "_tied_weights_keys", None) or {},):
        tied |= set(names if not isinstance(names, dict) else names.keys())
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise SettingError(
            f"method=full: {in_dir} does not fit {type(model).__name__} "
            f"(missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]})"
        )
    if tied:
        model.tie_weights()
    return apply(model)


def merge(model: nn.Module) -> nn.Module:
    """A full fine-tune is already a plain model."""
    return model


METHOD = register(Method(NAME, FullMethodConfig, apply, save, load, merge_into_base=merge, saves_whole_model=True))
