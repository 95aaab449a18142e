"""Constants and paths every part of the project shares (one definition each)."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def preserved_rng():
    """Python's, NumPy's and torch's random state as they were before the block (whatever it draws or seeds)."""
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def build_once(dst: Path, done_file: str, build) -> Path:
    """``dst``, made by ``build(tmp_dir)`` the first time (``dst/done_file`` marks it complete).

    Concurrent callers (sweep jobs, ranks) wait on a file lock; the build happens in a temporary directory beside
    ``dst`` that is renamed at the end, so a killed build never looks finished. The build leaves the caller's
    random state as it was: a run that finds the cache built (the tiny model pre-trained, a checkpoint converted)
    and one that builds it initialise their adapters identically."""
    import shutil
    import tempfile

    from filelock import FileLock

    dst.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{dst}.lock"):
        if (dst / done_file).is_file():
            return dst
        tmp = Path(tempfile.mkdtemp(prefix=f"{dst.name}.tmp-", dir=dst.parent))
        try:
            with preserved_rng():
                build(tmp)
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(tmp, dst)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dst
