"""One MLflow parent run per ``--multirun`` sweep; every job of the sweep becomes its child.

Registered in ``conf/hydra/default.yaml`` (``hydra.callbacks.mlflow_sweep``). What it does:

* ``on_multirun_start``: creates the parent run in the experiment the composed config names
  (``tracking.experiment_name`` in ``tracking.tracking_uri``), tagged with the sweep directory, the sweep's
  overrides and sweeper params, the sweeper, the git commit; named after the swept params. Its id goes into
  ``os.environ[PARENT_RUN_ENV]``, which ``Tracker.start`` turns into ``mlflow.parentRunId`` of each job's run
  (also for launchers that spawn processes: they inherit the environment).
* ``on_job_start``: puts the parent's id into the job's environment (a job in another process or node).
* ``on_job_end``: records the job on the parent: tag ``job.<num>.status`` (FINISHED or FAILED), for a failed job
  also ``job.<num>.overrides/error``, the job's return value as ``sweep/objective`` at step = job number, and
  the progress ``sweep/jobs_completed`` / ``sweep/jobs_failed`` counted from those tags. The sweep goes on with
  its other jobs.
* a job whose overrides do not compose (``train.max_steps=abc``) is recorded the same way, plus an ``error``
  tag on the parent (Hydra gives callbacks no hook for it: see ``_watch_composition``); the sweep stops there.
* ``on_multirun_end``: ends the parent FINISHED, or FAILED when any job failed (tag ``sweep.failed_jobs``).

Jobs may run in other processes, in any order and at the same time (``hydra/launcher=parallel|slurm``,
glm_experiments/scale/submitit_pool.py): the launcher pickles this callback with the parent's id, and Hydra calls
``on_job_start`` / ``on_job_end`` *in the job's process*. So nothing is counted in memory: each job writes only
its own keys (``job.<num>.*`` tags, its step of ``sweep/objective``), and the counts are read back from the
parent's tags, by each job for progress and by the launching process when it ends the parent. A job whose
process died before ``on_job_end`` is recorded by the launcher (``record_lost_job``).

Hydra 1.3's BasicSweeper runs every job of a batch, then re-raises the first failure, so
``on_multirun_end`` is never called when a job failed (the same for the Optuna sweeper, which stops at the
first failed trial). The parent is therefore also ended from an ``atexit`` hook: FAILED when jobs failed
(composition failures included), KILLED when the sweep stopped for another reason (Ctrl-C, SIGTERM).

With ``tracking.enabled: false`` (``tracking=none``) the callback does nothing.
"""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

import glm_experiments.config.resolvers  # noqa: F401  (configs may use ${mul:...}; registered before any job resolves)
from glm_experiments.config.naming import SEPARATOR, SMOKE, SWEPT_KEYS_ENV, override_key
from glm_experiments.tracking.mlflow_tracker import PARENT_RUN_ENV, ROLE_TAG, SMOKE_TAG, git_commit
from glm_experiments.tracking.store import open_experiment

log = logging.getLogger(__name__)

SWEEP_PARENT = "sweep_parent"
MAX_NAME = 200


