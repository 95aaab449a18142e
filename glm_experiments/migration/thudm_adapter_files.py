"""What a THUDM/PEFT adapter directory holds and which base it fits: the shared half of the adapter
conversion (thudm_adapters.py describes the formats)."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glm_experiments.models.checkpoint_files import CheckpointError
from glm_experiments.models.family import family_names, get_family
from glm_experiments.models.glm.layout import glm_config_from_thudm
from glm_experiments.models.layouts import is_v1_config

log = logging.getLogger(__name__)

ADAPTER_CONVERTER_VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
THUDM_PREFIX_ENCODER = "transformer.prefix_encoder."

# ChatGLM2/3, GLM-4 module (under transformer.encoder.layers.N) -> native modules (under model.layers.N)
V2_MODULES = {
    "self_attention.query_key_value": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention.dense": ("self_attn.o_proj",),
    "mlp.dense_h_to_4h": ("mlp.gate_up_proj",),
    "mlp.dense_4h_to_h": ("mlp.down_proj",),
}
# ChatGLM-6B module names (under transformer.layers.N), kept by our v1 class
V1_MODULES = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
LAYER_KEY = re.compile(r"transformer\.(encoder\.layers|layers)\.(\d+)\.(.+)")


# ----------------------------------------------------------------------------------------------- model dims


@dataclass(frozen=True)
class BaseDims:
    """What an adapter must fit: ``layout`` "v2" (native GLM, fused THUDM names mapped) or "v1" (names kept)."""

    layout: str
    num_layers: int
    hidden: int
    q: int  # attention output width (heads * head_dim)
    kv: int  # kv_heads * head_dim
    ffn: int  # MLP inner width (v2: per half of gate_up)
    kv_heads: int
    head_dim: int

    def shapes(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a THUDM module name."""
        name = module.rsplit(".", 1)[-1]
        if self.layout == "v1":
            return {"query_key_value": (self.hidden, 3 * self.hidden), "dense": (self.hidden, self.hidden),
                    "dense_h_to_4h": (self.hidden, self.ffn), "dense_4h_to_h": (self.ffn, self.hidden)}[name]
        return {"query_key_value": (self.hidden, self.q + 2 * self.kv), "dense": (self.q, self.hidden),
                "dense_h_to_4h": (self.hidden, 2 * self.ffn), "dense_4h_to_h": (self.ffn, self.hidden)}[name]

    def key(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


def base_dims(config: Any) -> BaseDims:
    """Dims of a loaded model's config (``GlmConfig`` or ``ChatGLMv1Config``), or of a THUDM ``config.json`` dict."""
    if isinstance(config, dict):
        if is_v1_config(config):
            h, heads = config["hidden_size"], config["num_attention_heads"]
            return BaseDims("v1", config["num_layers"], h, h, h, config.get("inner_hidden_size") or 4 * h, heads, h // heads)
        config = glm_config_from_thudm(config)
    model_type = getattr(config, "model_type", None)
    if model_type == "chatglm_v1":
        h, heads = config.hidden_size, config.num_attention_heads
        return BaseDims("v1", config.num_hidden_layers, h, h, h, config.intermediate_size, heads, h // heads)
    if model_type != "glm":
        raise CheckpointError(f"THUDM adapters fit ChatGLM-6B (chatglm_v1) or native GLM models, not model_type {model_type!r}")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return BaseDims("v2", config.num_hidden_layers, config.hidden_size, heads * head_dim, kv_heads * head_dim,
                    config.intermediate_size, kv_heads, head_dim)


# ----------------------------------------------------------------------------------------------- reading


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def adapter_weights_file(directory: Path) -> Path:
    for name in ADAPTER_WEIGHTS:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{directory}: has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}")


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors or (weights-only) torch pickle file as a state dict."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise CheckpointError(f"{file}: cannot read weight file ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: not a state dict of tensors")
    return state


def adapter_kind(directory: str | os.PathLike) -> str:
    """"ours" (method.json), "lora" / "prefix_peft" (adapter_config.json), "prefix_thudm" (ptuning/main.py)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if (directory / "method.json").is_file():
        return "ours"
    if (directory / ADAPTER_CONFIG).is_file():
        cfg = read_json(directory / ADAPTER_CONFIG)
        peft_type = str(cfg.get("peft_type", "")).upper()
        if peft_type == "LORA":
            return "lora"
        if peft_type == "PREFIX_TUNING":
            return "prefix_peft"
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: key peft_type={cfg.get('peft_type')!r}: only LORA and"
                              " PREFIX_TUNING adapters can be converted")
    if (directory / "config.json").is_file():
        return "prefix_thudm"
    raise CheckpointError(f"{directory}: not a recognised adapter directory (no method.json, {ADAPTER_CONFIG},"
                          " or config.json + pytorch_model.bin of a P-Tuning v2 checkpoint)")


def _family_hint(text: Any) -> str | None:
    """The family whose name_pattern a checkpoint name (an adapter's base_model_name_or_path) matches."""
    for name in family_names():
        pattern = get_family(name).name_pattern
        if isinstance(text, str) and pattern and re.search(pattern, text, re.IGNORECASE):
            return name
    return None


def check_family_hint(file: Path, key: str, value: Any, family: str | None) -> None:
    hint = _family_hint(value)
    if family is None or not get_family(family).name_pattern or hint is None or hint == family:
        return
    if hint in get_family(family).shares_weights_with:
        # same shapes and vocabulary; a ChatGLM3 demo trained on a ChatGLM2 base (or the reverse) is the user's choice
        log.warning("%s: %s=%r names %s, converting for %s", file, key, value, hint, family)
        return
    raise CheckpointError(f"{file}: key {key}={value!r} is a {hint} model, but the base is family {family}")


