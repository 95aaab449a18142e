"""Load THUDM-layout ChatGLM checkpoints into transformers classes, without ``trust_remote_code``.

The family (models/<family>/family.py) names the layout (models/layouts.py: ChatGLM2/3 and GLM-4 onto the native
``GlmForCausalLM``, ChatGLM-6B onto ``models/chatglm/modeling.py``) and the tokenizer; directories already in transformers'
format (model_type "glm", "chatglm_v1", ...) load with the Auto classes.

Weights are streamed shard by shard onto a model built on the meta device (one copy in memory at any time).
:func:`converted_path` converts once into a cache (safetensors, sharded, tokenizer included) so that the jobs of
a sweep share one conversion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from glm_experiments.constants import TORCH_DTYPES, build_once, cache_root
from glm_experiments.models.checkpoint_files import (
    CheckpointError,
    WeightFiles,
    find_weight_files,
    first_line,
    from_pretrained_strict,
    iter_tensors,
    read_config,
)
from glm_experiments.models.family import Family, get_family, thudm_layouts
from glm_experiments.models.layouts import Layout, ShapeError, is_v1_config
from glm_experiments.models.tokenizers import TokenizerError

log = logging.getLogger(__name__)

CONVERTER_VERSION = 2  # bump when the converted output changes (2: tokenizers identical to THUDM's)


def checkpoint_kind(path: str | os.PathLike) -> str:
    """"chatglm_v1" (THUDM ChatGLM-6B), "chatglm_v2" (THUDM ChatGLM2/3, GLM-4) or "native" (transformers format)."""
    cfg = read_config(path)
    model_type = cfg.get("model_type")
    if model_type == "chatglm":
        return "chatglm_v1" if is_v1_config(cfg) else "chatglm_v2"
    if model_type:
        return "native"
    raise CheckpointError(f"{Path(path) / 'config.json'}: not a recognised checkpoint (no model_type)")


def check_family(path: Path, cfg: dict, family: str) -> Layout:
    """The THUDM layout ``family`` reads, after checking that ``path``'s config.json has it."""
    layout = get_family(family).layout
    if layout is None:
        raise CheckpointError(f"{path / 'config.json'}: model_type 'chatglm' is THUDM's layout: use family chatglm, chatglm2, chatglm3 or glm4")
    layout.check_config(path / "config.json", cfg, family, thudm_layouts())
    return layout


def _checkpoint_dtype(cfg: dict) -> torch.dtype:
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return TORCH_DTYPES.get(str(name).replace("torch.", ""), torch.float32)


# ----------------------------------------------------------------------------------------------- loading


