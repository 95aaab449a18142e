"""A quantized base (``model.quantization: null | 4bit | 8bit``): bitsandbytes NF4/FP4 or int8 weights, loaded through
transformers' ``BitsAndBytesConfig``. This module knows bitsandbytes and transformers, not the methods: which
method allows a quantized base, and what it keeps in full precision, is decided in ``methods/quantized_base.py``
from the ``Method`` record. Where bitsandbytes can run: CUDA, and the CPU with bitsandbytes >= 0.50 (checked here:
NF4 ``Linear4bit`` and int8 ``Linear8bitLt`` forwards and input gradients in bf16/fp32 on the CPU).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path

from glm_experiments.errors import UserError

KINDS = ("4bit", "8bit")
CPU_MIN_VERSION = (0, 50)  # the first bitsandbytes release whose CPU path was checked here


class QuantizationUnavailable(UserError, RuntimeError):
    """bitsandbytes missing, or no device it runs on: the user's to fix (one line)."""


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


def num_layers(model_cfg) -> int:
    """The model's transformer layers, from its config (before any weight loads)."""
    tiny = model_cfg.get("tiny")
    if model_cfg.family == "tiny" and tiny is not None:
        return int(tiny.num_hidden_layers)
    path = Path(str(model_cfg.path)).expanduser() / "config.json"
    if not path.is_file():
        raise UserError(f"model={model_cfg.name} needs model.path=<checkpoint directory>; {path} does not exist")
    config = json.loads(path.read_text(encoding="utf-8"))
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


def load_kwargs(quantization_config) -> dict:
    """``from_pretrained`` keyword arguments for a quantized load (bitsandbytes places the weights itself)."""
    if quantization_config is None:
        return {}
    import torch

    return {"quantization_config": quantization_config, "device_map": {"": 0} if torch.cuda.is_available() else "cpu"}


def is_quantized(model) -> bool:
    """A base loaded through bitsandbytes (4-bit or 8-bit), PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper's base
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
