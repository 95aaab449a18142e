"""LoRA through PEFT.

``target_modules``: ``[]`` = the model class's default (``Architecture.lora_targets`` of its family: native GLM
q_proj, k_proj, v_proj, o_proj; ChatGLM-6B query_key_value), ``["all-linear"]`` = every linear
layer but the output head, otherwise the module names given.

Saved with PEFT's ``save_pretrained`` (adapter weights + adapter_config.json only) + ``method.json``;
loaded with ``PeftModel.from_pretrained``; ``merge`` = ``merge_and_unload``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from torch import nn

from glm_experiments.compat import silence_known_renames
from glm_experiments.config.ranges import AT_LEAST_1, POSITIVE, PROBABILITY, one_of, ranged
from glm_experiments.config.schema import MethodConfig
from glm_experiments.errors import SettingError
from glm_experiments.methods.artifacts import cfg_get, check_settings, read_method_json, write_method_json
from glm_experiments.methods.record import Method, is_peft_model, register, unwrap_peft
from glm_experiments.models.family import architecture_of


@dataclass
class LoraMethodConfig(MethodConfig):
    r: int = ranged(8, **AT_LEAST_1)
    alpha: int = ranged(32, **POSITIVE)
    dropout: float = ranged(0.05, **PROBABILITY)
    # ["all-linear"] or module names; empty = the family's default
    target_modules: list[str] = field(default_factory=list)
    bias: str = one_of("none", "none", "all", "lora_only")
    # start from this adapter (ours, or a THUDM/PEFT one: converted on the fly) instead of a fresh LoRA
    init_from: Optional[str] = None


silence_known_renames()  # peft calls transformers' deprecated is_gradient_checkpointing on every wrap and load

NAME = "lora"
DEFAULTS = LoraMethodConfig()  # the schema owns every default
# checkpoints written by either method hold a plain LoRA adapter
COMPATIBLE = ("lora", "qlora")


def default_target_modules(model: nn.Module) -> list[str]:
    return list(architecture_of(model).lora_targets)


def resolve_target_modules(model: nn.Module, cfg: Any) -> list[str] | str:
    targets = list(cfg_get(cfg, "target_modules", None) or [])
    if not targets:
        return default_target_modules(model)
    if targets == ["all-linear"]:
        return "all-linear"
    if "all-linear" in targets:
        raise SettingError(f"method.target_modules={targets}: 'all-linear' must be the only entry")
    return targets


def check_targets_exist(model: nn.Module, targets: list[str] | str) -> None:
    """Every ``method.target_modules`` entry names modules of this model (PEFT refuses only when none does,
    and silently skips the others): one line naming the entry and the model's linear layers."""
    if isinstance(targets, str):
        return
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        linear = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise SettingError(f"method.target_modules={list(targets)}: the model has no module named {', '.join(missing)} "
                        f"(its linear layers: {', '.join(linear)}; or all-linear)")


def lora_config(model: nn.Module, cfg: Any):
    from peft import LoraConfig, TaskType

    targets = resolve_target_modules(model, cfg)
    check_targets_exist(model, targets)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=int(cfg_get(cfg, "r", DEFAULTS.r)),
        lora_alpha=int(cfg_get(cfg, "alpha", DEFAULTS.alpha)),
        lora_dropout=float(cfg_get(cfg, "dropout", DEFAULTS.dropout)),
        target_modules=targets,
        bias=str(cfg_get(cfg, "bias", DEFAULTS.bias)),
    )


def apply(model: nn.Module, cfg: Any, tokenizer: Any = None) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, cfg))


def _settings(model: nn.Module, cfg: Any) -> dict:
    targets = resolve_target_modules(unwrap_peft(model), cfg)
    return {
        "r": int(cfg_get(cfg, "r", DEFAULTS.r)),
        "alpha": int(cfg_get(cfg, "alpha", DEFAULTS.alpha)),
        "dropout": float(cfg_get(cfg, "dropout", DEFAULTS.dropout)),
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "bias": str(cfg_get(cfg, "bias", DEFAULTS.bias)),
    }


def save(model: nn.Module, out_dir: Path, cfg: Any, *, name: str = NAME) -> None:
    if not is_peft_model(model):
        raise ValueError(f"method={name}: save() needs the PeftModel returned by apply()/load()")
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    settings = _settings(model, cfg) if cfg is not None else _settings_from_peft(model)
    write_method_json(out_dir, name, settings)


def _settings_from_peft(model: nn.Module) -> dict:
    pc = model.peft_config["default"]
    targets = pc.target_modules
    return {
        "r": pc.r,
        "alpha": pc.lora_alpha,
        "dropout": pc.lora_dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "bias": pc.bias,
    }


def load(model: nn.Module, in_dir: Path, cfg: Any = None, *, is_trainable: bool = False, name: str = NAME) -> nn.Module:
    """Wrap the fresh base ``model`` with the adapter in ``in_dir`` (frozen unless ``is_trainable``)."""
    from peft import PeftModel

    in_dir = Path(in_dir)
    saved = read_method_json(in_dir, {name, *COMPATIBLE})["settings"]
    if cfg is not None:
        want = dict(saved)
        want.update({k: v for k, v in _settings(model, cfg).items() if k in ("r", "alpha", "bias", "target_modules")})
        check_settings(name, saved, want, ["r", "alpha", "bias", "target_modules"], where=str(in_dir))
    return PeftModel.from_pretrained(model, str(in_dir), is_trainable=is_trainable)


def merge(model: nn.Module) -> nn.Module:
    """Fold the LoRA weights into the base and return the plain base model."""
    if not is_peft_model(model):
        raise ValueError("method=lora: merge() needs the PeftModel returned by apply()/load()")
    return model.merge_and_unload()


METHOD = register(Method(NAME, LoraMethodConfig, apply, save, load, merge_into_base=merge))
