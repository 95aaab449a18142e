"""One checked reader for every file the project reads back: a damaged file is one line naming it and what is
wrong (``CorruptFileError``, a UserError: exit 2), never a traceback, and a pickle is never unpickled.

* ``read_json`` / ``read_json_object``: method.json, adapter_config.json, trainer_state.json, result.json;
  ``check_tokenizer_files``: tokenizer.json, tokenizer_config.json and the other tokenizer JSON files;
* ``safetensors_header``: the header of a safetensors file checked against the file's size (truncated,
  random or empty files are caught before safetensors or torch touch them), without importing torch;
  ``load_safetensors``: the checked header, then the tensors;
* ``check_torch_file``: optimizer.pt, scheduler.pt, rng_state.pth: a torch.save archive loaded with
  ``weights_only=True`` (a pickle payload is refused, and said so); ``quick=True`` checks only the archive
  structure (no torch: the Hydra process refuses at once);
* ``checkpoint_damage``: what is wrong with a training checkpoint (None: intact), for resume=auto's fallback;
* ``check_adapter_dir``: a saved adapter (ours or PEFT's) before it is loaded onto a base: its files, its
  ``peft_type``, and every LoRA tensor's shape against the base model's layer.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path
from typing import Any

from glm_experiments.errors import UserError

# bytes per element of each safetensors dtype
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_MAX_HEADER = 100 * 2**20


class CorruptFileError(UserError, ValueError):
    """A file the project reads back is missing, damaged or not what it should be (a ValueError too, so that
    callers that turn a load's ValueError into one line keep doing so)."""


def _corrupt(path: Path, what: str) -> CorruptFileError:
    return CorruptFileError(f"{path}: {what}")


# ----------------------------------------------------------------------------- JSON
def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _corrupt(path, "not found") from None
    except UnicodeDecodeError:
        raise _corrupt(path, "not a text (UTF-8) file: damaged or not JSON") from None
    if not text.strip():
        raise _corrupt(path, "empty file (expected JSON)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _corrupt(path, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def read_json_object(path: Path, required: tuple[str, ...] = ()) -> dict:
    payload = read_json(path)
    if not isinstance(payload, dict):
        raise _corrupt(Path(path), f"expected a JSON object, found {type(payload).__name__}")
    missing = [key for key in required if key not in payload]
    if missing:
        raise _corrupt(Path(path), f"no {', '.join(repr(k) for k in missing)} in it")
    return payload


# the JSON files of a tokenizer in transformers' format (tokenizer.model files are parsed by models/tokenizers.py)
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def check_tokenizer_files(directory: Path) -> None:
    """Each tokenizer JSON file in ``directory`` is a readable JSON object: a damaged one is named, instead of
    the tokenizers library's message about the directory."""
    for name in TOKENIZER_JSON:
        if (Path(directory) / name).is_file():
            read_json_object(Path(directory) / name)


# ----------------------------------------------------------------------------- safetensors
def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of a safetensors file whose header and size agree; CorruptFileError otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            raw = handle.read(length) if length is not None and 0 < length <= min(size - 8, _MAX_HEADER) else None
    except FileNotFoundError:
        raise _corrupt(path, "not found") from None
    if size == 0:
        raise _corrupt(path, "empty file (0 bytes): not a safetensors file")
    if length is None:
        raise _corrupt(path, f"{size} bytes: too short for a safetensors header (truncated?)")
    if raw is None:
        raise _corrupt(path, f"not a safetensors file (its header claims {length} bytes of a {size}-byte file: "
                             "truncated, damaged or another format)")
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError):
        raise _corrupt(path, "not a safetensors file (its header is not JSON: damaged or another format)") from None
    tensors, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
            expected = math.prod(shape) * _DTYPE_BYTES.get(dtype, 0)
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"damaged safetensors header (entry {name!r})") from None
        if dtype in _DTYPE_BYTES and stop - start != expected:
            raise _corrupt(path, f"damaged safetensors header ({name!r}: {stop - start} bytes for shape {list(shape)})")
        tensors[name] = (dtype, shape)
        end = max(end, int(stop))
    if 8 + length + end > size:
        raise _corrupt(path, f"truncated: {size} bytes, its header needs {8 + length + end}")
    return tensors


