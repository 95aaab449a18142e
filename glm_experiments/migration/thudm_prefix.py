"""P-Tuning v2 prefixes (THUDM ptuning/main.py, PEFT PREFIX_TUNING) -> the project's ptuning adapter
(see thudm_adapters.py)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from glm_experiments.models.checkpoint_files import CheckpointError, find_weight_files, iter_tensors
from glm_experiments.models.layouts import is_v1_config

log = logging.getLogger(__name__)

from glm_experiments.migration.thudm_adapter_files import (
    ADAPTER_CONFIG,
    PEFT_PREFIX,
    THUDM_PREFIX_ENCODER,
    BaseDims,
    adapter_weights_file,
    check_family_hint,
    read_json,
    read_weights,
)

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
    cfg = read_json(config_file)
    if "pre_seq_len" in cfg or "model_type" in cfg:
        if cfg.get("model_type") == "chatglm":
            v1 = is_v1_config(cfg)
            if v1 != (dims.layout == "v1"):
                what = "ChatGLM-6B (v1)" if v1 else "ChatGLM2/3/GLM-4"
                raise CheckpointError(f"{config_file}: a {what} config; the base is another family")
        check_family_hint(config_file, "_name_or_path", cfg.get("_name_or_path"), family)
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
    cfg = read_json(config_file)
    check_family_hint(config_file, "base_model_name_or_path", cfg.get("base_model_name_or_path"), family)
    tokens = cfg.get("num_virtual_tokens")
    if not tokens:
        raise CheckpointError(f"{config_file}: key num_virtual_tokens missing")
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise CheckpointError(f"{config_file}: key num_transformer_submodules={cfg['num_transformer_submodules']}: a"
                              " decoder-only prefix has 1")
    if cfg.get("num_layers") is not None and int(cfg["num_layers"]) != dims.num_layers:
        raise CheckpointError(f"{config_file}: key num_layers={cfg['num_layers']}, but the base has {dims.num_layers} layers")
    weights_file = adapter_weights_file(src)
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


