"""Find a finished run and rebuild it: base model + tokenizer + template + the saved adapter.

Shared by the ``predict``, ``merge`` and ``chat`` entry points. A run is named by

* its run directory (the one holding ``.hydra/config.yaml`` and ``adapter/``), or its ``adapter/``
  directory, or
* an MLflow run id: the run's ``output_dir`` tag gives the directory; if it is not on this machine
  the run's ``hydra/`` and ``adapter/`` artifacts are downloaded instead.

Every failure is a :class:`~glm_experiments.errors.UserError` with a one-line message.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from glm_experiments.errors import UserError

log = logging.getLogger(__name__)

CONFIG_FILE = Path(".hydra") / "config.yaml"
ADAPTER_DIR = "adapter"
METHOD_FILE = "method.json"
RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: DictConfig
    model: Any
    tokenizer: Any
    template: Any
    method: str  # the method named in adapter/method.json

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / ADAPTER_DIR


# ------------------------------------------------------------------------------ finding a run
def _is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def find_run_dir(run: str | os.PathLike, tracking_uri: str | None = None) -> Path:
    """The run directory that ``run`` (a path or an MLflow run id) names. Its MLflow run, if a killed process left
    it RUNNING, is marked FAILED on the way (tracking/mlflow_tracker.close_if_dead)."""
    from glm_experiments.tracking.mlflow_tracker import close_if_dead

    run_dir = _find_run_dir(run, tracking_uri)
    close_if_dead(run_dir, "a command that opened its run directory")
    return run_dir


def _find_run_dir(run: str | os.PathLike, tracking_uri: str | None = None) -> Path:
    text = str(run).strip()
    if not text:
        raise UserError("--run is empty: give a run directory or an MLflow run id")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"run not found: {path} is a file, not a run directory")
        if _is_run_dir(path):
            return path.resolve()
        if (path / METHOD_FILE).is_file() and _is_run_dir(path.parent):  # the run's adapter/ dir
            if path.name != ADAPTER_DIR:  # adapter_last/ (train.keep_best): not what would load
                raise UserError(f"{path}: the commands load {path.parent / ADAPTER_DIR} (the best evaluation's step); "
                                f"to use {path.name}/ give it the name {ADAPTER_DIR} (swap the two directories)")
            return path.parent.resolve()
        raise UserError(f"run not found: {path} has no {CONFIG_FILE} (not a glm_experiments run directory)")
    if RUN_ID_RE.match(text):
        return _run_dir_from_mlflow(text, tracking_uri)
    raise UserError(f"run not found: {text!r} is neither a directory nor an MLflow run id (32 hex characters)")


def _tracking_uri(tracking_uri: str | None) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _run_dir_from_mlflow(run_id: str, tracking_uri: str | None) -> Path:
    uri = _tracking_uri(tracking_uri)
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():  # mlflow would silently create an empty store
            raise UserError(f"run not found: no MLflow store at {db.resolve()} (pass --tracking-uri)")
    import mlflow
    from mlflow.exceptions import MlflowException

    from glm_experiments.tracking.store import check_store

    check_store(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        info = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"run not found: no MLflow run {run_id} in {uri}") from None
    output_dir = info.data.tags.get("output_dir") or info.data.params.get("output_dir")  # a param before 2026-12
    if output_dir and _is_run_dir(Path(output_dir)):
        return Path(output_dir).resolve()
    # the directory is gone or on another machine: rebuild it from the run's artifacts
    dest = Path(tempfile.gettempdir()) / "glm_experiments_runs" / run_id
    if _is_run_dir(dest) and (dest / ADAPTER_DIR / METHOD_FILE).is_file():
        return dest
    log.info("run %s: %s is not here, downloading its artifacts to %s", run_id, output_dir, dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        hydra_dir = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="hydra", tracking_uri=uri)
        (dest / ".hydra").mkdir(exist_ok=True)
        (dest / CONFIG_FILE).write_text((Path(hydra_dir) / "config.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    except (MlflowException, OSError) as exc:
        raise UserError(f"run {run_id}: its directory {output_dir} does not exist here and its config artifact "
                        f"(hydra/config.yaml) cannot be downloaded ({type(exc).__name__})") from None
    try:
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ADAPTER_DIR, tracking_uri=uri, dst_path=str(dest))
    except (MlflowException, OSError):
        pass  # load_run reports the missing adapter
    return dest


# ------------------------------------------------------------------------------ its config
def load_run_config(run_dir: Path) -> DictConfig:
    """The run's resolved config (``output_dir`` pointed at ``run_dir``: Hydra's resolver is not running)."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError:
        raise UserError(f"run not found: {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - a broken yaml file
        raise UserError(f"cannot read {path}: {exc}") from None
    for key in ("model", "method", "data"):
        if key not in cfg:
            raise UserError(f"{path} has no '{key}' section: not a glm_experiments run config")
    cfg.output_dir = str(run_dir)
    return _typed(cfg, path)


def _typed(cfg: DictConfig, path: Path) -> DictConfig:
    """The saved yaml merged onto the structured schema, so nested configs (model.tiny, ...) are the
    dataclasses the loaders expect. A config from an older schema falls back to typing the model alone."""
    from glm_experiments.config.schema import Config, ModelConfig
    from glm_experiments.methods import method_schema

    try:
        typed = OmegaConf.merge(OmegaConf.structured(Config), cfg)
        schema = method_schema(cfg.method.get("name"))
        if schema is not None:
            typed.method = OmegaConf.merge(OmegaConf.structured(schema), cfg.method)
        return typed
    except Exception as exc:  # noqa: BLE001 - keys the current schema no longer knows
        log.warning("%s does not match the current config schema (%s); using it as saved", path, exc)
    try:
        cfg.model = OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.model)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot use the model config in {path}: {exc}") from None
    return cfg