def load_safetensors(path: Path) -> dict:
    """The tensors of a checked safetensors file (on the CPU)."""
    safetensors_header(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _corrupt(Path(path), f"cannot be read as safetensors ({str(exc).splitlines()[0]})") from None


# ----------------------------------------------------------------------------- torch.save files
def check_torch_file(path: Path, quick: bool = False) -> Any:
    """A torch.save archive loaded with ``weights_only=True`` (returned), or with ``quick`` only its zip
    structure checked; a pickle payload (anything ``weights_only`` refuses) is never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise _corrupt(path, "not found")
    if path.stat().st_size == 0:
        raise _corrupt(path, "empty file (0 bytes)")
    if not zipfile.is_zipfile(path):
        raise _corrupt(path, "not a torch.save archive (truncated, damaged, or a bare pickle, which is never "
                             "loaded)")
    if quick:
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise _corrupt(path, f"damaged torch.save archive ({exc})") from None
        if not any(name.endswith("data.pkl") for name in names):
            raise _corrupt(path, "not a torch.save archive (no data.pkl in it)")
        return None
    import pickle

    import torch
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():  # what transformers' Trainer allows in rng_state.pth (numpy's RNG state)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise _corrupt(path, "refused: it holds Python objects, not only tensors (a pickle payload); it is "
                                 "never unpickled") from None
        raise _corrupt(path, f"damaged torch.save archive ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # noqa: BLE001 - zip CRC errors, truncated records, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _corrupt(path, f"damaged torch.save archive ({first})") from None


# ----------------------------------------------------------------------------- checkpoints
TRAINABLE_FILE = "trainable.safetensors"
TORCH_STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt")


def checkpoint_damage(checkpoint: Path, quick: bool = False) -> str | None:
    """What is wrong with a training checkpoint (one line naming the file), or None when it is intact."""
    checkpoint = Path(checkpoint)
    try:
        state = read_json_object(checkpoint / "trainer_state.json", required=("global_step",))
        if not isinstance(state["global_step"], int):
            raise _corrupt(checkpoint / "trainer_state.json", "global_step is not a number")
        trainable = checkpoint / TRAINABLE_FILE
        if trainable.exists() or not (checkpoint / "model.safetensors").exists():
            safetensors_header(trainable)
        for path in sorted(checkpoint.iterdir()):
            if path.name in TORCH_STATE_FILES or (path.name.startswith("rng_state") and path.suffix == ".pth"):
                check_torch_file(path, quick=quick)
    except CorruptFileError as exc:
        return str(exc)
    return None


# ----------------------------------------------------------------------------- adapters
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def check_adapter_dir(adapter_dir: Path, base_model=None) -> None:
    """A saved adapter, checked before it is loaded: method.json (where ours), adapter_config.json (a known
    peft_type), the weights file (safetensors checked; a .bin is a pickle: loaded with weights_only only), and
    with ``base_model`` every LoRA tensor's shape against the layer it adapts."""
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "method.json").exists():
        read_json_object(adapter_dir / "method.json", required=("method",))
    config_path = adapter_dir / "adapter_config.json"
    config = None
    if config_path.exists():
        config = read_json_object(config_path, required=("peft_type",))
        from peft import PeftType

        known = [t.value for t in PeftType]
        if config["peft_type"] not in known:
            raise _corrupt(config_path, f"unknown peft_type {config['peft_type']!r} (known: {', '.join(known)})")
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.exists():
        shapes = {name: shape for name, (_, shape) in safetensors_header(weights).items()}
    elif (adapter_dir / "adapter_model.bin").exists():
        state = check_torch_file(adapter_dir / "adapter_model.bin")
        if not isinstance(state, dict):
            raise _corrupt(adapter_dir / "adapter_model.bin", "not a state dict")
        shapes = {name: tuple(t.shape) for name, t in state.items() if hasattr(t, "shape")}
    else:
        shapes = None
    if config is not None and config.get("peft_type") == "LORA" and shapes is not None:
        _check_lora_shapes(weights if weights.exists() else adapter_dir / "adapter_model.bin", config, shapes,
                           base_model)


def _check_lora_shapes(path: Path, config: dict, shapes: dict, base_model) -> None:
    rank_pattern = config.get("rank_pattern") or {}
    r = config.get("r")
    modules = dict(base_model.named_modules()) if base_model is not None else {}
    for name, shape in shapes.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker not in name or len(shape) != 2:
                continue
            module_path = name.split(marker)[0]
            want_r = next((v for k, v in rank_pattern.items() if module_path.endswith(k)), r)
            got_r = shape[0] if part == "lora_A" else shape[1]
            if want_r is not None and got_r != want_r:
                raise _corrupt(path, f"{name} has rank {got_r}, but adapter_config.json says r={want_r}")
            if not modules:
                continue
            base = _base_layer(modules, module_path)
            if base is None:
                raise _corrupt(path, f"{name}: the base model has no layer {module_path!r} (an adapter for "
                                     "another model?)")
            width = getattr(base, "in_features", None) if part == "lora_A" else getattr(base, "out_features", None)
            got = shape[1] if part == "lora_A" else shape[0]
            if width is not None and got != width:
                side = "input" if part == "lora_A" else "output"
                raise _corrupt(path, f"{name} is {list(shape)}, but the base layer {module_path} has {side} width "
                                     f"{width}: an adapter made for another model shape")


def _base_layer(modules: dict, module_path: str):
    """The base model's layer a saved LoRA key names (PEFT saves ``base_model.model.<path>``)."""
    candidates = [module_path]
    for prefix in ("base_model.model.", "base_model."):
        if module_path.startswith(prefix):
            candidates.append(module_path[len(prefix):])
    for candidate in candidates:
        if candidate in modules:
            module = modules[candidate]
            return getattr(module, "base_layer", module)
    return None
