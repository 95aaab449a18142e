"""Chunked causal-LM cross-entropy for ChatGLM's large vocabulary (``train.loss_chunk_size``).

transformers' causal LMs materialise logits for *every* position (``batch x seq x vocab``) and upcast them
to fp32 inside the loss; autograd keeps them and the log-softmax for the backward pass. With ChatGLM's
65,024-token vocabulary that is ~0.25 MiB per token, 1 GiB for bs 4 x len 1024: more than several
transformer layers' activations. The chunked loss instead

* keeps only the positions that carry a label (an SFT prompt needs no logits at all),
* computes their logits chunk by chunk under ``torch.utils.checkpoint``, so no chunk's logits survive
  to the backward pass (each is recomputed there, one at a time).

It equals transformers' ``ForCausalLMLoss`` (labels shifted by one, sum over supervised tokens divided by
``num_items_in_batch`` or by their count). Hand-written because no maintained library on this stack does it
for CPU and CUDA alike (Liger's fused kernel is Triton/CUDA only and patches model classes).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from glm_experiments.constants import IGNORE_INDEX
from glm_experiments.errors import UserError


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.t()
    # half precision is upcast as transformers does; float64 stays float64
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE_INDEX)


def supervised_positions(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the rows that carry a label (bench/memory_trace.py keeps all: its tensors hold no data to select by)."""
    keep = targets != IGNORE_INDEX
    return hidden[keep], targets[keep]


def chunked_causal_lm_loss(hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                           chunk_size: int = 1024, num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden_states @ lm_head_weight.T`` against ``labels`` (shifted)."""
    hidden = hidden_states[:, :-1, :].reshape(-1, hidden_states.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    hidden, targets = supervised_positions(hidden, targets)
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, targets.numel(), chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or lm_head_weight.requires_grad):
            total = total + checkpoint(_chunk_loss, h, lm_head_weight, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, lm_head_weight, t)
    denominator = num_items_in_batch if num_items_in_batch is not None else max(int(targets.numel()), 1)
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return total / denominator


@contextmanager
def chunked_loss(model, chunk_size: int):
    """Within the block, ``model(..., labels=...)`` computes its loss with :func:`chunked_causal_lm_loss`.

    ``model`` is a causal LM (``GlmForCausalLM``, ``ChatGLMv1ForCausalLM``) or a PEFT model wrapping one; the
    class that owns the output head and calls ``self.loss_function`` is the wrapped one. Its head is told to record its input and return a 1-wide placeholder
    instead of the full logits, and its ``loss_function`` computes the chunked loss from that input. Every
    wrapper above it (PEFT adapters and virtual tokens, P-Tuning v2's prefix, Trainer's loss scaling for
    gradient accumulation and ``num_items_in_batch``) works as before. Outputs carry no real logits.
    """
    from glm_experiments.methods.record import unwrap_peft

    causal_lm = unwrap_peft(model)
    head = causal_lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or not head.weight.is_floating_point():
        # an adapted (LoRA on the head), quantised or biased head: its weight alone is not what it computes
        raise UserError(f"train.loss_chunk_size needs a plain bias-free Linear output head; this model's is {type(head).__name__}")
    captured: list[torch.Tensor] = []

    def record_hidden(hidden: torch.Tensor) -> torch.Tensor:
        captured.append(hidden)
        return hidden.new_zeros(*hidden.shape[:-1], 1)

    def loss_function(logits=None, labels=None, vocab_size=None, num_items_in_batch=None, **_):
        return chunked_causal_lm_loss(captured.pop(), head.weight, labels, chunk_size, num_items_in_batch)

    had_own_loss = "_loss_function" in causal_lm.__dict__
    previous_loss = causal_lm.__dict__.get("_loss_function")
    head.forward = record_hidden  # an instance attribute shadows the class's forward for this block only
    causal_lm.loss_function = loss_function
    try:
        yield
    finally:
        del head.forward
        if had_own_loss:
            causal_lm.loss_function = previous_loss
        else:
            del causal_lm._loss_function
        captured.clear()
