"""Which method may train on a quantized base and with what (``model.quantization``): the ``Method`` record's
``allows_quantized_base`` (full fine-tuning does not: it trains every base weight), ``base_quantization`` (what it
implies when ``model.quantization`` is null: qlora's ``4bit``) and ``full_precision_modules`` (module patterns kept
unquantized because the method trains them: freeze's layers), turned into the ``BitsAndBytesConfig`` the run loads
its base with (``models/quantization.py``)."""

from __future__ import annotations

from typing import Any

from glm_experiments.errors import UserError
from glm_experiments.models.quantization import bnb_config, device_supported, num_layers


def requested(cfg) -> str | None:
    """The quantization the run loads its base with: ``model.quantization``, else the method's own (qlora: 4bit)."""
    from glm_experiments.methods import get_method

    kind = cfg.model.get("quantization")
    return kind or get_method(cfg.method.name).base_quantization


def check(cfg) -> None:
    """Preflight (no weights read): the method allows a quantized base and bitsandbytes runs here."""
    from glm_experiments.methods import get_method

    kind = requested(cfg)
    if kind is None:
        return
    method = get_method(cfg.method.name)
    if not method.allows_quantized_base:
        raise UserError(f"method={method.name} cannot train on a quantized base (model.quantization={kind}): "
                        f"{method.not_quantizable_because}; use model.quantization=null or a method that freezes the base")
    if cfg.get("deepspeed") is not None and cfg.deepspeed.get("config"):
        raise UserError(f"model.quantization={kind} with deepspeed={cfg.deepspeed.name}: a bitsandbytes base under "
                        "DeepSpeed is not supported here (docs/distributed.md); use deepspeed=none")
    device_supported(kind)


def quantization_config(cfg) -> Any:
    """The BitsAndBytesConfig the run's base loads with, or None (``model.quantization`` null and the method implies
    none). Checks first (``check``), so a caller outside ``train.preflight`` gets the same one-line refusals."""
    kind = requested(cfg)
    if kind is None:
        return None
    check(cfg)
    from glm_experiments.methods import get_method

    method, m = get_method(cfg.method.name), cfg.model
    skip = method.full_precision_modules(cfg.method, num_layers(m))
    return bnb_config(kind, m.get("quant_type") or "nf4", bool(m.get("double_quant", True)),
                      m.get("quant_compute_dtype") or "bfloat16", skip)
