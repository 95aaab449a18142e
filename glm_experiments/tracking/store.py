"""The MLflow store: where a tracking URI keeps its artifacts, a lock for the SQLite file, a store recognised as usable in seconds, the experiment opened (or created)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from urllib.parse import urlparse


from glm_experiments.config.schema import check_tracking_uri
from glm_experiments.errors import UserError



def artifact_root_for(tracking_uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside the database (``mlartifacts/``)."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite":
        return None
    db = Path(tracking_uri[len("sqlite:///"):])
    return (db.resolve().parent / "mlartifacts").as_uri()


@contextlib.contextmanager
def store_lock(tracking_uri: str):
    """Serialises the first use of a local SQLite store across processes.

    The first client of a fresh ``mlflow.db`` creates its tables (alembic migrations) and the default
    experiment, and get-or-create of our experiment is a check-then-insert: two runs started together on a
    fresh store raced on both and one crashed ("duplicate column name", UNIQUE constraint). Servers and
    other databases do their own locking.
    """
    if urlparse(tracking_uri).scheme != "sqlite":
        yield
        return
    from filelock import FileLock

    db = Path(tracking_uri[len("sqlite:///"):]).resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock"):
        yield


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_store(tracking_uri: str, timeout: float = 5.0) -> None:
    """An unusable store, said in seconds (MLflow itself retries for minutes): a SQLite path that is a directory
    or a file that is not a SQLite database, a server that does not answer."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        db = Path(tracking_uri[len("sqlite:///"):]).expanduser()
        if db.is_dir():
            raise UserError(f"tracking.tracking_uri={tracking_uri}: {db} is a directory, not an MLflow database; "
                            "pass another path, or use tracking=none")
        if db.is_file() and db.stat().st_size:
            with db.open("rb") as handle:
                if handle.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                    raise UserError(f"tracking.tracking_uri={tracking_uri}: {db} is not an SQLite database "
                                    "(damaged, or another file); move it, pass another path, or use tracking=none")
    elif parsed.scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # it answers (a proxy or an older server without /health): MLflow's own calls say the rest
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"tracking.tracking_uri={tracking_uri}: the MLflow server does not answer ({reason}); "
                            "start it, fix MLFLOW_TRACKING_URI / tracking.tracking_uri, or use tracking=none") from None


# MLflow 3's UI opens an experiment by its kind: without this tag it guesses "GenAI" (a traces overview, the
# runs table one click away); these experiments hold training runs
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def open_experiment(tracking_cfg):
    """``(MlflowClient, experiment id)`` of ``tracking_cfg.experiment_name``, created (artifacts beside a
    SQLite store) if missing. ``tracking_cfg.description`` (if set) becomes the experiment's description
    (the ``mlflow.note.content`` tag the UI shows), on creation and whenever it changed."""
    from mlflow import MlflowClient

    check_tracking_uri(tracking_cfg)
    check_store(tracking_cfg.tracking_uri)
    description = tracking_cfg.get("description")
    note = "mlflow.note.content"
    wanted = {**EXPERIMENT_KIND, **({note: description} if description else {})}
    with store_lock(tracking_cfg.tracking_uri):
        client = MlflowClient(tracking_uri=tracking_cfg.tracking_uri)  # builds the store: tables on first use
        experiment = client.get_experiment_by_name(tracking_cfg.experiment_name)
        if experiment is not None:
            for key, value in wanted.items():
                if experiment.tags.get(key) != value:
                    client.set_experiment_tag(experiment.experiment_id, key, value)
            return client, experiment.experiment_id
        location = tracking_cfg.get("artifact_location") or artifact_root_for(tracking_cfg.tracking_uri)
        return client, client.create_experiment(tracking_cfg.experiment_name, artifact_location=location, tags=wanted)
