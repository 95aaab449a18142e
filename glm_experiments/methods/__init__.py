"""Fine-tuning methods: one module per method, each with ``apply`` / ``save`` / ``load`` (see ``base``).

>>> from glm_experiments.methods import get_method, trainable_summary
>>> method = get_method(cfg.method.name)
>>> model = method.apply(model, cfg.method)
>>> trainable_summary(model)            # {'trainable': ..., 'total': ..., 'pct': ...}
>>> method.save(model, out_dir, cfg.method)
>>> model = method.load(fresh_base, out_dir, cfg.method)
"""

from __future__ import annotations

import importlib
from types import ModuleType

from glm_experiments.methods.base import read_method_json, trainable_summary

METHODS = ("freeze", "lora", "qlora", "ptuning", "prompt_tuning", "full")

__all__ = ["METHODS", "get_method", "load_saved", "trainable_summary"]


def get_method(name: str) -> ModuleType:
    """The module implementing method ``name`` (one of METHODS)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return importlib.import_module(f"glm_experiments.methods.{name}")


def load_saved(model, in_dir, cfg=None):
    """Load whatever method ``in_dir/method.json`` names onto a fresh base ``model``."""
    name = read_method_json(in_dir)["method"]
    return get_method(name).load(model, in_dir, cfg)
