"""Load THUDM-layout ChatGLM checkpoints into transformers classes, without ``trust_remote_code``.

* ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B (config model_type "chatglm" with ``padded_vocab_size``): weights are mapped
  onto transformers' native ``GlmForCausalLM`` (query_key_value split by rows into q/k/v, dense -> o_proj,
  dense_h_to_4h -> gate_up_proj, dense_4h_to_h -> down_proj, final_layernorm -> model.norm, output_layer ->
  lm_head, rotary inv_freq dropped; rope_theta = 10000 * rope_ratio).
* ChatGLM-6B (v1 config keys): loaded as they are into :class:`ChatGLMv1ForCausalLM` (chatglm_v1.py).
* Directories already in transformers' format (model_type "glm", "chatglm_v1", ...) load with the Auto classes.

Weights are streamed shard by shard onto a model built on the meta device (one copy in memory at any time).
:func:`converted_path` converts once into a cache (safetensors, sharded, tokenizer included) so that the jobs of
a sweep share one conversion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GlmConfig, GlmForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from glm_experiments.errors import UserError
from glm_experiments.models.chatglm_v1 import ChatGLMv1Config, ChatGLMv1ForCausalLM
from glm_experiments.constants import TORCH_DTYPES, build_once, cache_root
from glm_experiments.models.tokenizers import TokenizerError, build_tokenizer

log = logging.getLogger(__name__)

FAMILIES = ("chatglm", "chatglm2", "chatglm3", "glm4")
CONVERTER_VERSION = 2  # bump when the converted output changes (2: tokenizers identical to THUDM's)


class CheckpointError(UserError, ValueError):
    """A checkpoint directory that cannot be loaded as asked; the message names the file and the key."""


# ----------------------------------------------------------------------------------------------- discovery


def read_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if not config_file.is_file():
        raise CheckpointError(f"{path}: not a recognised checkpoint directory (no config.json)")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}: invalid JSON ({err})") from None


def is_v1_config(cfg: dict) -> bool:
    """ChatGLM-6B's config (num_layers/inner_hidden_size/position_encoding_2d, no padded_vocab_size)."""
    return "padded_vocab_size" not in cfg and any(k in cfg for k in ("inner_hidden_size", "position_encoding_2d", "gmask_token_id"))


def checkpoint_kind(path: str | os.PathLike) -> str:
    """"chatglm_v1" (THUDM ChatGLM-6B), "chatglm_v2" (THUDM ChatGLM2/3, GLM-4) or "native" (transformers format)."""
    cfg = read_config(path)
    model_type = cfg.get("model_type")
    if model_type == "chatglm":
        return "chatglm_v1" if is_v1_config(cfg) else "chatglm_v2"
    if model_type:
        return "native"
    raise CheckpointError(f"{Path(path) / 'config.json'}: not a recognised checkpoint (no model_type)")


