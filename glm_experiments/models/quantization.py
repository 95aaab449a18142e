"""A quantized base (``model.quantization: null | 4bit | 8bit``): bitsandbytes NF4/FP4 or int8 weights, loaded through
transformers' ``BitsAndBytesConfig``, under any method whose ``Method`` record allows a frozen quantized base.

What a method declares (``methods/base.py``): ``allows_quantized_base`` (full fine-tuning does not: it trains every
base weight), ``base_quantization`` (the quantization it implies when ``model.quantization`` is null: qlora's
``4bit``) and ``full_precision_modules`` (module patterns that stay unquantized because the method trains them:
freeze's layers). Where bitsandbytes can run: CUDA, and the CPU with bitsandbytes >= 0.50 (checked here: NF4
``Linear4bit`` and int8 ``Linear8bitLt`` forwards and input gradients in bf16/fp32 on the CPU).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from glm_experiments.errors import UserError

KINDS = ("4bit", "8bit")
CPU_MIN_VERSION = (0, 50)  # the first bitsandbytes release whose CPU path was checked here


class QuantizationUnavailable(UserError, RuntimeError):
    """bitsandbytes missing, or no device it runs on: the user's to fix (one line)."""


def requested(cfg) -> str | None:
    """The quantization the run loads its base with: ``model.quantization``, else the method's own (qlora: 4bit)."""
    from glm_experiments.methods import get_method

    kind = cfg.model.get("quantization")
    return kind or get_method(cfg.method.name).base_quantization


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def device_supported(kind: str) -> None:
    """Raise a one-line QuantizationUnavailable unless bitsandbytes is installed and runs ``kind`` on this machine."""
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailable(f"model.quantization={kind} needs bitsandbytes, which is not installed "
                                      "(pip install -e '.[qlora]'), or use model.quantization=null")
    if torch.cuda.is_available():
        return
    version = importlib.metadata.version("bitsandbytes")
    if _version(version) < CPU_MIN_VERSION:
        raise QuantizationUnavailable(
            f"model.quantization={kind}: no CUDA GPU here and bitsandbytes {version} has no CPU path "
            f"(>= {'.'.join(map(str, CPU_MIN_VERSION))} runs 4-bit and 8-bit layers on the CPU): "
            "pip install -U bitsandbytes, or use model.quantization=null")


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
    device_supported(kind)


def num_layers(model_cfg) -> int:
    """The model's transformer layers, from its config (before any weight loads)."""
    tiny = model_cfg.get("tiny")
    if model_cfg.family == "tiny" and tiny is not None:
        return int(tiny.num_hidden_layers)
    from glm_experiments.models.loading import checkpoint_dir

    config = json.loads((checkpoint_dir(model_cfg) / "config.json").read_text(encoding="utf-8"))
    for key in ("num_hidden_layers", "num_layers", "n_layer"):
        if key in config:
            return int(config[key])
    raise UserError(f"{Path(model_cfg.path) / 'config.json'}: no num_hidden_layers / num_layers key")


def bnb_config(kind: str, quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "bfloat16",
               skip_modules: list[str] | None = None):
    """transformers' BitsAndBytesConfig for ``kind`` (4bit: NF4/FP4 with ``compute_dtype``; 8bit: LLM.int8);
    ``skip_modules`` (+ the output head) stay in full precision."""
    from transformers import BitsAndBytesConfig

    from glm_experiments.constants import TORCH_DTYPES

    if kind not in KINDS:
        raise UserError(f"model.quantization={kind}: expected null, 4bit or 8bit")
    skip = ["lm_head", *(skip_modules or [])]
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=TORCH_DTYPES[compute_dtype], llm_int8_skip_modules=skip)


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


def load_kwargs(quantization_config) -> dict:
    """``from_pretrained`` keyword arguments for a quantized load (bitsandbytes places the weights itself)."""
    if quantization_config is None:
        return {}
    import torch

    return {"quantization_config": quantization_config, "device_map": {"": 0} if torch.cuda.is_available() else "cpu"}


def is_quantized(model) -> bool:
    """A base loaded through bitsandbytes (4-bit or 8-bit), PEFT-wrapped or not."""
    from glm_experiments.methods.base import unwrap_peft

    base = unwrap_peft(model)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
                or getattr(getattr(base, "config", None), "quantization_config", None) is not None)


def one_cpu_path(model) -> None:
    """bitsandbytes 0.50 repacks a 4-bit weight in place for an AVX512-BF16 kernel the first time it runs on the
    CPU without gradients (evaluation); that kernel asserts out_features % 32 == 0 and in_features % blocksize == 0
    (the tiny model's 688 x 128 gate_up does not fit), and a repacked layer then fails in training (an in-place add
    of its bias). Every ``Linear4bit`` keeps the generic path, for evaluation and training alike."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
