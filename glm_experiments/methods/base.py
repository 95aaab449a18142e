"""The contract every fine-tuning method declares, and the helpers the methods share.

A method is one module ``glm_experiments.methods.<name>`` that ends with ``register(Method(...))``: the
record below says everything the rest of the project may ask of it. Every ability is a field with a
default, so a caller asks the record (``method.packable``, ``method.merge(model)``) and never probes a module
with ``hasattr`` or keeps a list of method names. The functions a module hands over:

    apply(model, cfg, tokenizer=None) -> model
        Make ``model`` trainable the method's way (freeze the base, add adapters / prefixes / soft
        prompts). ``cfg`` is the method config (``conf/method/<name>.yaml``; attribute access).
    save(model, out_dir: Path, cfg) -> None
        Write only the trainable part, plus ``method.json`` = {"method": name, "settings": {...}}.
    load(model, in_dir: Path, cfg=None) -> model
        Re-apply the method to a fresh base model and load the saved weights. With a ``cfg``,
        settings that change the saved tensors' meaning (pre_seq_len, r, ...) must equal the saved
        ones, otherwise a ValueError names both values. Without one, the saved settings are used.

Adding a method = its module (with its schema, registered here) + ``conf/method/<name>.yaml``; nothing else.

The code is generic over "a decoder-only ``PreTrainedModel`` whose config has num_hidden_layers,
num_key_value_heads and head_dim" (native ``GlmForCausalLM``, and any class with the same shape).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import nn

from glm_experiments.errors import UserError

METHOD_FILE = "method.json"
FORMAT_VERSION = 1


def _no_full_precision_modules(cfg: Any, num_layers: int) -> list[str]:
    return []


@dataclasses.dataclass(frozen=True)
class Method:
    """What one fine-tuning method is and can do; see the module docstring."""

    name: str
    schema: type  # its config dataclass; stored in Hydra's ConfigStore as method/base_<name>
    apply: Callable[..., nn.Module]
    save: Callable[..., None]
    load: Callable[..., nn.Module]
    # model (loaded by ``load`` onto an unquantised base) -> a plain model computing the same; None: not mergeable
    merge_into_base: Optional[Callable[[nn.Module], nn.Module]] = None
    not_mergeable_because: str = ""
    # train.packing=true puts several samples in one row: fine unless the method adds per-row virtual tokens
    packable: bool = True
    # the base may be loaded quantized (model.quantization, models/quantization.py): the method keeps it frozen
    allows_quantized_base: bool = True
    not_quantizable_because: str = ""
    # the quantization the method loads its base with when model.quantization is null (qlora: "4bit")
    base_quantization: Optional[str] = None
    # (cfg, the model's layer count) -> module patterns kept in full precision on a quantized base because the
    # method trains them (freeze: its layers); transformers' llm_int8_skip_modules syntax
    full_precision_modules: Callable[[Any, int], list[str]] = _no_full_precision_modules
    # save() writes the whole model (full fine-tuning): under ZeRO-3 it is gathered as a full state dict
    saves_whole_model: bool = False

    def merge(self, model: nn.Module) -> nn.Module:
        if self.merge_into_base is None:
            raise UserError(f"method={self.name} cannot be merged into plain weights: {self.not_mergeable_because}")
        return self.merge_into_base(model)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` known to ``get_method`` and its schema known to Hydra (``base_<name>`` in group method)."""
    from hydra.core.config_store import ConfigStore

    REGISTRY[method.name] = method
    ConfigStore.instance().store(group="method", name=f"base_{method.name}", node=method.schema)
    return method


