"""One MLflow run per training job: params from the resolved config, Hydra tags, metrics by step, artifacts.

transformers' own MLflowCallback is not used (report_to="none"): it logs flat TrainingArguments names and
reuses whatever run is active. Every name here is ours: params are dotted config keys that are valid
Hydra overrides (``train.learning_rate``), metrics are ``train/*``, ``eval/*``, ``perf/*``, ``model/*``.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from glm_experiments.errors import UserError

log = logging.getLogger(__name__)

# set by the sweep callback so that every job of a --multirun becomes a child of one parent run
PARENT_RUN_ENV = "GLM_EXPERIMENTS_PARENT_RUN_ID"

SHORT_NAMES = {
    "max_source_length": "src",
    "max_target_length": "tgt",
    "learning_rate": "lr",
    "pre_seq_len": "psl",
    "max_steps": "steps",
    "per_device_train_batch_size": "bs",
    "num_last_layers": "last",
    "num_virtual_tokens": "vt",
}


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


def run_name(cfg, overrides: list[str]) -> str:
    """e.g. ``lora-chatglm3-adgen-src512``: the group choices, then what the overrides changed."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    parts = [cfg.method.name, cfg.model.name, cfg.data.name]
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if "." not in key or key.startswith(("hydra.", "tracking.", "output_dir")) or "/" in value:
            continue  # file paths make unreadable names; they are in the params anyway
        leaf = key.rsplit(".", 1)[-1]
        parts.append(f"{SHORT_NAMES.get(leaf, leaf)}{value}")
    return "-".join(parts)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def artifact_root_for(tracking_uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside the database (``mlartifacts/``)."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite":
        return None
    db = Path(tracking_uri[len("sqlite:///"):])
    return (db.resolve().parent / "mlartifacts").as_uri()


class Tracker:
    """Thin wrapper so the training code reads the same with tracking on or off (and on non-zero ranks)."""

    def __init__(self, tracking_cfg, active: bool = True):
        self.cfg = tracking_cfg
        self.active = bool(tracking_cfg.enabled and active)
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    def start(self, name: str, tags: dict[str, str]) -> None:
        if not self.active:
            return
        import mlflow

        mlflow.set_tracking_uri(self.cfg.tracking_uri)
        try:
            experiment = mlflow.get_experiment_by_name(self.cfg.experiment_name)
        except Exception as exc:  # noqa: BLE001 - not a database, a newer schema, unreachable server: one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"tracking.tracking_uri={self.cfg.tracking_uri}: cannot open the MLflow store ({first}); "
                            "fix or move it, or use tracking=none") from None
        if experiment is None:
            location = self.cfg.artifact_location or artifact_root_for(self.cfg.tracking_uri)
            self.experiment_id = mlflow.create_experiment(self.cfg.experiment_name, artifact_location=location)
        else:
            self.experiment_id = experiment.experiment_id
        parent = os.environ.get(PARENT_RUN_ENV)
        if parent:
            tags = {**tags, "mlflow.parentRunId": parent}
        run = mlflow.start_run(experiment_id=self.experiment_id, run_name=name, tags=tags, log_system_metrics=None)
        self.run_id = run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if self.active:
            import mlflow

            mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})

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
