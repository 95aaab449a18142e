"""Rank helpers for code that runs the same in one process and under torchrun (DDP / DeepSpeed).

Everything here is a no-op (rank 0 of 1) when torch.distributed is not initialised, so train.py reads
the same in-process and in a torchrun worker (glm_experiments.scale.worker initialises the process group).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def is_main() -> bool:
    """The one process that logs to MLflow and writes run products."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextmanager
def local_main_first():
    """Local rank 0 of every node does the body first (fills per-node caches: tokenised data, converted weights)."""
    if not is_distributed():
        yield
        return
    if local_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        if local_rank() == 0:
            dist.barrier()


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; None elsewhere. Collective: all ranks call it."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank. Collective: all ranks call it."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def zero3_partitioned(model: torch.nn.Module) -> bool:
    """True once DeepSpeed ZeRO-3 has split the parameters across ranks: every forward is then collective."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def gathered(params: list[torch.nn.Parameter]):
    """Context in which ZeRO-3 partitioned ``params`` hold their full tensors on every rank (collective)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
