"""Adapters trained with THUDM's scripts, made to compute the same on the models this project loads.

What users bring (the PEFT and THUDM adapter files tests/helpers/thudm_fixtures.py writes):

* **LoRA** written by PEFT 0.6-0.10 (ChatGLM3 ``finetune_demo/finetune_hf.py``, liucongg-style scripts):
  ``adapter_config.json`` + ``adapter_model.safetensors`` or ``adapter_model.bin``, keys like
  ``base_model.model.transformer.encoder.layers.N.self_attention.query_key_value.lora_A.weight``.
  For ChatGLM2/3 and GLM-4 the base becomes transformers' ``GlmForCausalLM``, so the adapter is rewritten:

  - ``query_key_value`` -> ``q_proj`` / ``k_proj`` / ``v_proj``: the same ``lora_A`` for each, ``lora_B`` split
    by the rows the base weight is split by ([Q heads*head_dim | K kv_heads*head_dim | V kv_heads*head_dim],
    as :func:`glm_experiments.models.glm.layout.map_v2_key` does); DoRA magnitudes and trained biases split the
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

Anything that cannot be mapped raises :class:`~glm_experiments.models.checkpoint_files.CheckpointError` with one line naming
the file and the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from glm_experiments.constants import build_once, cache_root
from glm_experiments.models.checkpoint_files import CheckpointError

log = logging.getLogger(__name__)

from glm_experiments.migration.thudm_adapter_files import ADAPTER_CONVERTER_VERSION, BaseDims, adapter_kind, base_dims
from glm_experiments.migration.thudm_lora import convert_lora
from glm_experiments.migration.thudm_prefix import convert_peft_prefix, convert_thudm_prefix

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
        from glm_experiments.methods.artifacts import read_method_json

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
    from glm_experiments.methods.artifacts import check_settings, read_method_json

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
    from glm_experiments.methods.artifacts import cfg_get

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
    from glm_experiments.methods.artifacts import cfg_get

    value = cfg_get(method_cfg, "init_from", None)
    return str(value) if value else None


def init_method_from(model, method_cfg: Any, family: str | None = None):
    """``method.apply`` for ``method.init_from=DIR``: the method's trainable parameters start as the adapter in DIR
    (ours, or THUDM's / PEFT's, converted on the fly into the cache). r/alpha (LoRA) or pre_seq_len/prefix_projection
    (ptuning) must agree with the adapter; LoRA's target modules, dropout and flags are the adapter's."""
    from glm_experiments.errors import UserError
    from glm_experiments.methods.artifacts import cfg_get, read_method_json

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
