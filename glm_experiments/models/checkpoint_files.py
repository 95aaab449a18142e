"""Reading checkpoint directories: config.json, weight files (sharded or not, safetensors or pickles) and
strict ``from_pretrained``; every failure is a :class:`CheckpointError` naming the file and the key."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from glm_experiments.errors import UserError

log = logging.getLogger(__name__)


class CheckpointError(UserError, ValueError):
    """A checkpoint directory that cannot be loaded as asked; the message names the file and the key."""


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


MAX_LISTED_KEYS = 3


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0].strip()


def from_pretrained_strict(path: Path, **kwargs) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained``, strict like the THUDM path: a missing tensor would otherwise
    stay randomly initialised (and an unexpected one be dropped) with only a log line; an unreadable weight
    file is named instead of surfacing as a library traceback."""
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    import glm_experiments.models.chatglm.modeling  # noqa: F401  (registers model_type chatglm_v1)

    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, SafetensorError, pickle.UnpicklingError, EOFError) as err:
        raise CheckpointError(f"{path}: cannot read its weights ({type(err).__name__}: {first_line(err)})") from None
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or ())
        if keys:
            more = f", ... ({len(keys)} in all)" if len(keys) > MAX_LISTED_KEYS else ""
            problems.append(f"{kind.replace('_', ' ')}: {', '.join(keys[:MAX_LISTED_KEYS])}{more}")
    if problems:
        raise CheckpointError(f"{path}: the weights do not fit the model in config.json ({'; '.join(problems)})")
    return model
