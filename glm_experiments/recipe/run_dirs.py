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

import json
import logging
import shutil
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


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` directories holding trainer_state.json (written last), oldest first."""
    return sorted((p for p in Path(checkpoint_dir).glob("checkpoint-*") if p.name[11:].isdigit()
                   and (p / "trainer_state.json").is_file()), key=lambda p: int(p.name[11:]))


def resolve_resume(resume: str | None, checkpoint_dir: Path, deep: bool = True, quiet: bool = False) -> str | None:
    """The checkpoint ``resume`` continues from. ``auto``: the newest intact one (each is checked through
    checked_files.checkpoint_damage; a damaged one is said and passed over); ``<step>``: that one, which must
    be complete and intact. ``deep=False`` checks the torch files' structure only (no torch import)."""
    from glm_experiments.models.checked_files import checkpoint_damage

    if not resume_requested(resume):
        return None
    complete = complete_checkpoints(checkpoint_dir)
    if str(resume) == "auto":
        if not complete:
            log.warning("resume=auto: no complete checkpoint in %s, starting from scratch", checkpoint_dir)
            return None
        damaged = []
        for checkpoint in reversed(complete):
            damage = checkpoint_damage(checkpoint, quick=not deep)
            if damage is None:
                if damaged and not quiet:
                    log.warning("resume=auto: %s is damaged (%s); resuming from %s, the newest intact checkpoint",
                                damaged[0][0].name, damaged[0][1], checkpoint.name)
                return str(checkpoint)
            damaged.append((checkpoint, damage))
        raise UserError(f"resume=auto: no intact checkpoint in {checkpoint_dir} (newest: {damaged[0][1]})")
    path = checkpoint_dir / f"checkpoint-{resume}"
    if path not in complete:
        state = "is incomplete (no trainer_state.json)" if path.is_dir() else "does not exist"
        raise UserError(f"resume={resume}: {path} {state} (complete checkpoints: {[p.name for p in complete] or 'none'})")
    damage = checkpoint_damage(path, quick=not deep)
    if damage is not None:
        intact = [p.name for p in complete if checkpoint_damage(p, quick=not deep) is None]
        raise UserError(f"resume={resume}: {damage} (intact checkpoints: {intact or 'none'})")
    return str(path)


# what a resume may change: where and how often it saves, logs and evaluates, tracking, processes, and how far it
# trains (train.max_steps); anything else would continue the run as another run, or make its saved config lie
# (predict, merge and chat rebuild the run from .hydra/config.yaml)
RESUME_MAY_CHANGE = ("resume", "output_dir", "train.max_steps", "train.save_steps", "train.save_total_limit",
                     "train.logging_steps", "train.eval_steps", "train.dataloader_num_workers", "train.early_stopping.patience",
                     "train.early_stopping.min_delta", "eval.", "tracking.",
                     "launcher.", "sanity_print", "optimize_metric")


class AlreadyFinished(Exception):
    """``resume=auto`` of a finished run with nothing more to train: said, and exit 0."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def saved_config(run_dir: Path, hydra_subdir: str = ".hydra") -> dict | None:
    """The run's ``.hydra/config.yaml`` as saved (interpolations unresolved), or None where there is none."""
    path = Path(run_dir) / hydra_subdir / "config.yaml"
    if not path.is_file():
        return None
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:  # noqa: BLE001 - a broken yaml file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot resume: {path} is not a readable config ({first})") from None
    if not isinstance(saved, dict):
        raise UserError(f"cannot resume: {path} is not a config (a mapping)")
    return saved


def config_changes(saved: dict, given: dict) -> list[str]:
    """``key: saved -> given`` for every setting a resume may not change."""
    old, new = _flat(saved), _flat(given)
    changes = []
    # a group's choice (method.name, data.name) first: it explains the keys that follow from it
    for key in sorted(old.keys() | new.keys(), key=lambda k: (not k.endswith(".name"), k)):
        if key.startswith(RESUME_MAY_CHANGE) or key in RESUME_MAY_CHANGE:
            continue
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            changes.append(f"{key}: {old.get(key, '<unset>')} -> {new.get(key, '<unset>')}")
    return changes


def finished_step(run_dir: Path, saved: dict | None) -> tuple[int | None, bool]:
    """The step a finished run ended at (its result.json; before result.json recorded it, the saved
    train.max_steps), None when the run has not finished; and whether train.early_stopping ended it."""
    path = Path(run_dir) / "result.json"
    if not path.is_file():
        return None, False
    try:
        train = json.loads(path.read_text(encoding="utf-8")).get("train", {})
        step, stopped_early = train.get("global_step"), "early_stopped_at" in train
    except (OSError, ValueError, AttributeError, TypeError):
        step, stopped_early = None, False
    if step is None:
        step = _flat(saved or {}).get("train.max_steps")
    return (int(step) if step is not None else None), stopped_early


def _step(checkpoint: str | Path) -> int:
    return int(Path(checkpoint).name[len("checkpoint-"):])


def check_resume(run_dir: Path, resume: Any, cfg: DictConfig, hydra_subdir: str = ".hydra") -> None:
    """A resume of ``run_dir`` with the composed ``cfg`` must continue the same run: its settings equal the saved
    ones (RESUME_MAY_CHANGE aside), ``train.max_steps`` not below the checkpoint's step; a finished run is
    continued only to a larger ``train.max_steps`` (AlreadyFinished: nothing to do). Checked before Hydra
    rewrites ``.hydra/*.yaml``: a refused resume changes nothing."""
    saved = saved_config(run_dir, hydra_subdir)
    given = OmegaConf.to_container(cfg, resolve=False)
    given.pop("hydra", None)
    if saved is not None:
        changes = config_changes(saved, given)
        if changes:
            more = f" (and {len(changes) - 4} more)" if len(changes) > 4 else ""
            raise UserError(f"cannot resume {run_dir}: the config differs from the run's saved one in "
                            f"{'; '.join(changes[:4])}{more}; resume with its settings (only train.max_steps, "
                            "train.save_*/logging_steps/eval_steps, eval.*, tracking.* and launcher.* may change)")
    max_steps = int(cfg.train.max_steps)
    checkpoint = resolve_resume(resume, Path(run_dir) / "checkpoints", deep=False, quiet=True)
    finished, stopped_early = finished_step(run_dir, saved)
    if finished is not None and stopped_early:  # train.early_stopping ended it: nothing left to train
        raise AlreadyFinished(f"run already finished at step {finished} (train.early_stopping): {run_dir} "
                              "(nothing to do)")
    # a finished run trained on and interrupted has checkpoints beyond the step its result.json records
    if finished is not None and (checkpoint is None or _step(checkpoint) <= finished):
        if checkpoint is None or _step(checkpoint) != finished:
            have = Path(checkpoint).name if checkpoint else "none"
            if max_steps > finished:
                raise UserError(f"cannot continue {run_dir}: it finished at step {finished} and has no "
                                f"checkpoint-{finished} to continue from (newest complete: {have})")
            if str(resume) != "auto":
                raise UserError(f"resume={resume}: the run in {run_dir} finished at step {finished}; a finished run "
                                "is not trained again from an earlier checkpoint")
        if max_steps < finished:
            raise UserError(f"train.max_steps={max_steps} is below step {finished}, where the run in {run_dir} "
                            "finished; nothing changed")
        if max_steps == finished:
            raise AlreadyFinished(f"run already finished at step {finished}: {run_dir} (nothing to do; "
                                  f"train.max_steps=<more than {finished}> trains on)")
        return
    if checkpoint is not None and max_steps < _step(checkpoint):
        raise UserError(f"train.max_steps={max_steps} is below the step of {checkpoint} ({_step(checkpoint)}); "
                        "resume with train.max_steps of at least that")


def previous_run(run_dir: Path) -> list[str]:
    """The products of an earlier run found in ``run_dir`` (empty: the directory may be used)."""
    return [name for name in RUN_PRODUCTS if (run_dir / name).exists()]


def check_run_dir(run_dir: Path, resume: Any, setting: str = "hydra.run.dir", cfg: DictConfig | None = None) -> None:
    """UserError unless ``run_dir`` is new (or holds no run) or ``resume`` names a checkpoint it has (and, with
    the composed ``cfg``, continues the run it holds: check_resume)."""
    if resume_requested(resume):
        resolve_resume(resume, run_dir / "checkpoints", deep=False, quiet=True)  # a missing checkpoint-<step> fails here
        if cfg is not None and previous_run(run_dir):
            check_resume(run_dir, resume, cfg)
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
        _refuse_on_error(lambda: [check_run_dir(d, config.get("resume"), cfg=config) for d in dirs])

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
            # Hydra rewrites a job's .hydra/*.yaml before the job starts, and only the job knows its composed
            # config: the saved one is kept aside for check_sweep_job_resume (which puts it back on a refusal)
            for job_dir in jobs:
                kept = job_dir / SAVED_BEFORE_RESUME
                if (job_dir / ".hydra").is_dir() and not kept.exists():  # an earlier attempt's copy is the original
                    shutil.copytree(job_dir / ".hydra", kept)

        _refuse_on_error(check)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # a kept config still there belongs to a job directory no job of this sweep got past its check in (another
        # setting's directory, or a job that died first): what describes the run there is the kept one
        sweep_dir = Path(config.hydra.sweep.dir)
        for kept in sweep_dir.glob(f"*/{SAVED_BEFORE_RESUME}") if sweep_dir.is_dir() else []:
            _put_back(kept)


def _put_back(kept: Path) -> None:
    shutil.rmtree(kept.parent / ".hydra", ignore_errors=True)
    kept.rename(kept.parent / ".hydra")


# where on_multirun_start keeps a sweep job's saved config while the job checks its resume
SAVED_BEFORE_RESUME = ".hydra.before_resume"


def check_sweep_job_resume(cfg: DictConfig) -> bool:
    """In a ``--multirun resume=...`` job that continues a job directory: check_resume against the config saved
    before this sweep (RunDirGuard.on_multirun_start kept it aside). Refused (UserError) or already finished
    (returns False: nothing to train): the saved ``.hydra/`` is put back, so the job directory is as it was.
    True: train (the copy is dropped)."""
    job_dir = Path(cfg.output_dir)
    kept = job_dir / SAVED_BEFORE_RESUME
    if not resume_requested(cfg.get("resume")) or not kept.is_dir():
        return True
    try:
        check_resume(job_dir, cfg.resume, cfg, hydra_subdir=SAVED_BEFORE_RESUME)
    except (UserError, AlreadyFinished) as exc:
        _put_back(kept)
        if isinstance(exc, UserError):
            raise
        log.info("%s", exc)
        print(exc)
        return False
    shutil.rmtree(kept)
    return True


def _refuse_on_error(check) -> None:
    # Hydra prints a traceback for an exception raised by a callback; SystemExit passes through as one line
    try:
        check()
    except AlreadyFinished as done:
        print(done)
        raise SystemExit(0) from None
    except UserError as exc:
        print(one_line(exc), file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None  # bad input: exit 2, as every entry point
