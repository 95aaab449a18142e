"""tracking=server for real: a throwaway PostgreSQL cluster, ``mlflow server`` on it with proxied artifacts, and a
2-job sweep run by ``hydra/launcher=parallel`` (both jobs at once) against it. docs/mlflow_server.md is the setup
this reproduces.

PostgreSQL comes from Debian's ``postgresql`` package (``.ci/run`` installs it with apt-get). Without its binaries
the test is skipped, and says why; nothing else skips it. As root (CI), initdb and the server run as the
``postgres`` user the package creates (initdb refuses root), with the data directory in a temp dir it owns.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.common import TINY_SWEEP_JOB, demo_data_slice, run_cli

TINY = ["train.max_steps=3", *TINY_SWEEP_JOB]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """Debian installs the server binaries in /usr/lib/postgresql/<version>/bin, not on PATH."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parts[4]),
    )
    return Path(versions[-1]).parent if versions else None


@pytest.fixture(scope="module")
def postgres():
    """``postgresql+psycopg2://postgres@127.0.0.1:<port>/mlflow`` of a cluster made for this test, stopped afterwards."""
    bindir = postgres_bin()
    if bindir is None:
        reason = (
            "PostgreSQL is not installed (no pg_ctl on PATH or in /usr/lib/postgresql/*/bin): "
            "apt-get install -y postgresql, as .ci/run does"
        )
        print(f"SKIPPED: {reason}", flush=True)
        pytest.skip(reason)
    as_user: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="glm-pg-"))
    if (
        os.geteuid() == 0
    ):  # initdb refuses root: run the cluster as the package's postgres user
        import pwd

        user = pwd.getpwnam("postgres")
        os.chown(data, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    log = data / "server.log"
    run = lambda *cmd: subprocess.run(
        [*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120
    )
    run(
        str(bindir / "initdb"),
        "-D",
        str(data / "db"),
        "-U",
        "postgres",
        "--auth=trust",
        "--no-locale",
        "-E",
        "UTF8",
    )
    run(
        str(bindir / "pg_ctl"),
        "-D",
        str(data / "db"),
        "-l",
        str(log),
        "-w",
        "-t",
        "60",
        "start",
        "-o",
        f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={data}",
    )
    try:
        import psycopg2

        conn = psycopg2.connect(
            host="127.0.0.1", port=port, user="postgres", dbname="postgres"
        )
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE mlflow")
        conn.close()
        # the driver named: SQLAlchemy >= 2.1 would otherwise look for psycopg 3
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(
            [
                *as_user,
                str(bindir / "pg_ctl"),
                "-D",
                str(data / "db"),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
            check=False,
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """(tracking URI, artifacts destination) of ``mlflow server`` on the PostgreSQL store, as docs/mlflow_server.md
    starts it; its log is printed if it does not come up."""
    work = tmp_path_factory.mktemp("mlflow_server")
    artifacts, port = work / "artifacts", free_port()
    log = open(work / "server.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            postgres,
            "--artifacts-destination",
            str(artifacts),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = (
            time.monotonic() + 180
        )  # the first start creates the tables (alembic migrations)
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"mlflow server did not start:\n{(work / 'server.log').read_text()[-4000:]}"
                )
            time.sleep(1)
        yield uri, artifacts
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:  # not longer: uvicorn would wait for this test's keep-alive connection to close
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_parallel_sweep_against_postgres_backed_server(mlflow_server, tmp_path):
    uri, artifacts = mlflow_server
    train, dev = demo_data_slice(tmp_path)
    sweep_dir = tmp_path / "multirun"
    proc = run_cli(
        ["--multirun", "hydra/launcher=parallel", "hydra.launcher.max_parallel=2", "tracking=server",
         "tracking.experiment_name=server_sweep", "train.learning_rate=1e-3,2e-3", *TINY, f"data.train_file={train}",
         f"data.dev_file={dev}", f"hydra.sweep.dir={sweep_dir}"],
        tmp_path, timeout=540, env_changes={"MLFLOW_TRACKING_URI": uri, "GLM_EXPERIMENTS_PARENT_RUN_ID": None},
    )
    logs = "\n".join(
        p.read_text()[-2000:] for p in sweep_dir.glob(".submitit/*/*_log.*")
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + logs
    assert "2 job(s) at a time" in proc.stdout + proc.stderr
    assert (
        not (tmp_path / "mlflow.db").exists()
        and not (tmp_path / "mlartifacts").exists()
    )  # all on the server

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("server_sweep")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [
        r for r in runs if r.data.tags.get("glm_experiments.role") == "sweep_parent"
    ]
    children = [r for r in runs if r not in parents]
    assert len(parents) == 1 and len(children) == 2, [r.info.run_name for r in runs]
    parent = parents[0]
    assert (
        parent.info.status == "FINISHED"
        and parent.data.tags["sweep.failed_jobs"] == "0"
    )
    assert (
        parent.data.tags["job.0.status"]
        == parent.data.tags["job.1.status"]
        == "FINISHED"
    )
    assert (
        parent.data.metrics["sweep/jobs_completed"] == 2
        and parent.data.metrics["sweep/jobs_failed"] == 0
    )
    # the two jobs ran at the same time: each started before the other ended
    (a, b) = sorted(children, key=lambda r: r.info.start_time)
    assert b.info.start_time < a.info.end_time, "the jobs did not overlap"

    by_lr = {float(c.data.params["train.learning_rate"]): c for c in children}
    assert set(by_lr) == {1e-3, 2e-3}
    for lr, child in by_lr.items():
        run_id = child.info.run_id
        assert (
            child.info.status == "FINISHED"
            and child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        )
        job_dir = Path(child.data.tags["glm_experiments.run_dir"])
        assert (
            job_dir.parent == sweep_dir.resolve()
        )  # both jobs in the one sweep directory
        # params: every leaf of the job's resolved config (as the job wrote it) is a param, with its value
        params = child.data.params
        assert (
            params["tracking.tracking_uri"] == uri and params["method.name"] == "lora"
        )
        assert params["train.max_steps"] == "3" and params["data.train_file"] == str(
            train
        )
        assert len(params) > 80, len(params)
        # metrics: the whole loss curve, eval before and after training, the run's numbers
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [
            1,
            2,
            3,
        ]
        assert sorted(
            m.step for m in client.get_metric_history(run_id, "eval/rouge-l")
        ) == [0, 3]
        for key in (
            "perf/train_seconds",
            "perf/peak_rss_mib",
            "model/trainable_params",
            "eval/loss",
        ):
            assert key in child.data.metrics, key
        # artifacts: uploaded through the server into its --artifacts-destination, and they read back
        result = json.loads((job_dir / "result.json").read_text())
        assert result["run_id"] == run_id
        assert child.info.artifact_uri.startswith("mlflow-artifacts:")
        paths = {a.path for a in client.list_artifacts(run_id)}
        assert {
            "result.json",
            "hydra",
            "predictions",
            "predictions_jsonl",
            "adapter",
        } <= paths, paths
        downloaded = client.download_artifacts(
            run_id, "result.json", str(tmp_path / f"dl{lr}")
        )
        assert json.loads(Path(downloaded).read_text()) == result
        stored = list(artifacts.rglob(f"{run_id}/artifacts/result.json"))
        assert len(stored) == 1 and json.loads(stored[0].read_text()) == result
        assert {a.path for a in client.list_artifacts(run_id, "adapter")} >= {
            "adapter/adapter_model.safetensors"
        }

    from glm_experiments.study.comparison import compare_runs

    rows = compare_runs(tracking_uri=uri, parent=parent.info.run_id)
    assert sorted(float(r["train.learning_rate"]) for r in rows) == [1e-3, 2e-3]
    assert all(r["ROUGE-L"] is not None for r in rows)


def test_server_tracking_needs_an_address(monkeypatch):
    """tracking=server with no MLFLOW_TRACKING_URI: one line naming the setting, before anything loads."""
    from glm_experiments.config.schema import check_settings
    from glm_experiments.errors import UserError
    from tests.helpers.common import compose

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose(["tracking=server"])
    with pytest.raises(
        UserError,
        match=r"^tracking.tracking_uri is empty: tracking=server takes .*MLFLOW_TRACKING_URI",
    ):
        check_settings(cfg)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    cfg = compose(["tracking=server"])
    assert cfg.tracking.tracking_uri == "http://mlflow.example:5000"
    check_settings(cfg)
