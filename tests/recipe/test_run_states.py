"""Run directories are never overwritten, and MLflow run states tell the truth.

* run and sweep directory names carry microseconds and the process id: runs started together never share one;
* a directory holding a run is written into again only with ``resume=...``, and a refused or impossible
  resume leaves every file byte-identical (mtimes included);
* SIGTERM ends a run KILLED with its checkpoints kept and a non-zero exit; a run that a dead process left
  RUNNING is marked FAILED by the next run of its directory; a resumed run links to the one it continues;
* two first runs on a fresh SQLite store both succeed (its tables are created under a file lock).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.common import checkout_env, run_cli, signal_after_checkpoint

# the shortest run that writes checkpoints: 1-sample batches, no evaluation
QUICK = ["train.per_device_train_batch_size=1", "data.max_train_samples=8", "train.logging_steps=1",
         "data.dev_file=null", "eval.before_training=false", "train.save_total_limit=5"]


def snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every path under ``root`` (hidden ones included) with its bytes and mtime."""
    paths = [root, *sorted(root.rglob("*"))]
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in paths}


def error_line(result) -> str:
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[-1]


def mlflow_runs(uri: str, experiment: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return {r.info.run_id: r for r in client.search_runs([exp.experiment_id], max_results=100)}


# ------------------------------------------------------------------------------ names
def test_run_and_sweep_dir_names_are_sub_second_and_per_process():
    from glm_experiments.compose import compose

    cfg = compose(["method=freeze"], return_hydra_config=True)
    stamp = r"\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d\.\d{6}-" + str(os.getpid())
    assert re.fullmatch(rf"outputs/{stamp}_freeze_tiny", cfg.hydra.run.dir), cfg.hydra.run.dir
    assert re.fullmatch(rf"multirun/{stamp}", cfg.hydra.sweep.dir), cfg.hydra.sweep.dir


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_runs_started_together_on_a_fresh_store(tmp_path):
    """Default run dirs and the default ./mlflow.db: each run its own directory, config and MLflow run."""
    env = checkout_env({**os.environ, "PYTHONUNBUFFERED": "1"})
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = {lr: subprocess.Popen([sys.executable, "-m", "glm_experiments", *QUICK, "train.max_steps=1",
                                   "train.save_steps=0", f"train.learning_rate={lr}"],
                                  cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for lr in ("0.001", "0.002")}
    for proc in procs.values():
        _, err = proc.communicate(timeout=500)
        assert proc.returncode == 0, err[-3000:]
    run_dirs = sorted((tmp_path / "outputs").glob("*/*"))
    assert len(run_dirs) == 2, run_dirs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = mlflow_runs(uri, "glm_experiments")
    assert len(runs) == 2 and {r.info.status for r in runs.values()} == {"FINISHED"}
    seen = set()
    for run_dir in run_dirs:
        lr = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["train"]["learning_rate"]
        run = next(r for r in runs.values() if r.data.tags["glm_experiments.run_dir"] == str(run_dir.resolve()))
        assert float(run.data.params["train.learning_rate"]) == lr
        seen.add(lr)
    assert seen == {0.001, 0.002}


def test_concurrent_first_use_of_a_fresh_store(tmp_path):
    """Three processes open a fresh mlflow.db at the same moment (before the lock, 2 of 3 crashed on
    "duplicate column name" / alembic errors while creating the tables)."""
    script = (
        "import sys, time\nfrom pathlib import Path\nfrom omegaconf import OmegaConf\n"
        "from glm_experiments.config.schema import TrackingConfig\nfrom glm_experiments.tracking.mlflow_tracker import Tracker\n"
        "cfg = OmegaConf.structured(TrackingConfig(tracking_uri=sys.argv[1], experiment_name='race'))\n"
        "Path(sys.argv[3]).touch()\n"  # imported, ready
        "while not Path(sys.argv[2]).exists():\n    time.sleep(0.001)\n"
        "t = Tracker(cfg)\nt.start('r', {})\nt.end()\n"
    )
    uri, go = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", script, uri, str(go), str(r)], stderr=subprocess.PIPE, text=True)
             for r in ready]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    runs = mlflow_runs(uri, "race")
    assert len(runs) == 3 and {r.info.status for r in runs.values()} == {"FINISHED"}


# ---------------------------------------------------------------------------- refusal
def fake_run(run_dir: Path, steps=(2,)) -> None:
    """The files a finished run leaves (the refusal looks at nothing else)."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("train:\n  learning_rate: 0.005\n")
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (run_dir / "result.json").write_text('{"run_id": "abc"}')
    for step in steps:
        (run_dir / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")


def test_a_finished_run_dir_is_not_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    before = snapshot(run_dir)
    time.sleep(0.01)  # an mtime written now would differ
    refused = error_line(run_cli(["tracking=none", f"hydra.run.dir={run_dir}"], tmp_path))
    assert refused == (f"error: {run_dir} already holds a run (.hydra, result.json, adapter, checkpoints); not "
                       "overwriting it: continue it with resume=auto (or resume=<step>), or leave hydra.run.dir to "
                       "its default for a new directory")
    missing = error_line(run_cli(["tracking=none", f"hydra.run.dir={run_dir}", "resume=7"], tmp_path))
    assert missing == (f"error: resume=7: {run_dir}/checkpoints/checkpoint-7 does not exist (complete checkpoints: "
                       "['checkpoint-2'])")
    # products written somewhere else than Hydra's job dir are protected too
    elsewhere = error_line(run_cli(["tracking=none", f"hydra.run.dir={tmp_path / 'new'}", f"output_dir={run_dir}"],
                                   tmp_path))
    assert elsewhere.startswith(f"error: {run_dir} already holds a run")
    assert snapshot(run_dir) == before
    assert not (tmp_path / "new").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_finished_sweep_dir_is_not_overwritten(tmp_path):
    sweep_dir = tmp_path / "sweep"
    fake_run(sweep_dir / "0_lora")  # job 0 of method=lora,freeze
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    before = snapshot(sweep_dir)
    time.sleep(0.01)
    args = ["--multirun", "tracking=none", f"hydra.sweep.dir={sweep_dir}", "method=lora,freeze"]
    refused = error_line(run_cli(args, tmp_path))
    assert refused == (f"error: {sweep_dir} already holds a sweep (1 job directories); not overwriting it: continue "
                       "its jobs with resume=auto, or leave hydra.sweep.dir to its default for a new directory")
    missing = error_line(run_cli([*args, "resume=7"], tmp_path))
    assert missing.startswith(f"error: resume=7: {sweep_dir}/0_lora/checkpoints/checkpoint-7 does not exist")
    assert snapshot(sweep_dir) == before


# ---------------------------------------------------------------------------- states
def test_process_is_gone_only_when_provably_dead():
    from glm_experiments.tracking.mlflow_tracker import process_is_gone, this_process

    assert not process_is_gone(this_process())
    host, pid, started = this_process().split(":")
    assert process_is_gone(f"{host}:{pid}:{float(started) - 100:.2f}")  # same pid, another process (reused)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert process_is_gone(f"{host}:{ended.stdout.strip()}:0.00")
    assert not process_is_gone(f"another-host:{ended.stdout.strip()}:0.00")  # cannot tell: left alone


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_sigterm_and_resume_leave_true_states(tmp_path):
    """A: SIGKILLed (stays RUNNING); B (resume=auto): marks A FAILED, links to it, is SIGTERMed (KILLED, exit
    143, checkpoints kept); C (resume=auto): finishes, links to B. Then the finished directory refuses a rerun
    and an impossible resume without changing a byte."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    args = [*QUICK, "train.max_steps=6", "train.save_steps=2", f"tracking.tracking_uri={uri}",
            "tracking.experiment_name=states", f"hydra.run.dir={run_dir}"]

    signal_after_checkpoint(args, run_dir, tmp_path, 2, signal.SIGKILL)
    (a,) = mlflow_runs(uri, "states").values()
    assert a.info.status == "RUNNING"  # nothing could end it

    code, err = signal_after_checkpoint([*args, "resume=auto"], run_dir, tmp_path, 4, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert (f"interrupted by SIGTERM: the MLflow run ended KILLED; continue from the last checkpoint with "
            f"hydra.run.dir={run_dir} resume=auto") in err
    assert "Traceback" not in err
    runs = mlflow_runs(uri, "states")
    a = runs.pop(a.info.run_id)
    (b,) = runs.values()
    assert a.info.status == "FAILED"
    assert "ended without closing this run" in a.data.tags["error"] and b.info.run_id in a.data.tags["error"]
    assert b.info.status == "KILLED" and b.data.tags["error"] == "KeyboardInterrupt: SIGTERM"
    assert b.data.tags["resumed_from_run_id"] == a.info.run_id
    assert b.data.tags["resumed_from_checkpoint"] == "checkpoint-2"
    kept = {p.name for p in (run_dir / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").is_file()}
    assert {"checkpoint-2", "checkpoint-4"} <= kept
    assert not (run_dir / "result.json").exists()

    done = run_cli([*args, "resume=auto"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = mlflow_runs(uri, "states")
    (c,) = (r for r in runs.values() if r.info.run_id not in (a.info.run_id, b.info.run_id))
    assert c.info.status == "FINISHED" and c.data.tags["resumed_from_run_id"] == b.info.run_id
    assert c.data.tags["resumed_from_checkpoint"] == "checkpoint-4"
    assert c.data.tags["glm_experiments.run_dir"] == str(run_dir.resolve())

    before = snapshot(run_dir)
    time.sleep(0.01)
    assert "already holds a run" in error_line(run_cli(args, tmp_path))
    assert "checkpoint-7 does not exist" in error_line(run_cli([*args, "resume=7"], tmp_path))
    assert snapshot(run_dir) == before
    assert len(mlflow_runs(uri, "states")) == 3  # a refused run starts no MLflow run


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_to_a_multi_process_run_reaches_its_workers(tmp_path):
    """SIGTERM to the Hydra process alone (``kill <pid>``, a container's PID 1) is passed to torchrun, whose
    agent passes it to the workers: rank 0's run ends KILLED, no worker is left behind."""
    import psutil

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    args = [*QUICK, "launcher.nproc_per_node=2", "train.max_steps=8", "train.save_steps=1",
            f"tracking.tracking_uri={uri}", "tracking.experiment_name=dist_states", f"hydra.run.dir={run_dir}"]
    code, err = signal_after_checkpoint(args, run_dir, tmp_path, 1, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err[-5000:]
    assert "interrupted by SIGTERM: the MLflow run ended KILLED" in err
    (run,) = mlflow_runs(uri, "dist_states").values()
    assert run.info.status == "KILLED" and run.data.tags["error"] == "KeyboardInterrupt: SIGTERM"
    assert (run_dir / "checkpoints" / "checkpoint-1" / "trainer_state.json").is_file()
    workers = [p for p in psutil.process_iter(["cmdline"]) if str(run_dir) in " ".join(p.info["cmdline"] or [])]
    assert not workers, workers