def check_adapter(run_dir: Path) -> Path:
    adapter = Path(run_dir) / ADAPTER_DIR
    if not (adapter / METHOD_FILE).is_file():
        raise UserError(f"adapter missing: {adapter / METHOD_FILE} not found (did the run finish? "
                        f"an interrupted run can be finished with resume=auto hydra.run.dir={run_dir})")
    return adapter


def saved_method(run_dir: Path) -> str:
    from glm_experiments.methods.artifacts import read_method_json

    return read_method_json(check_adapter(run_dir))["method"]


def method_settings(cfg: DictConfig, method: str) -> dict | None:
    """The run's method config as a plain dict for ``load`` to check the saved settings against (None when
    the adapter was saved by another method). Plain, because the methods' setting checks compare JSON
    values and would see an omegaconf ListConfig as its string."""
    if cfg.method.get("name") != method:
        return None
    return OmegaConf.to_container(cfg.method, resolve=True)


# ------------------------------------------------------------------------------ the model
def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_base(cfg: DictConfig, method: str | None = None):
    """(base model, tokenizer, template) as the run built them, before its method was applied (quantized as the
    run's was when ``method`` is given; ``method=None``: full precision, e.g. to merge into)."""
    from glm_experiments.models.loading import load_model_and_tokenizer, template_for
    from glm_experiments.methods.quantized_base import quantization_config

    quantization = quantization_config(cfg) if method is not None else None
    model, tokenizer = load_model_and_tokenizer(cfg.model, quantization_config=quantization)
    template = template_for(cfg.model)
    return model, tokenizer, template


def load_run(run: str | os.PathLike, tracking_uri: str | None = None, device: str | None = None,
             with_adapter: bool = True) -> LoadedRun:
    """Find ``run``, rebuild its base model and load its adapter (in eval mode, on ``device``)."""
    from glm_experiments.methods import load_saved

    run_dir = find_run_dir(run, tracking_uri)
    cfg = load_run_config(run_dir)
    method = saved_method(run_dir) if with_adapter else cfg.method.name
    model, tokenizer, template = load_base(cfg, method if with_adapter else None)
    if with_adapter:
        model = load_checked_adapter(load_saved, model, run_dir, cfg, method)
    device = device or default_device()
    if not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False):
        model.to(device)
    model.eval()
    return LoadedRun(run_dir=run_dir, cfg=cfg, model=model, tokenizer=tokenizer, template=template, method=method)


def load_checked_adapter(load, model, run_dir: Path, cfg: DictConfig, method: str):
    """``load(model, adapter_dir, settings)`` after the adapter's files were checked against the base
    (checked_files.check_adapter_dir); what still fails to load is one line naming the run."""
    from glm_experiments.models.checked_files import CorruptFileError, check_adapter_dir

    adapter = Path(run_dir) / ADAPTER_DIR
    check_adapter_dir(adapter, model)
    _say_saved_step(adapter, run_dir)
    try:
        return load(model, adapter, method_settings(cfg, method))
    except CorruptFileError:
        raise
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise UserError(f"cannot load the adapter of {run_dir}: {exc}") from None
    except RuntimeError as exc:  # torch's load_state_dict: "size mismatch for ..." lines
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("size mismatch")), lines[0] if lines else "")
        raise UserError(f"cannot load the adapter of {run_dir}: its tensors do not fit the base model ({detail}"
                        f"{f'; {len(lines) - 2} more' if len(lines) > 2 else ''})") from None


def _say_saved_step(adapter: Path, run_dir: Path) -> None:
    """One line on stderr: which step's weights the adapter holds (train.keep_best: the best evaluation's)."""
    import sys

    from glm_experiments.recipe.best_checkpoint import saved_step_line

    line = saved_step_line(adapter)
    if line:
        print(f"{run_dir.name}: {line}", file=sys.stderr)


def add_run_arguments(parser, required: bool = True) -> None:
    """--run / --tracking-uri, shared by predict, merge and chat."""
    parser.add_argument("--run", required=required, help="run directory (holding .hydra/ and adapter/) or MLflow run id")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI for a run id (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
