"""Adapters trained with THUDM's scripts, made to compute the same on the models this project loads.

What users bring (see DESIGN.md, "Users' existing fine-tuning artifacts"):

* **LoRA** written by PEFT 0.6-0.10 (ChatGLM3 ``finetune_demo/finetune_hf.py``, liucongg-style scripts):
  ``adapter_config.json`` + ``adapter_model.safetensors`` or ``adapter_model.bin``, keys like
  ``base_model.model.transformer.encoder.layers.N.self_attention.query_key_value.lora_A.weight``.
  For ChatGLM2/3 and GLM-4 the base becomes transformers' ``GlmForCausalLM``, so the adapter is rewritten:

  - ``query_key_value`` -> ``q_proj`` / ``k_proj`` / ``v_proj``: the same ``lora_A`` for each, ``lora_B`` split
    by the rows the base weight is split by ([Q heads*head_dim | K kv_heads*head_dim | V kv_heads*head_dim],
    as :func:`glm_experiments.models.thudm.map_v2_key` does); DoRA magnitudes and trained biases split the
    same way (DoRA's norm is per output row, so the split is exact);
  - ``dense`` -> ``o_proj``, ``dense_h_to_4h`` -> ``gate_up_proj`` (same [gate | up] rows),
    ``dense_4h_to_h`` -> ``down_proj``;
  - r, lora_alpha, dropout, bias, use_rslora, use_dora, layers_to_transform carried over; rank/alpha patterns
    renamed; ``target_modules`` = the native modules the weights are for.

  ChatGLM-6B (v1): our v1 class keeps THUDM's module names, so its adapters load as they are
  (``PeftModel.from_pretrained(v1_model, thudm_adapter_dir)`` works); conversion only checks every key and shape
  and rewrites the files in the current format.
* **P-Tuning v2** from ``ptuning/main.py`` (``pytorch_model.bin`` holding ``transformer.prefix_encoder.*``, next to
  a ``config.json`` with ``pre_seq_len`` / ``prefix_projection``; a full-model save with those keys among the
  base weights is read the same way, the base weights ignored), or PEFT ``PREFIX_TUNING``
  (``adapter_config.json`` with ``num_virtual_tokens``, weights ``prompt_embeddings`` = the encoder's output per
  virtual token, or the encoder itself ``prompt_encoder.embedding`` / ``prompt_encoder.transform.{0,2}``).
  Both become the project's own ptuning adapter (``prefix_encoder.safetensors`` + ``method.json``, what
  ``method=ptuning`` saves). The per-token vector is laid out [layer*2 + (0 key | 1 value), kv head, head dim]
  in THUDM's PrefixEncoder, in PEFT's and in ours, so the values are copied as they are.

Anything that cannot be mapped raises :class:`~glm_experiments.models.thudm.CheckpointError` with one line naming
the file and the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glm_experiments.constants import build_once, cache_root
from glm_experiments.models.checkpoint_files import (
    CheckpointError,
    find_weight_files,
    iter_tensors,
)
from glm_experiments.models.families import family_names, get_family
from glm_experiments.models.thudm_layouts import glm_config_from_thudm, is_v1_config

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
_LAYER_KEY = re.compile(r"transformer\.(encoder\.layers|layers)\.(\d+)\.(.+)")


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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def _adapter_weights_file(directory: Path) -> Path:
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
        cfg = _read_json(directory / ADAPTER_CONFIG)
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


def _check_family_hint(file: Path, key: str, value: Any, family: str | None) -> None:
    hint = _family_hint(value)
    if family is None or not get_family(family).name_pattern or hint is None or hint == family:
        return
    if hint in get_family(family).shares_weights_with:
        # same shapes and vocabulary; a ChatGLM3 demo trained on a ChatGLM2 base (or the reverse) is the user's choice
        log.warning("%s: %s=%r names %s, converting for %s", file, key, value, hint, family)
        return
    raise CheckpointError(f"{file}: key {key}={value!r} is a {hint} model, but the base is family {family}")


# ----------------------------------------------------------------------------------------------- LoRA


def _lora_part(tail: str) -> str | None:
    """lora_A / lora_B / magnitude / bias for the part of a key after the module name (adapter name optional)."""
    for part in ("lora_A", "lora_B"):
        if tail in (f"{part}.weight",) or re.fullmatch(rf"{part}\.[A-Za-z0-9_\-]+\.weight", tail):
            return part
    if tail == "lora_magnitude_vector" or re.fullmatch(r"lora_magnitude_vector(\.[A-Za-z0-9_\-]+)?(\.weight)?", tail):
        return "magnitude"
    if tail == "bias":
        return "bias"
    return None


def _rename_pattern(pattern: str, layout: str) -> list[str]:
    """A rank_pattern / alpha_pattern key in native names."""
    if layout == "v1":
        return [pattern]
    out = pattern.replace("transformer.encoder.layers", "model.layers").replace("self_attention.", "self_attn.")
    for thudm_name, native in (("query_key_value", ["q_proj", "k_proj", "v_proj"]), ("dense_h_to_4h", ["gate_up_proj"]),
                               ("dense_4h_to_h", ["down_proj"])):
        if re.search(rf"\b{thudm_name}\b", out):
            return [re.sub(rf"\b{thudm_name}\b", n, out) for n in native]
    if re.search(r"\bdense\b", out):
        return [re.sub(r"\bdense\b", "o_proj", out)]
    return [out]


def convert_lora(src: Path, dst: Path, dims: BaseDims, family: str | None = None,
                 base_model_name_or_path: str | None = None) -> Path:
    """A PEFT 0.6-0.10 LoRA trained on THUDM module names -> current PEFT LoRA for the loaded model (+ method.json)."""
    from peft import LoraConfig

    from glm_experiments.methods.base import save_safetensors, write_method_json

    config_file = src / ADAPTER_CONFIG
    cfg = _read_json(config_file)
    _check_family_hint(config_file, "base_model_name_or_path", cfg.get("base_model_name_or_path"), family)
    for key, ok in (("fan_in_fan_out", lambda v: not v), ("enable_lora", lambda v: v is None),
                    ("modules_to_save", lambda v: not v), ("lora_bias", lambda v: not v),
                    ("layer_replication", lambda v: not v), ("use_qalora", lambda v: not v)):
        if key in cfg and not ok(cfg[key]):
            raise CheckpointError(f"{config_file}: key {key}={cfg[key]!r} cannot be converted (ChatGLM's layers are"
                                  " plain nn.Linear; only LoRA on them is supported)")
    r = int(cfg.get("r", 8))
    bias = str(cfg.get("bias", "none"))
    weights_file = _adapter_weights_file(src)
    state = read_weights(weights_file)

    modules = V1_MODULES if dims.layout == "v1" else tuple(V2_MODULES)
    out: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    ranks: dict[str, int] = {}
    for key, tensor in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        match = _LAYER_KEY.fullmatch(name)
        if not match:
            raise CheckpointError(f"{weights_file}: key {key}: not a LoRA weight of a ChatGLM layer"
                                  " (modules_to_save / embedding LoRA cannot be converted)")
        stack, layer, rest = match.group(1), int(match.group(2)), match.group(3)
        if (stack == "layers") != (dims.layout == "v1"):
            what = "ChatGLM-6B (v1)" if stack == "layers" else "ChatGLM2/3/GLM-4"
            use = "family chatglm" if stack == "layers" else "family chatglm2, chatglm3 or glm4"
            raise CheckpointError(f"{weights_file}: key {key} is a {what} module name; the base is another family ({use})")
        module = next((m for m in modules if rest.startswith(m + ".")), None)
        part = _lora_part(rest[len(module) + 1:]) if module else None
        if module is None or part is None:
            raise CheckpointError(f"{weights_file}: key {key}: unknown target module or weight (known: {', '.join(modules)};"
                                  " lora_A, lora_B, lora_magnitude_vector, bias)")
        if part == "bias" and bias == "none":
            raise CheckpointError(f"{weights_file}: key {key}: a trained bias, but {ADAPTER_CONFIG} says bias='none'")
        if layer >= dims.num_layers:
            raise CheckpointError(f"{weights_file}: key {key}: layer {layer}, but the base has {dims.num_layers} layers")
        in_f, out_f = dims.shapes(module)
        shape = tuple(tensor.shape)
        if part in ("lora_A", "lora_B"):
            a = part == "lora_A"
            ok = len(shape) == 2 and (shape[1] == in_f if a else shape[0] == out_f)
            want = f"(r, {in_f})" if a else f"({out_f}, r)"
            if ok:
                rank = shape[0] if a else shape[1]
                seen = ranks.setdefault(f"{layer}.{module}", rank)
                if rank != seen:
                    ok, want = False, f"rank {seen}, as its {'lora_B' if a else 'lora_A'}"
                elif not cfg.get("rank_pattern") and rank != r:
                    ok, want = False, f"rank r={r} ({ADAPTER_CONFIG})"
        else:
            ok = shape == (out_f,)
            want = f"({out_f},)"
        if not ok:
            raise CheckpointError(f"{weights_file}: key {key} has shape {shape}, expected {want} for this base")
        suffix = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector",
                  "bias": "bias"}[part]
        if dims.layout == "v1":
            out[f"{PEFT_PREFIX}transformer.layers.{layer}.{module}.{suffix}"] = tensor.contiguous().clone()
            targets.add(module.rsplit(".", 1)[-1])
            continue
        natives = V2_MODULES[module]
        if len(natives) == 3 and part != "lora_A":
            pieces = tensor.split([dims.q, dims.kv, dims.kv], dim=0)
        else:
            pieces = [tensor] * len(natives)
        for native, piece in zip(natives, pieces):
            out[f"{PEFT_PREFIX}model.layers.{layer}.{native}.{suffix}"] = piece.contiguous().clone()
            targets.add(native.rsplit(".", 1)[-1])
    if not out:
        raise CheckpointError(f"{weights_file}: no LoRA weights in it")
    pairs = {k.rsplit(".lora_", 1)[0] for k in out if ".lora_A." in k or ".lora_B." in k}
    for module_key in sorted(pairs):
        for part in ("lora_A", "lora_B"):
            if f"{module_key}.{part}.weight" not in out:
                raise CheckpointError(f"{weights_file}: {module_key} has no {part} (missing key for it)")

    kwargs: dict[str, Any] = {
        "r": r,
        "lora_alpha": cfg.get("lora_alpha", 8),
        "lora_dropout": float(cfg.get("lora_dropout", 0.0) or 0.0),
        "bias": bias,
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "use_dora": bool(cfg.get("use_dora", False)),
        "target_modules": sorted(targets),
        "layers_to_transform": cfg.get("layers_to_transform"),
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }
    if cfg.get("layers_to_transform") is not None and cfg.get("layers_pattern"):
        kwargs["layers_pattern"] = "layers"
    for pattern_key in ("rank_pattern", "alpha_pattern"):
        mapped = {}
        for pattern, value in (cfg.get(pattern_key) or {}).items():
            for new in _rename_pattern(pattern, dims.layout):
                mapped[new] = value
        kwargs[pattern_key] = mapped
    try:
        lora_cfg = LoraConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_file}: cannot be expressed as a current LoraConfig ({err})") from None
    dst.mkdir(parents=True, exist_ok=True)
    lora_cfg.save_pretrained(str(dst))
    save_safetensors(out, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    write_method_json(dst, "lora", {"r": r, "alpha": kwargs["lora_alpha"], "dropout": kwargs["lora_dropout"],
                                    "target_modules": sorted(targets), "bias": bias},
                      converted_from={"path": str(src.resolve()), "format": "peft LORA (THUDM module names)"})
    return dst


# ----------------------------------------------------------------------------------------------- P-Tuning v2


def _prefix_out(dims: BaseDims) -> int:
    return dims.num_layers * 2 * dims.kv


def _check_prefix_width(file: Path, key: str, width: int, dims: BaseDims) -> None:
    want = _prefix_out(dims)
    if width != want:
        raise CheckpointError(f"{file}: key {key} gives {width} values per prefix token, but this base needs"
                              f" num_layers*2*kv_heads*head_dim = {dims.num_layers}*2*{dims.kv_heads}*{dims.head_dim} = {want}")


def _write_ptuning(dst: Path, state: dict[str, torch.Tensor], dims: BaseDims, *, pre_seq_len: int, projection: bool,
                   hidden: int | None, embedding_dim: int, source: dict, file: Path) -> Path:
    """Our ptuning adapter, written by ``ptuning.save`` itself (so it is exactly what ``method=ptuning`` saves)."""
    from torch import nn

    from glm_experiments.methods import ptuning

    enc = ptuning.PrefixEncoder(pre_seq_len, dims.num_layers, dims.kv_heads, dims.head_dim, prefix_projection=projection,
                                prefix_hidden_size=hidden or 512, embedding_dim=embedding_dim)
    try:
        enc.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{file}: prefix encoder does not fit ({first})") from None
    holder = nn.Module()
    holder.add_module(ptuning.ENCODER_ATTR, enc)
    ptuning.save(holder, dst)
    # record where it came from beside the settings (method.json stays what ptuning.save wrote otherwise)
    method_file = dst / "method.json"
    payload = json.loads(method_file.read_text(encoding="utf-8"))
    payload["converted_from"] = source
    method_file.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return dst


def convert_thudm_prefix(src: Path, dst: Path, dims: BaseDims, family: str | None = None) -> Path:
    """ptuning/main.py checkpoint (config.json + weights holding transformer.prefix_encoder.*) -> our ptuning adapter."""
    config_file = src / "config.json"
    cfg = _read_json(config_file)
    if "pre_seq_len" in cfg or "model_type" in cfg:
        if cfg.get("model_type") == "chatglm":
            v1 = is_v1_config(cfg)
            if v1 != (dims.layout == "v1"):
                what = "ChatGLM-6B (v1)" if v1 else "ChatGLM2/3/GLM-4"
                raise CheckpointError(f"{config_file}: a {what} config; the base is another family")
        _check_family_hint(config_file, "_name_or_path", cfg.get("_name_or_path"), family)
    if not cfg.get("pre_seq_len"):
        raise CheckpointError(f"{config_file}: key pre_seq_len missing or null: not a P-Tuning v2 checkpoint")
    try:
        files = find_weight_files(src)
    except CheckpointError:
        raise CheckpointError(f"{src}: no pytorch_model.bin / model.safetensors with the prefix encoder") from None
    state: dict[str, torch.Tensor] = {}
    where: Path = files.files[0]
    ignored = 0
    for file, key, load in iter_tensors(files):
        for prefix in (THUDM_PREFIX_ENCODER, PEFT_PREFIX + THUDM_PREFIX_ENCODER):
            if key.startswith(prefix):
                state[key[len(prefix):]] = load()
                where = file
                break
        else:
            ignored += 1
    if ignored:
        log.info("%s: %d base weight(s) beside the prefix encoder ignored (P-Tuning v2 keeps the base frozen)", src, ignored)
    if "embedding.weight" not in state:
        raise CheckpointError(f"{where}: key {THUDM_PREFIX_ENCODER}embedding.weight missing (not a P-Tuning v2 checkpoint)")
    unknown = sorted(set(state) - {"embedding.weight", "trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias"})
    if unknown:
        raise CheckpointError(f"{where}: key {THUDM_PREFIX_ENCODER}{unknown[0]}: not part of ChatGLM's PrefixEncoder")
    projection = "trans.0.weight" in state
    pre_seq_len, embedding_dim = state["embedding.weight"].shape
    if int(cfg["pre_seq_len"]) != pre_seq_len:
        raise CheckpointError(f"{config_file}: key pre_seq_len={cfg['pre_seq_len']}, but {where.name}'s"
                              f" {THUDM_PREFIX_ENCODER}embedding.weight has {pre_seq_len} rows")
    if "prefix_projection" in cfg and bool(cfg["prefix_projection"]) != projection:
        raise CheckpointError(f"{config_file}: key prefix_projection={cfg['prefix_projection']}, but {where.name}"
                              f" {'has' if projection else 'has no'} {THUDM_PREFIX_ENCODER}trans.* weights")
    if projection:
        missing = sorted({"trans.0.bias", "trans.2.weight", "trans.2.bias"} - set(state))
        if missing:
            raise CheckpointError(f"{where}: key {THUDM_PREFIX_ENCODER}{missing[0]} missing")
        _check_prefix_width(where, THUDM_PREFIX_ENCODER + "trans.2.weight", state["trans.2.weight"].shape[0], dims)
        hidden = int(state["trans.0.weight"].shape[0])
    else:
        _check_prefix_width(where, THUDM_PREFIX_ENCODER + "embedding.weight", embedding_dim, dims)
        hidden = None
    return _write_ptuning(dst, state, dims, pre_seq_len=int(pre_seq_len), projection=projection, hidden=hidden,
                          embedding_dim=int(embedding_dim), file=where,
                          source={"path": str(src.resolve()), "format": "THUDM ptuning/main.py prefix encoder"})


def convert_peft_prefix(src: Path, dst: Path, dims: BaseDims, family: str | None = None) -> Path:
    """PEFT PREFIX_TUNING (finetune_demo) -> our ptuning adapter."""
    config_file = src / ADAPTER_CONFIG
    cfg = _read_json(config_file)
    _check_family_hint(config_file, "base_model_name_or_path", cfg.get("base_model_name_or_path"), family)
    tokens = cfg.get("num_virtual_tokens")
    if not tokens:
        raise CheckpointError(f"{config_file}: key num_virtual_tokens missing")
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise CheckpointError(f"{config_file}: key num_transformer_submodules={cfg['num_transformer_submodules']}: a"
                              " decoder-only prefix has 1")
    if cfg.get("num_layers") is not None and int(cfg["num_layers"]) != dims.num_layers:
        raise CheckpointError(f"{config_file}: key num_layers={cfg['num_layers']}, but the base has {dims.num_layers} layers")
    weights_file = _adapter_weights_file(src)
    raw = read_weights(weights_file)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        name = key.removeprefix("base_model.")
        name = re.sub(r"^prompt_encoder\.(?:[A-Za-z0-9_\-]+\.)?(embedding|transform)", r"prompt_encoder.\1", name)
        if name == "prompt_embeddings":
            state["prompt_embeddings"] = tensor
        elif name.startswith("prompt_encoder."):
            rest = name[len("prompt_encoder."):]
            mapped = re.sub(r"^transform\.", "trans.", rest)
            if mapped not in ("embedding.weight", "trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias"):
                raise CheckpointError(f"{weights_file}: key {key}: not part of PEFT's PrefixEncoder")
            state[mapped] = tensor
        else:
            raise CheckpointError(f"{weights_file}: key {key}: unknown key for a PREFIX_TUNING adapter")
    width = _prefix_out(dims)
    source = {"path": str(src.resolve()), "format": "peft PREFIX_TUNING"}
    if "trans.0.weight" in state:  # the encoder itself, with its projection
        missing = sorted({"embedding.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias"} - set(state))
        if missing:
            raise CheckpointError(f"{weights_file}: key prompt_encoder.{missing[0].replace('trans.', 'transform.')} missing")
        _check_prefix_width(weights_file, "prompt_encoder.transform.2.weight", state["trans.2.weight"].shape[0], dims)
        enc_state = {k: state[k] for k in ("embedding.weight", "trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias")}
        rows, emb = enc_state["embedding.weight"].shape
        projection, hidden = True, int(enc_state["trans.0.weight"].shape[0])
    else:
        key = "prompt_embeddings" if "prompt_embeddings" in state else "prompt_encoder.embedding.weight"
        table = state.get("prompt_embeddings", state.get("embedding.weight"))
        if table is None or table.dim() != 2:
            raise CheckpointError(f"{weights_file}: key prompt_embeddings missing (nor prompt_encoder.embedding.weight)")
        _check_prefix_width(weights_file, key, table.shape[1], dims)
        enc_state = {"embedding.weight": table}
        rows, emb = table.shape
        projection, hidden = False, None
    if rows != int(tokens):
        raise CheckpointError(f"{config_file}: key num_virtual_tokens={tokens}, but {weights_file.name} has {rows} prefix rows")
    if cfg.get("token_dim") is not None and int(cfg["token_dim"]) * 2 * dims.num_layers != width:
        raise CheckpointError(f"{config_file}: key token_dim={cfg['token_dim']}, but this base's keys/values per layer are"
                              f" kv_heads*head_dim = {dims.kv} wide")
    return _write_ptuning(dst, enc_state, dims, pre_seq_len=int(rows), projection=projection, hidden=hidden,
                          embedding_dim=int(emb), source=source, file=weights_file)


# ----------------------------------------------------------------------------------------------- entry points


def convert_adapter(src: str | os.PathLike, dst: str | os.PathLike, config: Any, family: str | None = None,
                    base_model_name_or_path: str | None = None) -> tuple[Path, str]:
    """Convert the THUDM/PEFT adapter directory ``src`` for a base whose config is ``config`` (a loaded model's
    config, or a THUDM config.json dict) into ``dst``. Returns (dst, method name: "lora" or "ptuning").
    An adapter already in this project's format (method.json) is copied as it is."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    kind = adapter_kind(src)
    dims = base_dims(config)
    if kind == "ours":
        from glm_experiments.methods.base import read_method_json

        shutil.copytree(src, dst, dirs_exist_ok=True)
        return dst, read_method_json(dst)["method"]
    if kind == "lora":
        return convert_lora(src, dst, dims, family, base_model_name_or_path), "lora"
    if kind == "prefix_peft":
        return convert_peft_prefix(src, dst, dims, family), "ptuning"
    return convert_thudm_prefix(src, dst, dims, family), "ptuning"


