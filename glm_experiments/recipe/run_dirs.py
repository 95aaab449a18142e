"""Run directories are never overwritten by accident, and a failed resume changes nothing on disk.

A directory that holds a previous run (``.hydra/``, ``result.json``, ``adapter/``, ``checkpoints/``) is only
written into again with ``resume=auto|<step>``, and that resume must be possible (``checkpoint-<step>``
complete) before anything is written.

Why a Hydra callback: Hydra's ``run_job`` rewrites ``<job dir>/.hydra/*.yaml`` (which predict, merge and
chat read) and opens its log there *before* the task function starts, so a check in the task function
comes too late. ``on_run_start`` / ``on_multirun_start`` get the composed config before Hydra touches the
job dir, and the directory resolved there is the one ``run_job`` uses (OmegaConf caches ``${now:}`` on
the config, and a sweep's jobs copy that cache). This module imports no torch: a refusal is immediate.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from glm_experiments.errors import EXIT_BAD_INPUT, UserError, one_line

log = logging.getLogger(__name__)

# what a run writes into its directory; any of them means the directory holds a previous run
RUN_PRODUCTS = (".hydra", "result.json", "adapter", "checkpoints")


def resume_requested(resume: Any) -> bool:
    return resume is not None and str(resume).lower() not in ("", "null", "none", "false")  # resume=false: a str


def resolve_resume(resume: str | None, checkpoint_dir: Path) -> str | None:
    if not resume_requested(resume):
        return None
    # trainer_state.json is written last: a run killed while saving leaves a checkpoint dir without it
    complete = sorted((p for p in checkpoint_dir.glob("checkpoint-*") if p.name[11:].isdigit()
                       and (p / "trainer_state.json").is_file()), key=lambda p: int(p.name[11:]))
    if str(resume) == "auto":
        if not complete:
            log.warning("resume=auto: no complete checkpoint in %s, starting from scratch", checkpoint_dir)
            return None
        return str(complete[-1])
    path = checkpoint_dir / f"checkpoint-{resume}"
    if path not in complete:
        state = "is incomplete (no trainer_state.json)" if path.is_dir() else "does not exist"
        raise UserError(f"resume={resume}: {path} {state} (complete checkpoints: {[p.name for p in complete] or 'none'})")
    return str(path)


def previous_run(run_dir: Path) -> list[str]:
    """The products of an earlier run found in ``run_dir`` (empty: the directory may be used)."""
    return [name for name in RUN_PRODUCTS if (run_dir / name).exists()]


def check_run_dir(run_dir: Path, resume: Any, setting: str = "hydra.run.dir") -> None:
    """UserError unless ``run_dir`` is new (or holds no run) or ``resume`` names a checkpoint it has."""
    if resume_requested(resume):
        resolve_resume(resume, run_dir / "checkpoints")  # a missing checkpoint-<step> fails here, not after
        return
    found = previous_run(run_dir)
    if found:
        raise UserError(f"{run_dir} already holds a run ({', '.join(found)}); not overwriting it: continue it with "
                        f"resume=auto (or resume=<step>), or leave {setting} to its default for a new directory")


class RunDirGuard(Callback):
    """Registered in conf/hydra/default.yaml before any other callback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        dirs = [Path(config.hydra.run.dir)]
        if not OmegaConf.is_interpolation(config, "output_dir"):  # run products moved out of Hydra's job dir
            dirs.append(Path(config.output_dir))
        _refuse_on_error(lambda: [check_run_dir(d, config.get("resume")) for d in dirs])

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        resume = config.get("resume")

        def check() -> None:
            jobs = [d for d in sorted(sweep_dir.iterdir()) if d.is_dir() and previous_run(d)] if sweep_dir.is_dir() else []
            if not jobs:
                return
            if not resume_requested(resume):
                raise UserError(f"{sweep_dir} already holds a sweep ({len(jobs)} job directories); not overwriting "
                                "it: continue its jobs with resume=auto, or leave hydra.sweep.dir to its default "
                                "for a new directory")
            for job_dir in jobs:  # resume=<step> must exist in every job that is there already
                check_run_dir(job_dir, resume, "hydra.sweep.dir")

        _refuse_on_error(check)


def _refuse_on_error(check) -> None:
    # Hydra prints a traceback for an exception raised by a callback; SystemExit passes through as one line
    try:
        check()
    except UserError as exc:
        print(one_line(exc), file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None  # bad input: exit 2, as every entry point
