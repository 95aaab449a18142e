"""One MLflow run per training job: params from the resolved config, Hydra tags, metrics by step, artifacts.

transformers' own MLflowCallback is not used (report_to="none"): it logs flat TrainingArguments names and
reuses whatever run is active. Every name here is ours: params are dotted config keys that are valid
Hydra overrides (``train.learning_rate``), metrics are ``train/*``, ``eval/*``, ``perf/*``, ``model/*``.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from glm_experiments.config.naming import display_name, swept_keys_from_env, varied_values
from glm_experiments.errors import UserError

from glm_experiments.tracking.store import check_store, open_experiment

log = logging.getLogger(__name__)

# set by the sweep callback so that every job of a --multirun becomes a child of one parent run
PARENT_RUN_ENV = "GLM_EXPERIMENTS_PARENT_RUN_ID"
# which directory and process a run belongs to: a later run of the same directory closes a run its dead
# process left RUNNING (kill -9, OOM, power loss) and a resumed run links to the one it continues
RUN_DIR_TAG = "glm_experiments.run_dir"
ROLE_TAG = "glm_experiments.role"  # what a run that trains nothing is for: sweep_parent, comparison, human_eval
PROCESS_TAG = "glm_experiments.process"  # host:pid:process start time (pids are reused)
RESUMED_FROM_TAG = "resumed_from_run_id"
# set by a hydra/launcher=slurm job that SLURM started again (requeued after a preemption, its time limit or
# `scontrol requeue`) to its restart count: the job continues its directory's MLflow run instead of opening another
CONTINUE_RUN_ENV = "GLM_EXPERIMENTS_CONTINUE_RUN"
RESTARTS_TAG = "glm_experiments.restarts"



def override_value(value: Any) -> str:
    """A leaf value written the way a Hydra override spells it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def flatten_config(cfg: DictConfig | dict, prefix: str = "") -> dict[str, str]:
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, str] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "config":
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = override_value(value)
    return flat


DISPLAY_NAME_TAG = "glm_experiments.display_name"  # the run's name as people read it (config/naming.py)
SMOKE_TAG = "glm_experiments.smoke"  # set on debug=smoke runs: a wiring check, not a result


def run_name(cfg, overrides: list[str], smoke: bool = False, swept_keys: list[str] | None = None) -> str:
    """The run's display name (config/naming.py), e.g. ``smoke · src=1024 tgt=256 · full · tiny``: the values the
    sweep varies (``swept_keys``, by default what the sweep callback put in the environment; outside a sweep every
    override that changes the experiment), "smoke" for ``debug=smoke``, then the method and the model.
    ``tracking.run_name`` replaces it."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    if swept_keys is None:
        swept_keys = swept_keys_from_env()
    return display_name(varied_values(overrides, swept_keys), cfg.method.name, cfg.model.name, smoke)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def this_process() -> str:
    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.2f}"


def process_is_gone(process: str) -> bool:
    """True only when provably dead: on this host, and no process with that pid and start time."""
    import psutil

    host, _, rest = process.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's process: cannot tell
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" != started
    except psutil.NoSuchProcess:
        return True


def close_dead_runs(client, experiment_id: str, run_dir: str, closed_by: str) -> list:
    """Marks FAILED the runs of ``run_dir`` left RUNNING by a process that no longer exists; returns the
    directory's earlier runs (all but ``closed_by``, the run starting now), newest first."""
    quote = '"' if "'" in run_dir else "'"
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = {quote}{run_dir}{quote}",
                              order_by=["attributes.start_time DESC"], max_results=100)
    runs = [run for run in runs if run.info.run_id != closed_by]
    for run in runs:
        process = run.data.tags.get(PROCESS_TAG, "")
        if run.info.status != "RUNNING":
            continue
        if not process_is_gone(process):
            log.warning("MLflow run %s of %s is RUNNING in process %s, which may still be alive: left as is",
                        run.info.run_id, run_dir, process or "(unknown)")
            continue
        client.set_tag(run.info.run_id, "error", f"process {process} ended without closing this run "
                                                 f"(killed, crashed or out of memory); marked FAILED by run {closed_by}")
        client.set_terminated(run.info.run_id, status="FAILED")
        log.warning("MLflow run %s of %s was left RUNNING by a process that is gone: marked FAILED",
                    run.info.run_id, run_dir)
    return runs