def _check_family(path: Path, cfg: dict, family: str) -> None:
    if family not in FAMILIES:
        raise CheckpointError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    config_file = path / "config.json"
    if family == "chatglm" and not is_v1_config(cfg):
        raise CheckpointError(
            f"{config_file}: family chatglm (ChatGLM-6B) expects v1 config keys (num_layers, inner_hidden_size,"
            f" position_encoding_2d); this config has padded_vocab_size/kv_channels: a ChatGLM2/3 or GLM-4 checkpoint"
        )
    if family != "chatglm" and is_v1_config(cfg):
        raise CheckpointError(
            f"{config_file}: family {family} expects ChatGLM2/3/GLM-4 config keys (padded_vocab_size, kv_channels,"
            f" multi_query_group_num); this config has ChatGLM-6B (v1) keys (inner_hidden_size, position_encoding_2d):"
            " use family chatglm"
        )
    if family == "chatglm":
        return
    required = ["num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "padded_vocab_size"]
    missing = [k for k in required if k not in cfg]
    if missing:
        raise CheckpointError(f"{config_file}: missing key(s) {', '.join(missing)}")
    unsupported = {
        "rmsnorm": (False, "LayerNorm instead of RMSNorm"),
        "add_bias_linear": (True, "biases on dense/MLP layers"),
        "apply_residual_connection_post_layernorm": (True, "post-layernorm residuals"),
        "post_layer_norm": (False, "no final layernorm"),
    }
    for key, (bad, what) in unsupported.items():
        if cfg.get(key, not bad) == bad:
            raise CheckpointError(f"{config_file}: key {key}={bad} ({what}) is not supported by the native GLM class")
    if cfg.get("quantization_bit"):
        raise CheckpointError(f"{config_file}: key quantization_bit={cfg['quantization_bit']}: quantized THUDM checkpoints are not supported; use the fp16/bf16 release")
    if cfg.get("pre_seq_len"):
        raise CheckpointError(f"{config_file}: key pre_seq_len={cfg['pre_seq_len']}: a P-Tuning v2 checkpoint; load the base model and the prefix encoder separately")


@dataclass
class WeightFiles:
    """The weight files of a checkpoint directory; ``weight_map`` is None without an index."""

    directory: Path
    files: list[Path]
    weight_map: dict[str, Path] | None
    index: Path | None
    fmt: str  # "safetensors" or "bin"


def find_weight_files(path: str | os.PathLike) -> WeightFiles:
    """Safetensors preferred; sharded (with an index json) or a single file."""
    path = Path(path)
    for fmt, index_name, single in (
        ("safetensors", "model.safetensors.index.json", "model.safetensors"),
        ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a valid index (expected a 'weight_map' object: {err})") from None
            files: dict[str, Path] = {}
            for key, name in weight_map.items():
                file = path / name
                if name not in files and not file.is_file():
                    raise CheckpointError(f"{index}: lists shard {name} (for key {key}) but {file} does not exist")
                files[name] = file
            return WeightFiles(path, sorted(files.values()), {k: path / v for k, v in weight_map.items()}, index, fmt)
        if (path / single).is_file():
            return WeightFiles(path, [path / single], None, None, fmt)
    shards = sorted(path.glob("model-*.safetensors")) or sorted(path.glob("pytorch_model-*.bin"))
    if shards:
        fmt = "safetensors" if shards[0].suffix == ".safetensors" else "bin"
        log.warning("%s: no index json; reading the %d shards it has", path, len(shards))
        return WeightFiles(path, shards, None, None, fmt)
    raise CheckpointError(
        f"{path}: not a recognised checkpoint directory: no model.safetensors(.index.json),"
        " pytorch_model.bin(.index.json) or model-*/pytorch_model-* shards"
    )


@contextmanager
def _open_shard(file: Path):
    """A mapping key -> loader over one weight file, reading tensors lazily where the format allows."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as err:
            raise CheckpointError(f"{file}: cannot read weight file ({type(err).__name__}: {err})") from None
        with handle as f:
            yield {k: (lambda k=k: f.get_tensor(k)) for k in f.keys()}
        return
    try:
        try:
            sd = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{file}: cannot read weight file ({type(err).__name__}: {err})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{file}: not a state dict")
    try:
        yield {k: (lambda v=v: v) for k, v in sd.items()}
    finally:
        del sd


def iter_tensors(files: WeightFiles) -> Iterator[tuple[Path, str, callable]]:
    """(file, key, load) for every tensor, shard by shard; checks the index against the shards."""
    for file in files.files:
        with _open_shard(file) as shard:
            if files.weight_map is not None:
                listed = {k for k, f in files.weight_map.items() if f == file}
                absent = sorted(listed - set(shard))
                if absent:
                    raise CheckpointError(f"{files.index}: lists key {absent[0]} in {file.name}, but {file} does not contain it")
            for key, load in shard.items():
                yield file, key, load


# ----------------------------------------------------------------------------------------------- configs


def glm_config_from_thudm(cfg: dict, family: str) -> GlmConfig:
    """transformers' GlmConfig for a ChatGLM2/3/GLM-4 ``config.json`` dict (rope_ratio kept, unlike
    transformers' own conversion script)."""
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("kv_channels") or cfg["hidden_size"] // heads
    kv_heads = cfg.get("multi_query_group_num", heads) if cfg.get("multi_query_attention", False) else heads
    rope_theta = 10000.0 * float(cfg.get("rope_ratio") or 1)
    eos = cfg.get("eos_token_id", 2)
    return GlmConfig(
        vocab_size=cfg["padded_vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        attention_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
        max_position_embeddings=cfg.get("seq_length", 8192),
        rms_norm_eps=cfg.get("layernorm_epsilon", 1e-5),
        use_cache=cfg.get("use_cache", True),
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": 0.5},
        pad_token_id=cfg.get("pad_token_id", 0),
        eos_token_id=eos,
        attention_bias=bool(cfg.get("add_qkv_bias", False)),
    )


def _checkpoint_dtype(cfg: dict) -> torch.dtype:
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return TORCH_DTYPES.get(str(name).replace("torch.", ""), torch.float32)


# ----------------------------------------------------------------------------------------------- key mapping

_V2_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")
_V2_LAYER_KEYS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_V2_TOP = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_V2_DROP = {"transformer.rotary_pos_emb.inv_freq"}


def map_v2_key(key: str, tensor_loader, config: GlmConfig, num_layers: int) -> list[tuple[str, torch.Tensor]] | None:
    """Native (key, tensor) pairs for one ChatGLM2/3/GLM-4 tensor; [] to drop it, None when unknown."""
    if key in _V2_DROP:
        return []
    if key in _V2_TOP:
        return [(_V2_TOP[key], tensor_loader())]
    match = _V2_LAYER.fullmatch(key)
    if not match or int(match.group(1)) >= num_layers:
        return None
    layer, rest = int(match.group(1)), match.group(2)
    prefix = f"model.layers.{layer}."
    if rest in _V2_LAYER_KEYS:
        return [(prefix + _V2_LAYER_KEYS[rest], tensor_loader())]
    if rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
        kind = rest.rsplit(".", 1)[1]
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        tensor = tensor_loader()
        if tensor.shape[0] != q + 2 * kv:
            raise _ShapeError(f"{tuple(tensor.shape)}, expected {q + 2 * kv} rows (= Q {q} + K {kv} + V {kv})")
        return [
            (prefix + f"self_attn.q_proj.{kind}", tensor[:q]),
            (prefix + f"self_attn.k_proj.{kind}", tensor[q : q + kv]),
            (prefix + f"self_attn.v_proj.{kind}", tensor[q + kv :]),
        ]
    return None


class _ShapeError(Exception):
    pass


_V2_SOURCE = {v: k for k, v in _V2_TOP.items()}


def _v2_source_key(target: str) -> str:
    """The THUDM key a native key comes from (for error messages)."""
    if target in _V2_SOURCE:
        return _V2_SOURCE[target]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", target)
    if m:
        rest = m.group(2)
        for src, dst in _V2_LAYER_KEYS.items():
            if dst == rest:
                return f"transformer.encoder.layers.{m.group(1)}.{src}"
        kind = rest.rsplit(".", 1)[1]
        return f"transformer.encoder.layers.{m.group(1)}.self_attention.query_key_value.{kind}"
    return target


# ----------------------------------------------------------------------------------------------- loading


def _empty_model(model_cls, config, attn_implementation: str | None = None):
    from accelerate import init_empty_weights

    if attn_implementation:
        config._attn_implementation = attn_implementation
    with init_empty_weights(include_buffers=False):
        model = model_cls(config)
    return model


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
        except _ShapeError as err:
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


def _set_generation_ids(model: PreTrainedModel, tokenizer, family: str) -> None:
    if family == "chatglm":
        eos = [tokenizer.convert_tokens_to_ids("<eop>")]
    elif family == "chatglm2":
        eos = [tokenizer.eos_token_id]
    else:
        eos = [tokenizer.eos_token_id] + tokenizer.convert_tokens_to_ids(["<|user|>", "<|observation|>"])
    model.config.eos_token_id = eos if len(eos) > 1 else eos[0]
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = model.generation_config
    gen.eos_token_id = eos if len(eos) > 1 else eos[0]
    gen.pad_token_id = tokenizer.pad_token_id
    if family == "chatglm":
        gen.bos_token_id = tokenizer.convert_tokens_to_ids("<sop>")


def _load_thudm(path: Path, family: str, dtype: torch.dtype | None, attn_implementation: str | None = None):
    cfg = read_config(path)
    _check_family(path, cfg, family)
    dtype = dtype or _checkpoint_dtype(cfg)
    try:
        tokenizer = build_tokenizer(path, family)
    except TokenizerError as err:
        raise CheckpointError(str(err)) from None
    files = find_weight_files(path)
    if family == "chatglm":
        config = ChatGLMv1Config.from_thudm(cfg)
        config.dtype = dtype
        model = _empty_model(ChatGLMv1ForCausalLM, config)

        def mapper(key, load):
            return [(key, load())] if key in known else None

        known = {name for name, _ in model.named_parameters()}
        _stream_into(model, files, dtype, mapper, lambda k: k)
    else:
        config = glm_config_from_thudm(cfg, family)
        config.dtype = dtype
        model = _empty_model(GlmForCausalLM, config, attn_implementation)
        layers = config.num_hidden_layers
        _stream_into(model, files, dtype, lambda key, load: map_v2_key(key, load, config, layers), _v2_source_key)
    if len(tokenizer) > model.config.vocab_size:
        raise CheckpointError(
            f"{path / 'config.json'}: vocabulary size {model.config.vocab_size} is smaller than the tokenizer's"
            f" {len(tokenizer)} tokens: tokenizer and weights do not belong together"
        )
    _set_generation_ids(model, tokenizer, family)
    model.eval()
    return model, tokenizer


MAX_LISTED_KEYS = 3


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0].strip()


def from_pretrained_strict(path: Path, **kwargs) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained``, strict like the THUDM path: a missing tensor would otherwise
    stay randomly initialised (and an unexpected one be dropped) with only a log line; an unreadable weight
    file is named instead of surfacing as a library traceback."""
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    import glm_experiments.models.chatglm_v1  # noqa: F401  (registers model_type chatglm_v1)

    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, SafetensorError, pickle.UnpicklingError, EOFError) as err:
        raise CheckpointError(f"{path}: cannot read its weights ({type(err).__name__}: {_first_line(err)})") from None
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or ())
        if keys:
            more = f", ... ({len(keys)} in all)" if len(keys) > MAX_LISTED_KEYS else ""
            problems.append(f"{kind.replace('_', ' ')}: {', '.join(keys[:MAX_LISTED_KEYS])}{more}")
    if problems:
        raise CheckpointError(f"{path}: the weights do not fit the model in config.json ({'; '.join(problems)})")
    return model


def _load_native(path: Path, family: str, dtype: torch.dtype | None, **kwargs):
    from transformers import AutoTokenizer

    try:  # the tokenizer first: a missing one is found before the weights load
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # a native model dir that kept THUDM's tokenizer files only
        if family in FAMILIES:
            try:
                tokenizer = build_tokenizer(path, family)
            except TokenizerError:
                raise CheckpointError(f"{path}: cannot load its tokenizer ({_first_line(err)})") from None
        else:
            raise CheckpointError(f"{path}: cannot load its tokenizer ({_first_line(err)})") from None
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
    attn = from_pretrained_kwargs.pop("attn_implementation", None)
    if family == "chatglm" and attn not in (None, "eager"):
        log.info("ChatGLM-6B (v1) uses its own attention; attn_implementation=%s ignored", attn)
        attn = None
    if checkpoint_kind(path) == "native":
        return _load_native(path, family, dtype, **from_pretrained_kwargs, **({"attn_implementation": attn} if attn else {}))
    if family == "hf":
        raise CheckpointError(f"{path / 'config.json'}: model_type 'chatglm' is THUDM's layout: use family chatglm, chatglm2, chatglm3 or glm4")
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
    _check_family(path, read_config(path), family)
    dst = cache_root() / "converted" / _fingerprint(path, family)

    def convert(tmp: Path) -> None:
        log.info("converting %s (%s) into %s", path, family, dst)
        convert_checkpoint(path, tmp, family)

    return build_once(dst, "conversion.json", convert)
