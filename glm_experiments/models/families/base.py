"""The records a model family declares (see the package docstring)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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
    # THUDM checkpoint layout (models/thudm_layouts.py): how config.json and the weight keys map onto the
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