def reopen_dir_run(client, experiment_id: str, run_dir: str, tags: dict[str, str]):
    """Reopens (status RUNNING again) the newest run of ``run_dir``, with ``tags`` set on it; None if it has none."""
    import mlflow

    quote = '"' if "'" in run_dir else "'"
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = {quote}{run_dir}{quote}",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    previous = runs[0].info
    run = mlflow.start_run(run_id=previous.run_id, log_system_metrics=None)
    error = runs[0].data.tags.get("error")
    if error is not None:  # how the last process ended (KeyboardInterrupt: SIGTERM): history, not this run's error
        tags = {**tags, "glm_experiments.last_interruption": error}
        client.delete_tag(previous.run_id, "error")
    mlflow.set_tags({k: str(v)[:5000] for k, v in tags.items()})
    log.info("continuing MLflow run %s (was %s; restart %s)", previous.run_id, previous.status, tags.get(RESTARTS_TAG))
    return run


# <run dir>/mlflow_run.json: the MLflow run (and store) a run directory is tracked in, so that the next command
# opening the directory (predict, merge, chat, web, a resume, even of a copy) can close a run a dead process left
RUN_FILE = "mlflow_run.json"


def absolute_uri(tracking_uri: str) -> str:
    if urlparse(tracking_uri).scheme == "sqlite":
        return "sqlite:///" + str(Path(tracking_uri[len("sqlite:///"):]).expanduser().resolve())
    return tracking_uri