def is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The model a PEFT wrapper (LoRA, DoRA, QLoRA) adapts, or ``model`` itself."""
    return model.get_base_model() if is_peft_model(model) else model


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
        raise FileNotFoundError(f"{path} not found: {in_dir} is not a directory written by a method's save()")
    payload = json.loads(path.read_text(encoding="utf-8"))
    if expect is not None:
        allowed = {expect} if isinstance(expect, str) else set(expect)
        if payload.get("method") not in allowed:
            raise ValueError(
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
        raise ValueError(
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


# ----------------------------------------------------------------------------- parameters
def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, detached, contiguous, on CPU (ready for safetensors)."""
    return {
        name: p.detach().to("cpu").contiguous().clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def _param_numel(p: torch.Tensor) -> int:
    n = p.numel()
    # bitsandbytes packs two 4-bit values per byte: count the logical number of weights
    if p.__class__.__name__ == "Params4bit":
        itemsize = getattr(getattr(p, "quant_storage", None), "itemsize", None) or p.element_size()
        n = n * 2 * itemsize
    return n


def trainable_summary(model: nn.Module) -> dict[str, Any]:
    """dict(trainable=int, total=int, pct=float) over unique parameters (tied weights count once)."""
    trainable = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = _param_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    pct = 100.0 * trainable / total if total else 0.0
    return {"trainable": trainable, "total": total, "pct": pct}


def model_dims(model: nn.Module) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) of a decoder-only model, from its config."""
    config = model.config
    num_layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(num_layers), int(kv_heads), int(head_dim)


def input_embeddings(model: nn.Module) -> nn.Embedding:
    emb = model.get_input_embeddings()
    if emb is None:
        raise ValueError(f"{type(model).__name__} has no input embeddings")
    return emb


# ----------------------------------------------------------------------------- prefix plumbing
def real_position_ids(
    attention_mask: Optional[torch.Tensor],
    q_len: int,
    past_real_len: int,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Position ids of the ``q_len`` newest *real* tokens (learned prefixes not counted).

    With a 2D padding mask (covering past + new real tokens, no prefix) positions count only the
    attended tokens, so a left-padded sample gets the same positions as when it is alone (padding
    slots get 0, as ``generate`` does). Without a mask they continue from ``past_real_len``.
    """
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] >= q_len:
        mask = attention_mask.to(device=device, dtype=torch.long)
        pos = mask.cumsum(-1) - 1
        pos = pos.masked_fill(mask == 0, 0)
        return pos[:, -q_len:]
    pos = torch.arange(past_real_len, past_real_len + q_len, device=device, dtype=torch.long)
    return pos.unsqueeze(0).expand(batch_size, -1)


def extend_mask_left(attention_mask: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """Prepend ``n`` attended positions (ones) to a 2D mask; 4D masks and None pass through."""
    if attention_mask is None or attention_mask.dim() != 2 or n == 0:
        return attention_mask
    ones = torch.ones(attention_mask.shape[0], n, dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([ones, attention_mask], dim=1)


def query_shape(input_ids, inputs_embeds, method: str) -> tuple[int, int, torch.device]:
    """(batch, query length, device) of a forward call given ids or embeddings (methods adding virtual tokens)."""
    ref = input_ids if input_ids is not None else inputs_embeds
    if ref is None:
        raise ValueError(f"method={method}: forward needs input_ids or inputs_embeds")
    return ref.shape[0], ref.shape[1], ref.device


def split_virtual_mask(
    attention_mask: Optional[torch.Tensor], past_real: int, q_len: int, n_virtual: int, method: str
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(mask over virtual + real positions, mask over the real ones only) from a 2D padding mask given
    either way (generate() passes one without the virtual positions, a caller may include them)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask, None
    real_len = past_real + q_len
    if attention_mask.shape[1] == real_len:
        return extend_mask_left(attention_mask, n_virtual), attention_mask
    if attention_mask.shape[1] == real_len + n_virtual:
        return attention_mask, attention_mask[:, n_virtual:]
    raise ValueError(
        f"method={method}: attention_mask has {attention_mask.shape[1]} columns; expected {real_len} "
        f"(past + new tokens) or {real_len + n_virtual} (with the {n_virtual} virtual positions)"
    )


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found")
    return load_file(str(path))


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


# ----------------------------------------------------------------------------- instance overrides
def override_method(model: nn.Module, name: str, impl) -> None:
    """Install ``impl(self, original, *args, **kwargs)`` as ``model.<name>`` on this instance only.

    ``original`` is whatever ``model.<name>`` was before (an earlier instance override, else the
    class's method), bound to the model being called, so ``copy.deepcopy(model)`` gives a copy
    whose override works on the copy. ``inspect.signature(model.<name>)`` stays the original's
    (``generate`` and the Trainer read it).
    """
    import inspect
    import types

    previous_key = f"_glm_experiments_previous_{name}"
    previous = model.__dict__.get(name)
    object.__setattr__(model, previous_key, previous)

    def method(self, *args, **kwargs):
        prev = self.__dict__.get(previous_key)
        original = prev if prev is not None else types.MethodType(getattr(type(self), name), self)
        return impl(self, original, *args, **kwargs)

    if previous is not None:
        params = list(inspect.signature(previous).parameters.values())
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        method.__signature__ = inspect.Signature([self_param, *params])
    else:
        method.__signature__ = inspect.signature(getattr(type(model), name))
    original_func = getattr(type(model), name)
    method.__name__ = getattr(original_func, "__name__", name)
    method.__doc__ = getattr(original_func, "__doc__", None)
    object.__setattr__(model, name, types.MethodType(method, model))