def _fingerprint(src: Path, dims: BaseDims, family: str | None) -> str:
    entries = []
    for file in sorted(src.iterdir()):
        if file.is_file():
            st = file.stat()
            entries.append([file.name, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"path": str(src.resolve()), "dims": dims.key(), "family": family, "files": entries,
                       "version": ADAPTER_CONVERTER_VERSION})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def prepared_adapter(src: str | os.PathLike, config: Any, family: str | None = None) -> Path:
    """A directory in this project's adapter format for ``src``: ``src`` itself when it has a method.json, else
    its conversion, made once into ``$GLM_EXPERIMENTS_CACHE/adapters/<hash>`` (keyed by the files and the base's
    dims; concurrent callers wait on a file lock)."""

    src = Path(src).expanduser()
    if adapter_kind(src) == "ours":
        return src
    dims = base_dims(config)
    root = cache_root() / "adapters"
    key = _fingerprint(src, dims, family)
    dst = root / key

    def convert(tmp: Path) -> None:
        log.info("converting adapter %s into %s", src, dst)
        convert_adapter(src, tmp, config, family)

    return build_once(dst, "method.json", convert)


def load_adapter(model, adapter_dir: str | os.PathLike, family: str | None = None, *, is_trainable: bool = False,
                 method_cfg: Any = None):
    """``model`` (a fresh base) with the adapter in ``adapter_dir`` (ours, or THUDM's/PEFT's, converted on the fly).
    Returns (model, method name). ``method_cfg`` (LoRA: r, alpha; ptuning: pre_seq_len, prefix_projection) must
    agree with the adapter; LoRA target modules come from the adapter."""
    from glm_experiments.methods.base import check_settings, read_method_json

    prepared = prepared_adapter(adapter_dir, model.config, family)
    method = read_method_json(prepared)["method"]
    if method in ("lora", "qlora"):
        from peft import PeftModel

        if method_cfg is not None:
            saved = read_method_json(prepared)["settings"]
            check_settings(method, saved, {"r": _get(method_cfg, "r", saved["r"]), "alpha": _get(method_cfg, "alpha", saved["alpha"])},
                           ["r", "alpha"], where=str(adapter_dir))
        return PeftModel.from_pretrained(model, str(prepared), is_trainable=is_trainable), method
    from glm_experiments.methods import get_method

    module = get_method(method)
    loaded = module.load(model, prepared, _plain(method_cfg) if method_cfg is not None else None)
    if not is_trainable:
        for p in loaded.parameters():
            p.requires_grad_(False)
    return loaded, method


