"""OmegaConf resolvers the configs may use (registered once, idempotently).

``${mul:2,${method.r}}`` -> 2 * r (conf/experiment/lora_rank_sweep.yaml sets LoRA alpha = 2r this way).
``${pid:}`` -> this process's id (conf/hydra/default.yaml: with ``${now:...%f}`` two runs started at the same
moment on one machine never share a directory); resolved once per config, like ``${now:}``.
``${job_label:${hydra.overrides.task},fallback}`` -> ``src512-tgt128`` from the job's overrides (sweep folders).
``${config_groups:}`` -> the groups of conf/ and their options, one group a line, the default marked (the
``--help`` text, conf/hydra/default.yaml): Hydra's own $APP_CONFIG_GROUPS would also list the schema nodes
(``base_model``, ...) that the options extend, which are not options.

They must be registered before a config that uses them is resolved. The Hydra callback in
``glm_experiments.tracking.sweep`` imports this module, and Hydra instantiates callbacks before any job
runs, so the CLI always has them; code that composes configs itself (tests, notebooks) should call
``register_resolvers()`` (``glm_experiments.config.schema`` is the natural place to do it once for everyone).
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

from omegaconf import OmegaConf


def _number(value):
    if isinstance(value, str):
        value = float(value) if any(c in value for c in ".eE") else int(value)
    return value


def _mul(*values):
    result = math.prod(_number(v) for v in values)
    return int(result) if isinstance(result, float) and result.is_integer() else result


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
HIDDEN_GROUPS = {"hydra"}  # Hydra's own settings: --hydra-help lists them


def _defaults(conf_dir: Path) -> dict[str, str]:
    """``group -> default option`` from conf/train.yaml's defaults list (``null`` = none chosen)."""
    import yaml

    chosen = {}
    for entry in yaml.safe_load((conf_dir / "train.yaml").read_text(encoding="utf-8"))["defaults"]:
        if isinstance(entry, dict):
            for key, value in entry.items():
                chosen[key.removeprefix("optional ").removeprefix("override ")] = value
    return chosen


def config_groups(conf_dir: Path | str = CONF_DIR) -> str:
    """The option groups of ``conf_dir`` and their options (every ``<group>/<option>.yaml``), for ``--help``."""
    conf_dir = Path(conf_dir)
    defaults = _defaults(conf_dir)
    groups = sorted(p for p in conf_dir.iterdir() if p.is_dir() and p.name not in HIDDEN_GROUPS)
    width = max(len(g.name) for g in groups) + 1
    lines = []
    for group in groups:
        options = sorted(p.stem for p in group.glob("*.yaml"))
        default = defaults.get(group.name)
        shown = ", ".join(f"{o} (default)" if o == default else o for o in options)
        lines.append(textwrap.fill(shown, 100, initial_indent=f"  {group.name + ':':<{width}} ",
                                   subsequent_indent=" " * (width + 3), break_on_hyphens=False))
    return "\n".join(lines)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", _mul)
    if not OmegaConf.has_resolver("pid"):
        # cached like Hydra's ${now:}: a sweep's jobs compose from the launching process's config and its cache,
        # so jobs run in their own processes (hydra/launcher=parallel|slurm) share its sweep directory
        OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True)
    if not OmegaConf.has_resolver("job_label"):
        from glm_experiments.config.naming import job_label

        OmegaConf.register_new_resolver("job_label", lambda overrides, fallback="": job_label(overrides or [], fallback))
    if not OmegaConf.has_resolver("config_groups"):
        OmegaConf.register_new_resolver("config_groups", config_groups)


register_resolvers()