def sweep_overrides(config: DictConfig) -> tuple[list[str], list[str]]:
    """(swept overrides, fixed overrides) from the command line and ``hydra.sweeper.params``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params") or {}
    candidates = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    parser = OverridesParser.create()
    by_key: dict[str, tuple[str, bool]] = {}  # a command-line override replaces the same key's sweeper param
    for text in candidates:
        try:
            override = parser.parse_override(text)
            key, is_sweep = override.get_key_element(), override.is_sweep_override()
        except Exception:  # noqa: BLE001 - a sweeper-specific syntax Hydra's parser does not know
            key, is_sweep = text.partition("=")[0], True
        by_key.pop(key, None)
        by_key[key] = (text, is_sweep)
    swept = [text for text, is_sweep in by_key.values() if is_sweep]
    fixed = [text for text, is_sweep in by_key.values() if not is_sweep]
    return swept, fixed


def parent_name(config: DictConfig, swept: list[str]) -> str:
    if config.tracking.get("run_name"):
        return f"{config.tracking.run_name}-sweep"
    choices = config.hydra.runtime.get("choices") or {}
    study = choices.get("experiment") or choices.get("hparams_search")
    body = " ".join(swept) or "(no swept params)"
    name = f"{study}: {body}" if study else f"sweep: {body}"
    if choices.get("debug") == "smoke":  # first, as in a job's name (config/naming.py)
        name = f"{SMOKE}{SEPARATOR}{name}"
    return name if len(name) <= MAX_NAME else name[: MAX_NAME - 3] + "..."


class MlflowSweepCallback(Callback):
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.client = None
        self.tracking_uri: str | None = None
        self.parent_run_id: str | None = None
        self.compare_command = ""
        self.previous_parent: str | None = None
        self.owner_pid: int | None = None  # the process that runs the sweep and ends the parent
        self.swept_keys = ""  # comma-separated keys the sweep varies, for the jobs' run names
        self._closed = True
        self._unwatch = _nothing

    def __getstate__(self) -> dict:  # pickled into each job by the parallel launchers
        return {**self.__dict__, "client": None, "_unwatch": _nothing}

    def _client(self):
        if self.client is None:  # in a job's process: a client of its own
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=self.tracking_uri)
        return self.client

    # ------------------------------------------------------------------ multirun
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracking = config.get("tracking")
        if not self.enabled or tracking is None or not tracking.get("enabled", False):
            return
        self.client, experiment_id = open_experiment(tracking)
        self.tracking_uri = tracking.tracking_uri

        swept, fixed = sweep_overrides(config)
        choices = config.hydra.runtime.get("choices") or {}
        smoke = (config.hydra.runtime.get("choices") or {}).get("debug") == "smoke"
        tags = {
            **({SMOKE_TAG: "debug=smoke sweep: a wiring check, not a result"} if smoke else {}),
            ROLE_TAG: SWEEP_PARENT,
            "sweep.dir": str(Path(config.hydra.sweep.dir).resolve()),
            "sweep.params": " ".join(swept) or "(none)",
            "sweep.fixed_overrides": " ".join(fixed) or "(none)",
            "sweep.sweeper": str(config.hydra.sweeper.get("_target_", "")),
            "hydra.overrides": " ".join(config.hydra.overrides.task) or "(none)",
            "hydra.mode": "RunMode.MULTIRUN",
            **{f"hydra.choices.{k}": str(v) for k, v in choices.items() if not k.startswith("hydra/")},
        }
        for override in swept:  # a swept group has every job's choice, not the first job's
            key, _, values = override.partition("=")
            if f"hydra.choices.{key}" in tags:
                tags[f"hydra.choices.{key}"] = values
        commit = git_commit()
        if commit:
            tags["git.commit"] = commit
        self.previous_parent = os.environ.get(PARENT_RUN_ENV)
        if self.previous_parent:  # a sweep launched from inside another tracked run nests under it
            tags["mlflow.parentRunId"] = self.previous_parent
        tags["mlflow.note.content"] = (
            f"Sweep parent: each job of this --multirun is a child run.\n\n"
            f"* swept: `{tags['sweep.params']}`\n* fixed: `{tags['sweep.fixed_overrides']}`\n"
            f"* sweep dir: `{tags['sweep.dir']}`\n\n"
        )
        run = self.client.create_run(experiment_id, run_name=parent_name(config, swept),
                                     tags={k: str(v)[:5000] for k, v in tags.items()})
        self.parent_run_id = run.info.run_id
        self.compare_command = (f"python -m glm_experiments.compare --tracking-uri {tracking.tracking_uri} "
                                f"--parent {self.parent_run_id}")
        self.client.set_tag(self.parent_run_id, "mlflow.note.content",
                            tags["mlflow.note.content"] + f"Compare the children: `{self.compare_command}`")
        os.environ[PARENT_RUN_ENV] = self.parent_run_id
        # the jobs name their runs after what the sweep varies (config/naming.py: display_name)
        self.swept_keys = ",".join(override_key(text) for text in swept)
        os.environ[SWEPT_KEYS_ENV] = self.swept_keys
        self.owner_pid = os.getpid()
        self._closed = False
        atexit.register(self._end_at_exit)
        self._watch_composition()
        log.info("MLflow sweep parent run %s (experiment '%s')", self.parent_run_id, tracking.experiment_name)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id is not None and not self._closed:  # a job in its own process or on another node
            os.environ[PARENT_RUN_ENV] = self.parent_run_id
            os.environ[SWEPT_KEYS_ENV] = self.swept_keys

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.parent_run_id is None or self._closed:
            return
        num = OmegaConf.select(config, "hydra.job.num", default=None)
        if job_return.status == JobStatus.FAILED:
            # the exception; .return_value would re-raise it
            self._record_job(num, job_return.overrides, job_return._return_value)
        else:
            self._record_job(num, job_return.overrides, value=job_return._return_value)

    def record_lost_job(self, num: int, overrides, error: BaseException) -> None:
        """A job whose process ended without a result (killed, out of memory, timed out): recorded by the
        launching process, unless the job recorded itself before it died."""
        if self.parent_run_id is None or self._closed:
            return
        try:
            if f"job.{num}.status" in self._client().get_run(self.parent_run_id).data.tags:
                return
        except Exception:  # noqa: BLE001 - tracking trouble must not stop the sweep
            log.exception("could not read the MLflow sweep parent run %s", self.parent_run_id)
        self._record_job(num, overrides, error)

    def _record_job(self, num, overrides, error: BaseException | None = None, value: Any = None,
                    stage: str = "") -> None:
        """``job.<num>.*`` tags (keys no other job writes), the objective at step ``num``, the counts so far."""
        try:
            client = self._client()
            if error is None:
                client.set_tag(self.parent_run_id, f"job.{num}.status", "FINISHED")
                if isinstance(value, (int, float)) and not isinstance(value, bool) and num is not None:
                    client.log_metric(self.parent_run_id, "sweep/objective", float(value), step=int(num))
            else:
                text = f"{type(error).__name__}: {error}"
                cause = error.__cause__
                if cause is not None:  # Hydra's composition error wraps OmegaConf's, which names the value
                    text += f" ({type(cause).__name__}: {(str(cause).splitlines() or [''])[0]})"
                client.set_tag(self.parent_run_id, f"job.{num}.status", "FAILED")
                client.set_tag(self.parent_run_id, f"job.{num}.overrides", " ".join(overrides or []) or "(none)")
                client.set_tag(self.parent_run_id, f"job.{num}.error", f"{stage}{text}"[:5000])
                if stage:  # the sweep stops here: say why on the parent itself
                    client.set_tag(self.parent_run_id, "error", f"job #{num} {stage}{text}"[:5000])
                log.warning("sweep job #%s failed (%s)", num, type(error).__name__)
            _, failed = self._log_counts()
            if failed:
                client.set_tag(self.parent_run_id, "sweep.failed_jobs", str(failed))
        except Exception:  # noqa: BLE001 - tracking trouble must not stop the sweep
            log.exception("could not record sweep job #%s on the MLflow parent run", num)

    def job_counts(self) -> tuple[int, int]:
        """(finished, failed) jobs, from the parent's ``job.<num>.status`` tags: right whichever process wrote them."""
        tags = self._client().get_run(self.parent_run_id).data.tags
        statuses = [v for k, v in tags.items() if k.startswith("job.") and k.endswith(".status")]
        return statuses.count("FINISHED"), statuses.count("FAILED")

    def _log_counts(self) -> tuple[int, int]:
        # concurrent jobs may both log the same count: the last step holds the total either way
        completed, failed = self.job_counts()
        step = completed + failed
        self._client().log_metric(self.parent_run_id, "sweep/jobs_completed", completed, step=step)
        self._client().log_metric(self.parent_run_id, "sweep/jobs_failed", failed, step=step)
        return completed, failed

    def _watch_composition(self) -> None:
        """Hydra 1.3 calls no callback for a job whose overrides do not compose (a value of the wrong type, an
        unknown option): the launcher raises before ``run_job``, the sweep stops, and the parent ended KILLED
        with no error. Every sweeper and launcher composes its jobs, in job order, through the config loader's
        ``load_sweep_config``; for this sweep that method is wrapped to record such a job as failed first."""
        from hydra.core.global_hydra import GlobalHydra

        if not GlobalHydra.instance().is_initialized():  # the callback driven by hand (tests), not by Hydra
            return
        loader = GlobalHydra.instance().config_loader()
        compose = loader.load_sweep_config
        composed = 0

        def load_sweep_config(master_config, sweep_overrides):
            nonlocal composed
            num, composed = composed, composed + 1
            try:
                return compose(master_config, sweep_overrides)
            except Exception as exc:
                # the launching process composes every job before any starts (the sweeper validates the batch);
                # a parallel launcher composes each again in the job's process, where the count means nothing
                if not self._closed and os.getpid() == self.owner_pid:
                    self._record_job(num, sweep_overrides, exc, stage="did not compose: ")
                raise

        loader.load_sweep_config = load_sweep_config
        self._unwatch = lambda: vars(loader).pop("load_sweep_config", None)

    def record_cancelled_job(self, num: int, overrides, reason: str) -> None:
        """A job the scheduler cancelled (``scancel``): ``job.<num>.status`` KILLED, with the reason."""
        if self.parent_run_id is None or self._closed:
            return
        try:
            client = self._client()
            client.set_tag(self.parent_run_id, f"job.{num}.status", "KILLED")
            client.set_tag(self.parent_run_id, f"job.{num}.overrides", " ".join(overrides or []) or "(none)")
            client.set_tag(self.parent_run_id, f"job.{num}.error", reason[:5000])
        except Exception:  # noqa: BLE001 - tracking trouble must not stop the sweep
            log.exception("could not record sweep job #%s on the MLflow parent run", num)

    def close_running_children(self, reason: str) -> None:
        """Every job has ended: a child run still RUNNING lost its process (killed before it could close it)."""
        if self.parent_run_id is None or self._closed or os.getpid() != self.owner_pid:
            return
        try:
            client = self._client()
            parent = client.get_run(self.parent_run_id)
            runs = client.search_runs([parent.info.experiment_id], max_results=1000,
                                      filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' "
                                                    "and attributes.status = 'RUNNING'")
            for run in runs:
                client.set_tag(run.info.run_id, "error", reason)
                client.set_terminated(run.info.run_id, status="KILLED")
                log.warning("MLflow run %s: %s; marked KILLED", run.info.run_id, reason)
        except Exception:  # noqa: BLE001
            log.exception("could not close the sweep's child runs")

    def abort(self, message: str, status: str = "FAILED") -> None:
        """The sweep could not start its jobs (a launcher setting), or was cancelled: the reason on the parent,
        which ends ``status``."""
        if self.parent_run_id is None or self._closed or os.getpid() != self.owner_pid:
            return
        try:
            self.client.set_tag(self.parent_run_id, "error", message[:5000])
        except Exception:  # noqa: BLE001 - tracking trouble must not hide the reason
            log.exception("could not tag the MLflow sweep parent run %s", self.parent_run_id)
        self._end(status)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._end("FINISHED")

    # ------------------------------------------------------------------ ending
    def _end(self, status: str) -> None:
        """Ends the parent ``status``, or FAILED when any job failed. Only the launching process ends it."""
        if self.parent_run_id is None or self._closed or os.getpid() != self.owner_pid:
            return
        self._closed = True
        try:
            completed, failed = self._log_counts()  # every job has ended: these are the totals
            status = "FAILED" if failed else status
            self.client.set_tag(self.parent_run_id, "sweep.jobs", str(completed + failed))
            self.client.set_tag(self.parent_run_id, "sweep.failed_jobs", str(failed))
            self.client.set_terminated(self.parent_run_id, status=status)
            log.info("MLflow sweep parent run %s ended %s (%d jobs, %d failed)", self.parent_run_id, status,
                     completed + failed, failed)
            print(f"compare the jobs: {self.compare_command}", flush=True)
        except Exception:  # noqa: BLE001
            log.exception("could not end the MLflow sweep parent run %s", self.parent_run_id)
        finally:
            self._unwatch()
            if self.previous_parent:
                os.environ[PARENT_RUN_ENV] = self.previous_parent
            else:
                os.environ.pop(PARENT_RUN_ENV, None)
            os.environ.pop(SWEPT_KEYS_ENV, None)  # a nested sweep's keys are not the outer one's
            atexit.unregister(self._end_at_exit)

    def _end_at_exit(self) -> None:
        # BasicSweeper re-raises a failed job after its batch, so on_multirun_end never runs then: FAILED if a
        # job failed, else the sweep was stopped (Ctrl-C, SIGTERM)
        self._end("KILLED")


def _nothing() -> None:
    pass

