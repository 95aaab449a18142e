"""The record of a THUDM checkpoint layout and what every layout shares: telling v1 (ChatGLM-6B) from v2
(ChatGLM2/3, GLM-4) configs, building a model on the meta device. Each layout is declared in its family's folder
(``models/chatglm/layout.py``: V1, ``models/glm/layout.py``: V2) and named by its Family record; models/thudm.py
streams the weights through the layout's ``build`` mapper."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


from glm_experiments.models.checkpoint_files import CheckpointError


def is_v1_config(cfg: dict) -> bool:
    """ChatGLM-6B's config (num_layers/inner_hidden_size/position_encoding_2d, no padded_vocab_size)."""
    return "padded_vocab_size" not in cfg and any(k in cfg for k in ("inner_hidden_size", "position_encoding_2d", "gmask_token_id"))


class ShapeError(Exception):
    pass


def _empty_model(model_cls, config, attn_implementation: str | None = None):
    from accelerate import init_empty_weights

    if attn_implementation:
        config._attn_implementation = attn_implementation
    with init_empty_weights(include_buffers=False):
        model = model_cls(config)
    return model


@dataclass(frozen=True)
class Layout:
    """One THUDM checkpoint layout."""

    name: str
    # does a config.json dict have this layout's keys?
    matches: Callable[[dict], bool]
    # what a family of this layout expects, and how another layout's config is described, in errors
    expects: str
    described_as: str
    # further checks of a config.json of this layout (config file, dict) -> None or CheckpointError
    check: Callable[[Path, dict], None]
    # (config dict, dtype, attn_implementation) -> (empty model on the meta device, key mapper, source-key namer)
    build: Callable[..., tuple]
    # the class has its own attention (model.attn_implementation does not apply)
    own_attention: bool = False

    def check_config(self, config_file: Path, cfg: dict, family: str, others: list[Layout]) -> None:
        if not self.matches(cfg):
            found = next((o.described_as for o in others if o is not self and o.matches(cfg)), "other keys")
            raise CheckpointError(f"{config_file}: family {family} expects {self.expects}; this config has {found}")
        self.check(config_file, cfg)
