"""Constants and paths every part of the project shares (one definition each)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# the directory holding conf/ and data/ (relative data paths in configs are tried against it)
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# the label that carries no loss (transformers' and torch's cross-entropy ignore_index)
IGNORE_INDEX = -100
# config spellings of the floating-point dtypes
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_root() -> Path:
    """Where the tiny model, converted checkpoints and tokenised data are cached ($GLM_EXPERIMENTS_CACHE)."""
    return Path(os.environ.get("GLM_EXPERIMENTS_CACHE", Path.home() / ".cache" / "glm_experiments"))
