"""Chunked causal-LM cross-entropy for a large vocabulary (a bench/ helper, not part of glm_experiments).

transformers' ``GlmForCausalLM`` materialises logits for *every* position (``batch x seq x vocab``), then
upcasts them to fp32 inside the loss; autograd keeps them (and the log-softmax) for the backward pass.
With ChatGLM's 65,024-token vocabulary that is ~0.25 MiB per token in fp32 - 1 GiB for bs 4 x len 1024,
more than the activations of several transformer layers.

:func:`chunked_causal_lm_loss` instead

* keeps only the positions that carry a label (prompt tokens of an SFT sample need no logits at all),
* computes logits chunk by chunk under ``torch.utils.checkpoint`` so that no chunk's logits survive
  to the backward pass (they are recomputed there, one chunk at a time).

It returns the same value as transformers' ``ForCausalLMLoss`` (mean over supervised tokens, labels shifted by
one). Wiring it into a Trainer means overriding ``compute_loss`` to call ``model.model(...)`` (the decoder
without the head) and this function with ``model.lm_head.weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.t()
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden_states @ lm_head_weight.T`` against ``labels`` (shifted)."""
    hidden = hidden_states[:, :-1, :].reshape(-1, hidden_states.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or lm_head_weight.requires_grad):
            total = total + checkpoint(_chunk_loss, h, lm_head_weight, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, lm_head_weight, t)
    denominator = num_items_in_batch if num_items_in_batch is not None else max(int(targets.numel()), 1)
    return total / denominator
