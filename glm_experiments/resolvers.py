"""OmegaConf resolvers the configs may use (registered once, idempotently).

``${mul:2,${method.r}}`` -> 2 * r (conf/experiment/lora_rank_sweep.yaml sets LoRA alpha = 2r this way).
``${pid:}`` -> this process's id (conf/hydra/default.yaml: with ``${now:...%f}`` two runs started at the same
moment on one machine never share a directory).
``${job_label:${hydra.overrides.task},fallback}`` -> ``src512-tgt128`` from the job's overrides (sweep folders).

They must be registered before a config that uses them is resolved. The Hydra callback in
``glm_experiments.tracking.sweep`` imports this module, and Hydra instantiates callbacks before any job
runs, so the CLI always has them; code that composes configs itself (tests, notebooks) should call
``register_resolvers()`` (``glm_experiments.config`` is the natural place to do it once for everyone).
"""

from __future__ import annotations

import math
import os

from omegaconf import OmegaConf


def _number(value):
    if isinstance(value, str):
        value = float(value) if any(c in value for c in ".eE") else int(value)
    return value


def _mul(*values):
    result = math.prod(_number(v) for v in values)
    return int(result) if isinstance(result, float) and result.is_integer() else result


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", _mul)
    if not OmegaConf.has_resolver("pid"):
        OmegaConf.register_new_resolver("pid", os.getpid)
    if not OmegaConf.has_resolver("job_label"):
        from glm_experiments.naming import job_label

        OmegaConf.register_new_resolver("job_label", lambda overrides, fallback="": job_label(overrides or [], fallback))


register_resolvers()