def _get(cfg: Any, key: str, default: Any) -> Any:
    from glm_experiments.methods.base import cfg_get

    value = cfg_get(cfg, key, None)
    return default if value is None else value


def _plain(cfg: Any) -> Any:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return cfg


# ----------------------------------------------------------------------------------------------- training hook

INIT_FROM_METHODS = {"lora": ("lora", "qlora"), "ptuning": ("ptuning",)}


def init_from_dir(method_cfg: Any) -> str | None:
    """``method.init_from`` when set (methods without the field: None)."""
    from glm_experiments.methods.base import cfg_get

    value = cfg_get(method_cfg, "init_from", None)
    return str(value) if value else None


def init_method_from(model, method_cfg: Any, family: str | None = None):
    """``method.apply`` for ``method.init_from=DIR``: the method's trainable parameters start as the adapter in DIR
    (ours, or THUDM's / PEFT's, converted on the fly into the cache). r/alpha (LoRA) or pre_seq_len/prefix_projection
    (ptuning) must agree with the adapter; LoRA's target modules, dropout and flags are the adapter's."""
    from glm_experiments.errors import UserError
    from glm_experiments.methods.base import cfg_get, read_method_json

    path = init_from_dir(method_cfg)
    name = cfg_get(method_cfg, "name")
    if name not in INIT_FROM_METHODS:
        raise UserError(f"method.init_from works with method=lora or method=ptuning, not method={name}")
    try:
        prepared = prepared_adapter(path, model.config, family)
        saved = read_method_json(prepared)["method"]
        if saved not in INIT_FROM_METHODS[name]:
            raise UserError(f"method.init_from={path} holds a {saved} adapter, but method={name}")
        loaded, _ = load_adapter(model, prepared, family, is_trainable=True, method_cfg=method_cfg)
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        raise UserError(f"method.init_from={path}: {err}") from None
    log.info("method=%s: starting from the adapter in %s (%s)", name, path, prepared)
    return loaded


@torch.no_grad()
def starting_loss(model, dataset, collator, batch_size: int = 4) -> float | None:
    """Mean loss of ``model`` on the first ``batch_size`` training samples, before any update (eval mode, on the
    device the model is on); None under ZeRO-3, whose partitioned weights need the engine."""
    from glm_experiments.distributed import zero3_partitioned

    if zero3_partitioned(model) or len(dataset) == 0:
        return None
    was_training = model.training
    model.eval()
    try:
        batch = collator([dataset[i] for i in range(min(batch_size, len(dataset)))])
        device = next(p.device for p in model.parameters())
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        return float(model(**batch).loss)
    finally:
        model.train(was_training)


def log_starting_loss(model, dataset, collator, tracker) -> None:
    """``train/init_from_loss`` at step 0: the loss the run starts from (the adapter's, not a fresh one's)."""
    loss = starting_loss(model, dataset, collator)
    if loss is not None:
        tracker.log_metrics({"train/init_from_loss": loss}, step=0)
        log.info("method.init_from: loss before the first update %.4f", loss)