def _stream_into(model: PreTrainedModel, files: WeightFiles, dtype: torch.dtype, mapper, source_key) -> None:
    """Assign every checkpoint tensor (mapped by ``mapper``) into the meta-device ``model``, shard by shard."""
    params = dict(model.named_parameters())
    assigned: dict[str, Path] = {}
    current_file, batch = None, {}

    def flush():
        if batch:
            model.load_state_dict(batch, strict=False, assign=True)
            batch.clear()

    for file, key, load in iter_tensors(files):
        if file != current_file:
            flush()
            current_file = file
        try:
            pairs = mapper(key, load)
        except ShapeError as err:
            raise CheckpointError(f"{file}: key {key} has shape {err}") from None
        if pairs is None:
            hint = ""
            if key.startswith("transformer.word_embeddings") or key.startswith("transformer.layers."):
                hint = " (a ChatGLM-6B v1 key: use family chatglm)"
            elif key.startswith("transformer.embedding.") or key.startswith("transformer.encoder."):
                hint = " (a ChatGLM2/3/GLM-4 key: use family chatglm2, chatglm3 or glm4)"
            elif "prefix_encoder" in key:
                hint = " (a P-Tuning v2 prefix encoder: load it with the ptuning method, not as base weights)"
            raise CheckpointError(f"{file}: unexpected key {key}{hint}")
        for target, tensor in pairs:
            param = params.get(target)
            if param is None:
                raise CheckpointError(f"{file}: unexpected key {key} (maps to {target}, which the model does not have)")
            if target in assigned:
                raise CheckpointError(f"{file}: key {key} appears twice (also in {assigned[target]})")
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{file}: key {key} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)} from config.json"
                )
            batch[target] = tensor.to(dtype=dtype, copy=True)
            assigned[target] = file
        del pairs
    flush()
    missing = [name for name in params if name not in assigned]
    if missing:
        where = files.index or files.directory
        raise CheckpointError(f"{where}: missing key {source_key(missing[0])}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def _set_generation_ids(model: PreTrainedModel, tokenizer, family: Family) -> None:
    """generate() stops where the family's template ends a reply (THUDM's generation configs)."""
    from glm_experiments.data.templates import get_template

    template = get_template(family.template)
    eos = template.stop_ids(tokenizer)
    model.config.eos_token_id = eos if len(eos) > 1 else eos[0]
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = model.generation_config
    gen.eos_token_id = eos if len(eos) > 1 else eos[0]
    gen.pad_token_id = tokenizer.pad_token_id
    bos = template.generation_bos(tokenizer)
    if bos is not None:
        gen.bos_token_id = bos


def _tokenizer(family: Family, path: Path):
    try:
        return family.tokenizer(path)
    except TokenizerError as err:
        raise CheckpointError(str(err)) from None


def _load_thudm(path: Path, family: str, dtype: torch.dtype | None, attn_implementation: str | None = None):
    cfg = read_config(path)
    layout = check_family(path, cfg, family)
    fam = get_family(family)
    dtype = dtype or _checkpoint_dtype(cfg)
    tokenizer = _tokenizer(fam, path)
    files = find_weight_files(path)
    model, mapper, source_key = layout.build(cfg, dtype, attn_implementation)
    _stream_into(model, files, dtype, mapper, source_key)
    if len(tokenizer) > model.config.vocab_size:
        raise CheckpointError(
            f"{path / 'config.json'}: vocabulary size {model.config.vocab_size} is smaller than the tokenizer's"
            f" {len(tokenizer)} tokens: tokenizer and weights do not belong together"
        )
    _set_generation_ids(model, tokenizer, fam)
    model.eval()
    return model, tokenizer


def _load_native(path: Path, family: str, dtype: torch.dtype | None, **kwargs):
    from transformers import AutoTokenizer

    from glm_experiments.models.checked_files import check_tokenizer_files

    check_tokenizer_files(path)  # a damaged file named, before the tokenizers library reports the directory
    try:  # the tokenizer first: a missing one is found before the weights load
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # a native model dir that kept THUDM's tokenizer files only
        fam = get_family(family)
        try:
            if fam.tokenizer is None:
                raise TokenizerError(first_line(err))
            tokenizer = fam.tokenizer(path)
        except TokenizerError:
            raise CheckpointError(f"{path}: cannot load its tokenizer ({first_line(err)})") from None
    return from_pretrained_strict(path, dtype=dtype or "auto", **kwargs), tokenizer


def load_checkpoint(
    path: str | os.PathLike, family: str, dtype: torch.dtype | None, *, cached: bool = False, **from_pretrained_kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for a checkpoint directory of ``family`` (chatglm, chatglm2, chatglm3, glm4; "hf" for
    any transformers-format directory).

    THUDM-layout directories are mapped in memory (no disk writes) unless ``cached=True`` or extra
    ``from_pretrained_kwargs`` are given (e.g. ``quantization_config``), in which case the directory is converted
    once into the cache (:func:`converted_path`) and loaded from there with ``from_pretrained``.
    Raises :class:`CheckpointError` naming the file and key for anything it cannot load.
    """
    path = Path(path).expanduser()
    layout = get_family(family).layout
    attn = from_pretrained_kwargs.pop("attn_implementation", None)
    if layout is not None and layout.own_attention and attn not in (None, "eager"):
        log.info("%s uses its own attention; attn_implementation=%s ignored", family, attn)
        attn = None
    if checkpoint_kind(path) == "native":
        return _load_native(path, family, dtype, **from_pretrained_kwargs, **({"attn_implementation": attn} if attn else {}))
    if cached or from_pretrained_kwargs:
        if attn:
            from_pretrained_kwargs["attn_implementation"] = attn
        return _load_native(converted_path(path, family), family, dtype, **from_pretrained_kwargs)
    return _load_thudm(path, family, dtype, attn)


# ----------------------------------------------------------------------------------------------- conversion


def _fingerprint(path: Path, family: str) -> str:
    entries = []
    for file in sorted(path.iterdir()):
        if file.is_file():
            st = file.stat()
            entries.append([file.name, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"path": str(path.resolve()), "family": family, "files": entries, "version": CONVERTER_VERSION})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def convert_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, family: str, max_shard_size: str | int = "2GB", dtype: torch.dtype | None = None
) -> Path:
    """Write ``src`` (THUDM layout) to ``dst`` in transformers' format: sharded safetensors, config, generation
    config and tokenizer. Keeps the checkpoint's dtype unless ``dtype`` is given."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if checkpoint_kind(src) == "native":
        raise CheckpointError(f"{src / 'config.json'}: already in transformers' format; nothing to convert")
    model, tokenizer = _load_thudm(src, family, dtype)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(dst)
    (dst / "conversion.json").write_text(
        json.dumps({"source": str(src.resolve()), "family": family, "converter_version": CONVERTER_VERSION}, indent=2)
    )
    return dst


def converted_path(path: str | os.PathLike, family: str) -> Path:
    """The transformers-format copy of a THUDM checkpoint, converted once per (path, file mtimes) into
    ``$GLM_EXPERIMENTS_CACHE/converted/<hash>`` (default ~/.cache/glm_experiments); concurrent callers wait on
    a file lock. Directories already in transformers' format are returned as they are."""
    path = Path(path).expanduser()
    if checkpoint_kind(path) == "native":
        return path
    check_family(path, read_config(path), family)
    dst = cache_root() / "converted" / _fingerprint(path, family)

    def convert(tmp: Path) -> None:
        log.info("converting %s (%s) into %s", path, family, dst)
        convert_checkpoint(path, tmp, family)

    return build_once(dst, "conversion.json", convert)
