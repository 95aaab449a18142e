"""An unusable MLflow store is said in seconds, and a run a killed process left RUNNING is marked FAILED by the next
command that opens its run directory, predict included (issue 31, part 5)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers.common import ROOT
from tests.helpers.runs import call_cli

DEV = str(ROOT / "data" / "adgen_demo" / "dev.json")


def test_an_unusable_store_is_said_at_once(tmp_path):
    from glm_experiments.errors import UserError
    from glm_experiments.tracking.store import check_store

    (tmp_path / "dir.db").mkdir()
    (tmp_path / "junk.db").write_text("not a database")
    cases = {f"sqlite:///{tmp_path / 'dir.db'}": "is a directory, not an MLflow database",
             f"sqlite:///{tmp_path / 'junk.db'}": "is not an SQLite database",
             "http://127.0.0.1:9": "the MLflow server does not answer"}
    for uri, says in cases.items():
        start = time.monotonic()
        with pytest.raises(UserError, match=says):
            check_store(uri)
        assert time.monotonic() - start < 10
    check_store(f"sqlite:///{tmp_path / 'new.db'}")  # a store still to be created is fine


def dead_process() -> str:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return f"{socket.gethostname()}:{ended.stdout.strip()}:0.00"


@pytest.mark.slow
def test_predict_marks_a_dead_run_failed(small_run, tmp_path, capsys):
    from mlflow import MlflowClient

    from glm_experiments.predict import main
    from glm_experiments.tracking.mlflow_tracker import PROCESS_TAG, RUN_FILE

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("dead")
    killed = client.create_run(experiment, tags={PROCESS_TAG: dead_process()}).info.run_id  # RUNNING, kill -9'd
    run = tmp_path / "run"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("result.json"))  # killed before it finished
    (run / RUN_FILE).write_text(json.dumps({"run_id": killed, "tracking_uri": uri}))
    assert client.get_run(killed).info.status == "RUNNING"

    code, line = call_cli(main, ["--run", str(run), "--input", DEV, "--output", str(tmp_path / "p.jsonl"),
                                 "--max-samples", "1", "--max-new-tokens", "2", "--no-progress"], capsys)
    assert code == 0, line
    after = client.get_run(killed)
    assert after.info.status == "FAILED"
    assert after.data.tags["error"].endswith("marked FAILED by a command that opened its run directory")
