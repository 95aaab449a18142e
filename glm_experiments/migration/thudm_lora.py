"""PEFT LoRA adapters on THUDM module names -> adapters of the native modules (see thudm_adapters.py)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from glm_experiments.models.checkpoint_files import CheckpointError

log = logging.getLogger(__name__)

from glm_experiments.migration.thudm_adapter_files import (
    ADAPTER_CONFIG,
    LAYER_KEY,
    PEFT_PREFIX,
    V1_MODULES,
    V2_MODULES,
    BaseDims,
    adapter_weights_file,
    check_family_hint,
    read_json,
    read_weights,
)

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

    from glm_experiments.methods.artifacts import save_safetensors, write_method_json

    config_file = src / ADAPTER_CONFIG
    cfg = read_json(config_file)
    check_family_hint(config_file, "base_model_name_or_path", cfg.get("base_model_name_or_path"), family)
    for key, ok in (("fan_in_fan_out", lambda v: not v), ("enable_lora", lambda v: v is None),
                    ("modules_to_save", lambda v: not v), ("lora_bias", lambda v: not v),
                    ("layer_replication", lambda v: not v), ("use_qalora", lambda v: not v)):
        if key in cfg and not ok(cfg[key]):
            raise CheckpointError(f"{config_file}: key {key}={cfg[key]!r} cannot be converted (ChatGLM's layers are"
                                  " plain nn.Linear; only LoRA on them is supported)")
    r = int(cfg.get("r", 8))
    bias = str(cfg.get("bias", "none"))
    weights_file = adapter_weights_file(src)
    state = read_weights(weights_file)

    modules = V1_MODULES if dims.layout == "v1" else tuple(V2_MODULES)
    out: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    ranks: dict[str, int] = {}
    for key, tensor in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        match = LAYER_KEY.fullmatch(name)
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


