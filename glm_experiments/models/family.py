"""Model families: one folder per family under models/ (``models/<name>/family.py`` ends with
``register(Family(...))``; its modeling, checkpoint layout and tokenizer sit beside it), and the records they declare.

>>> family = get_family(cfg.model.family)       # the record: template, loader, tokenizer, checkpoint layout
>>> model, tokenizer = family.load(cfg.model, dtype, quantization_config)
>>> architecture_of(model).lora_targets          # what methods ask of the model class

Adding a family = its folder + ``conf/model/<name>.yaml``; nobody keeps a list of family names.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from glm_experiments.errors import UserError


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the methods need to know of a model class (found by ``config.model_type``)."""

    model_type: str
    # LoRA's default target_modules (method.target_modules: [] = these)
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    # P-Tuning v2: (model, input_ids, attention_mask) -> position ids of the real tokens when a prefix sits in
    # the cache in front; None = count the attended tokens (rotary models)
    prefix_position_ids: Callable[..., Any] | None = None
    # why prompt tuning (a soft prompt before the embeddings) cannot work on this class; "" = it can
    no_soft_prompt_because: str = ""


# any other transformers decoder (family hf): q/k/v/o projections, positions from the attention mask
GENERIC = Architecture("*")


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: how its checkpoints load and how its conversations are written."""

    name: str
    # (model config, torch dtype, quantization_config or None) -> (model, tokenizer)
    load: Callable[..., tuple[Any, Any]]
    # the chat template (data/templates.py) used when model.template is null; None = model.template is required
    template: str | None = None
    # the model class its weights end up in; None = whatever the checkpoint's config.json names (family hf)
    architecture: Architecture | None = None
    # THUDM checkpoint layout (models/layouts.py: the record; models/<family>/layout.py: each layout): how config.json and the weight keys map onto the
    # architecture; None = the family loads transformers-format directories only
    layout: Any = None
    # directory -> fast tokenizer rebuilt from THUDM's tokenizer files (models/tokenizers.py); None = none
    tokenizer: Callable[..., Any] | None = None
    # a regex matching checkpoint names of this family (an adapter's base_model_name_or_path: "THUDM/chatglm2-6b")
    name_pattern: str = ""
    # families whose adapters fit this family's base as they are (same shapes and vocabulary)
    shares_weights_with: tuple[str, ...] = ()

    def template_name(self, model_cfg) -> str:
        """model.template, else the family's own."""
        name = model_cfg.template or self.template
        if not name:
            raise UserError(f"model.family={self.name} has no chat template of its own: set model.template (e.g. chatglm3)")
        return name


REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make ``family`` known to ``get_family``."""
    REGISTRY[family.name] = family
    return family


def _discover() -> dict[str, Family]:
    """Import ``models/<family>/family.py`` of every family folder: each registers its record, so adding a family
    needs no list edited here."""
    import glm_experiments.models as models

    for info in pkgutil.iter_modules(models.__path__):
        if info.ispkg and (Path(models.__path__[0]) / info.name / "family.py").is_file():
            importlib.import_module(f"glm_experiments.models.{info.name}.family")
    return REGISTRY


def family_names() -> list[str]:
    return sorted(_discover())


def get_family(name: str) -> Family:
    """The registered family ``name``; a UserError naming the setting and the choices otherwise."""
    families = _discover()
    if name not in families:
        raise UserError(f"model.family={name!r}: expected one of {', '.join(sorted(families))}")
    return families[name]


def thudm_layouts() -> list:
    """Every THUDM checkpoint layout a family declares (to name the layout a config.json really has)."""
    return list({id(f.layout): f.layout for f in _discover().values() if f.layout is not None}.values())


def architecture_of(model) -> Architecture:
    """The record of ``model``'s class, by ``config.model_type`` (any other transformers model: GENERIC)."""
    model_type = model.config.model_type
    for family in _discover().values():
        if family.architecture is not None and family.architecture.model_type == model_type:
            return family.architecture
    return GENERIC
