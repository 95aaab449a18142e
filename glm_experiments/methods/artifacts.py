"""What a method writes and reads beside its weights: method.json (name, settings, format version), settings read from a config or a saved file, safetensors files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch

from glm_experiments.errors import MissingFileError, SettingError

METHOD_FILE = "method.json"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- config access
def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg.key`` for a dataclass / DictConfig / namespace, ``cfg[key]`` for a mapping, else default."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def settings_of(cfg: Any) -> dict[str, Any]:
    """A plain, JSON-able dict of a method config (DictConfig, dataclass, namespace or mapping)."""
    if cfg is None:
        return {}
    try:  # omegaconf is a dependency of the project, but keep this module importable without it
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return _jsonable(OmegaConf.to_container(cfg, resolve=True))
    except ImportError:  # pragma: no cover
        pass
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return _jsonable(dataclasses.asdict(cfg))
    if isinstance(cfg, Mapping):
        return _jsonable(dict(cfg))
    return _jsonable({k: v for k, v in vars(cfg).items() if not k.startswith("_")})


def _jsonable(obj: Any) -> Any:
    try:  # a ListConfig/DictConfig value read off a method config is not a list/Mapping
        from omegaconf import Container, OmegaConf

        if isinstance(obj, Container):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


# ----------------------------------------------------------------------------- method.json
def write_method_json(out_dir: Path, name: str, settings: Mapping[str, Any], **extra: Any) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"method": name, "format_version": FORMAT_VERSION, "settings": _jsonable(dict(settings))}
    payload.update(_jsonable(extra))
    path = out_dir / METHOD_FILE
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_method_json(in_dir: Path, expect: Optional[str | Iterable[str]] = None) -> dict[str, Any]:
    """Read ``in_dir/method.json``; with ``expect``, the saved method must be (one of) it."""
    path = Path(in_dir) / METHOD_FILE
    if not path.is_file():
        raise MissingFileError(f"{path} not found: {in_dir} is not a directory written by a method's save()")
    payload = json.loads(path.read_text(encoding="utf-8"))
    if expect is not None:
        allowed = {expect} if isinstance(expect, str) else set(expect)
        if payload.get("method") not in allowed:
            raise SettingError(
                f"{in_dir} holds a method={payload.get('method')} checkpoint, "
                f"but it is being loaded as method={'/'.join(sorted(allowed))}"
            )
    return payload


def check_settings(method: str, saved: Mapping[str, Any], cfg: Any, keys: Iterable[str], where: Any = "") -> None:
    """Raise a ValueError naming both values for every key whose configured value differs from the saved one."""
    if cfg is None:
        return
    diffs = []
    for key in keys:
        if key not in saved:
            continue
        want = _jsonable(cfg_get(cfg, key, saved[key]))
        have = saved[key]
        if _norm(want) != _norm(have):
            diffs.append(f"{key}: configured {want!r}, saved {have!r}")
    if diffs:
        raise SettingError(
            f"method={method}: the checkpoint {where} was saved with different settings ("
            + "; ".join(diffs)
            + "). Load it with the saved settings (or without a method config) or retrain."
        )


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise MissingFileError(f"{path} not found")
    return load_file(str(path))


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