def close_if_dead(run_dir: Path, closed_by: str) -> str | None:
    """Mark FAILED the MLflow run ``run_dir/mlflow_run.json`` names when it is RUNNING and its process is gone;
    its id, or None (nothing to close, or the store cannot be opened: never an error of the command)."""
    import json

    run_dir = Path(run_dir)
    try:
        saved = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
        run_id, uri = saved["run_id"], saved["tracking_uri"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:  # a finished run recorded after its MLflow run was opened: nothing left RUNNING
        result = run_dir / "result.json"
        if json.loads(result.read_text())["run_id"] == run_id and result.stat().st_mtime >= (run_dir / RUN_FILE).stat().st_mtime:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if urlparse(uri).scheme == "sqlite" and not Path(uri[len("sqlite:///"):]).is_file():
        return None
    try:
        check_store(uri)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(run_id)
        process = run.data.tags.get(PROCESS_TAG, "")
        if run.info.status != "RUNNING" or not process_is_gone(process):
            return None
        client.set_tag(run_id, "error", f"process {process} ended without closing this run (killed, crashed or out "
                                        f"of memory); marked FAILED by {closed_by}")
        client.set_terminated(run_id, status="FAILED")
    except Exception as exc:  # noqa: BLE001 - a store that cannot be reached is reported by whoever needs it
        log.debug("cannot check the MLflow run of %s: %s", run_dir, exc)
        return None
    log.warning("MLflow run %s of %s was left RUNNING by a process that is gone: marked FAILED", run_id, run_dir)
    return run_id


class Tracker:
    """Thin wrapper so the training code reads the same with tracking on or off (and on non-zero ranks)."""

    def __init__(self, tracking_cfg, active: bool = True):
        self.cfg = tracking_cfg
        self.active = bool(tracking_cfg.enabled and active)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.continued = False  # an earlier process's run, reopened (a requeued SLURM job)

    def start(self, name: str, tags: dict[str, str], run_dir: Path | None = None, resumed_from: str | None = None,
              continue_run: str | None = None) -> None:
        """``run_dir``: tags the run with it and closes the directory's runs a dead process left RUNNING;
        ``resumed_from`` (the checkpoint a resumed run starts from): links the run to the directory's last one;
        ``continue_run``: the MLflow run id of a finished run trained on (to a larger train.max_steps): reopened."""
        if not self.active:
            return
        import mlflow

        mlflow.set_tracking_uri(self.cfg.tracking_uri)
        try:
            client, self.experiment_id = open_experiment(self.cfg)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - not a database, a newer schema, unreachable server: one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"tracking.tracking_uri={self.cfg.tracking_uri}: cannot open the MLflow store ({first}); "
                            "fix or move it, or use tracking=none") from None
        parent = os.environ.get(PARENT_RUN_ENV)
        tags = {**tags, PROCESS_TAG: this_process()}
        if parent:
            tags["mlflow.parentRunId"] = parent
        if run_dir is not None:
            tags[RUN_DIR_TAG] = str(Path(run_dir).resolve())
        if continue_run and self._reopen(client, continue_run, tags):
            self._record(run_dir)
            return
        run = None
        restarts = os.environ.get(CONTINUE_RUN_ENV)
        if restarts and run_dir is not None:  # a requeued SLURM job: the run of its first start, reopened
            run = reopen_dir_run(client, self.experiment_id, tags[RUN_DIR_TAG],
                                 {**tags, RESTARTS_TAG: restarts,
                                  **({"resumed_from_checkpoint": Path(resumed_from).name} if resumed_from else {})})
            self.continued = run is not None
            if run is not None:
                self.logged_params = dict(client.get_run(run.info.run_id).data.params)
        if run is None:
            run = mlflow.start_run(experiment_id=self.experiment_id, run_name=name, tags=tags, log_system_metrics=None)
        self.run_id = run.info.run_id
        if run_dir is not None:  # the run its mlflow_run.json names (of this directory, or of the one it was copied from)
            close_if_dead(run_dir, f"run {self.run_id}")
        self._record(run_dir)
        if run_dir is not None:
            earlier = close_dead_runs(client, self.experiment_id, tags[RUN_DIR_TAG], closed_by=self.run_id)
            if resumed_from and earlier and not self.continued:
                self.set_tags({RESUMED_FROM_TAG: earlier[0].info.run_id,
                               "resumed_from_checkpoint": Path(resumed_from).name})

    def _record(self, run_dir: Path | None) -> None:
        if run_dir is None:
            return
        import json

        path = Path(run_dir) / RUN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{RUN_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": absolute_uri(self.cfg.tracking_uri)},
                                  indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def _reopen(self, client, run_id: str, tags: dict[str, str]) -> bool:
        """Reopen the finished run ``run_id`` (False where the store no longer has it: a new run is started)."""
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            previous = client.get_run(run_id)
        except MlflowException:
            log.warning("MLflow run %s of the finished run is not in %s: continuing in a new run", run_id,
                        self.cfg.tracking_uri)
            return False
        self.logged_params = dict(previous.data.params)
        mlflow.start_run(run_id=run_id, log_system_metrics=None)
        self.run_id = run_id
        self.set_tags({k: v for k, v in tags.items() if k != "mlflow.parentRunId"})
        return True

    logged_params: dict[str, str] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        if self.active:
            import mlflow

            params = {k: str(v)[:6000] for k, v in params.items()}
            # a continued run: MLflow keeps a param's first value; a changed one (train.max_steps) becomes a tag
            changed = {f"continued.{k}": v for k, v in params.items() if k in self.logged_params
                       and self.logged_params[k] != v}
            mlflow.log_params({k: v for k, v in params.items() if k not in self.logged_params})
            if changed:
                mlflow.set_tags(changed)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.active:
            import mlflow

            mlflow.set_tags({k: str(v)[:5000] for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active and metrics:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        if self.active and Path(local_dir).exists():
            import mlflow

            mlflow.log_artifacts(str(local_dir), artifact_path)

    def log_artifact(self, local_file: Path, artifact_path: str | None = None) -> None:
        if self.active and Path(local_file).exists():
            import mlflow

            mlflow.log_artifact(str(local_file), artifact_path)

    def log_table(self, rows: list[dict], artifact_file: str) -> None:
        if self.active and rows:
            import mlflow

            columns = {key: [row.get(key) for row in rows] for key in rows[0]}
            mlflow.log_table(columns, artifact_file=artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        if self.active and self.run_id:
            import mlflow

            mlflow.end_run(status=status)
