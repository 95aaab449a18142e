"""Fine-tuning methods: one module per method, each registering a ``Method`` record (see ``base``).

>>> from glm_experiments.methods import get_method, trainable_summary
>>> method = get_method(cfg.method.name)
>>> model = method.apply(model, cfg.method, tokenizer=tokenizer)
>>> trainable_summary(model)            # {'trainable': ..., 'total': ..., 'pct': ...}
>>> method.save(model, out_dir, cfg.method)
>>> model = method.load(fresh_base, out_dir, cfg.method)
"""

from __future__ import annotations

from glm_experiments.discovery import import_modules
from glm_experiments.errors import SettingError
from glm_experiments.methods.artifacts import read_method_json
from glm_experiments.methods.parameters import trainable_summary
from glm_experiments.methods.record import REGISTRY, Method

__all__ = ["Method", "get_method", "load_saved", "method_names", "method_schema", "trainable_summary"]


def _discover() -> dict[str, Method]:
    import_modules(__name__, __path__)  # each registers its method: adding one needs no list edited here
    return REGISTRY


def method_names() -> list[str]:
    return sorted(_discover())


def get_method(name: str) -> Method:
    """The registered method ``name``."""
    methods = _discover()
    if name not in methods:
        raise SettingError(f"unknown method {name!r}; choose one of: {', '.join(sorted(methods))}")
    return methods[name]


def method_schema(name: str | None) -> type | None:
    """The config dataclass of method ``name`` (None for a name no module registers)."""
    method = _discover().get(str(name))
    return method.schema if method else None


def load_saved(model, in_dir, cfg=None):
    """Load whatever method ``in_dir/method.json`` names onto a fresh base ``model``."""
    name = read_method_json(in_dir)["method"]
    return get_method(name).load(model, in_dir, cfg)
