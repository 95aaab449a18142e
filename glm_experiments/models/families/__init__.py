"""Model families: one module per family in this package, each ending with ``register(Family(...))``.

>>> family = get_family(cfg.model.family)       # the record: template, loader, tokenizer, checkpoint layout
>>> model, tokenizer = family.load(cfg.model, dtype, quantization_config)
>>> architecture_of(model).lora_targets          # what methods ask of the model class

Adding a family = its module here + ``conf/model/<name>.yaml``; nobody keeps a list of family names.
"""

from __future__ import annotations

from glm_experiments.discovery import import_modules
from glm_experiments.models.families.base import (
    GENERIC,
    REGISTRY,
    Architecture,
    Family,
    register,
)

__all__ = ["Architecture", "Family", "architecture_of", "family_names", "get_family", "register"]


def _discover() -> dict[str, Family]:
    import_modules(__name__, __path__)  # each registers its family: adding one needs no list edited here
    return REGISTRY


def family_names() -> list[str]:
    return sorted(_discover())


def get_family(name: str) -> Family:
    """The registered family ``name``; a UserError naming the setting and the choices otherwise."""
    from glm_experiments.errors import UserError

    families = _discover()
    if name not in families:
        raise UserError(f"model.family={name!r}: expected one of {', '.join(sorted(families))}")
    return families[name]


def architecture_of(model) -> Architecture:
    """The record of ``model``'s class, by ``config.model_type`` (any other transformers model: GENERIC)."""
    model_type = model.config.model_type
    for family in _discover().values():
        if family.architecture is not None and family.architecture.model_type == model_type:
            return family.architecture
    return GENERIC
