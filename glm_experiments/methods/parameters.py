"""Which parameters train and how many: freezing, the trainable state dict, the summary every run logs, model dimensions."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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
