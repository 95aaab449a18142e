"""resume=auto never rewrites a finished run (issue 31, part 2): on a FINISHED run it does nothing and says so
(exit 0) unless a larger train.max_steps is given (then it continues in the same MLflow run); a train.max_steps
below the checkpoint's step and a config that differs from the run's saved one are refused in one line before
Hydra rewrites .hydra/*.yaml: the run directory's bytes stay what they were."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers.common import demo_data_slice, run_cli
from tests.helpers.runs import tree_hashes
from tests.recipe.test_run_states import error_line, mlflow_runs

BASE = ["method=lora", "train.save_steps=1", "train.logging_steps=1", "train.per_device_train_batch_size=2",
        "data.max_train_samples=4", "data.dev_file=null", "eval.before_training=false",
        "tracking.experiment_name=guard"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(args, run dir, tracking uri) of a finished, tracked 2-step LoRA run."""
    tmp = tmp_path_factory.mktemp("guard")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    run_dir = tmp / "run"
    args = [*BASE, f"tracking.tracking_uri={uri}", f"hydra.run.dir={run_dir}"]
    result = run_cli([*args, "train.max_steps=2"], tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return args, run_dir, uri


@pytest.mark.slow
def test_resume_of_a_finished_run(finished, tmp_path):
    args, run_dir, uri = finished
    before = tree_hashes(run_dir)
    (run_id,) = mlflow_runs(uri, "guard")

    done = run_cli([*args, "train.max_steps=2", "resume=auto"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == (f"run already finished at step 2: {run_dir} (nothing to do; "
                                   "train.max_steps=<more than 2> trains on)")
    assert tree_hashes(run_dir) == before

    below = error_line(run_cli([*args, "train.max_steps=1", "resume=auto"], tmp_path))
    assert below == f"error: train.max_steps=1 is below step 2, where the run in {run_dir} finished; nothing changed"
    earlier = error_line(run_cli([*args, "train.max_steps=2", "resume=1"], tmp_path))
    assert earlier.startswith("error: resume=1: the run in") and "finished at step 2" in earlier
    # a refused config (another method, other data) leaves .hydra/*.yaml as they were: predict still works
    other = error_line(run_cli([*args, "train.max_steps=2", "resume=auto", "method=ptuning", "data=spo_demo"],
                               tmp_path))
    assert other.startswith(f"error: cannot resume {run_dir}: the config differs from the run's saved one in "), other
    assert "method.name: lora -> ptuning" in other and "data.name: adgen_demo -> spo_demo" in other
    assert tree_hashes(run_dir) == before
    assert len(mlflow_runs(uri, "guard")) == 1  # a refused or empty resume opens no MLflow run

    more = run_cli([*args, "train.max_steps=3", "resume=auto"], tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["train"]["global_step"] == 3 and result["run_id"] == run_id
    assert (run_dir / "checkpoints" / "checkpoint-3" / "trainer_state.json").is_file()
    runs = mlflow_runs(uri, "guard")
    assert list(runs) == [run_id] and runs[run_id].info.status == "FINISHED"
    assert runs[run_id].data.tags["continued.train.max_steps"] == "3"
    assert runs[run_id].data.metrics["train/loss"] is not None


@pytest.mark.slow
def test_max_steps_below_an_interrupted_runs_checkpoint(finished, tmp_path):
    args, run_dir, _ = finished
    interrupted = tmp_path / "interrupted"
    shutil.copytree(run_dir, interrupted, ignore=shutil.ignore_patterns("result.json", "adapter"))
    before = tree_hashes(interrupted)
    step = max(int(p.name.split("-")[1]) for p in (interrupted / "checkpoints").glob("checkpoint-*"))
    line = error_line(run_cli([*args[:-1], f"hydra.run.dir={interrupted}", "train.max_steps=1", "resume=auto",
                               "tracking=none"], tmp_path))
    assert line == (f"error: train.max_steps=1 is below the step of {interrupted}/checkpoints/checkpoint-{step} "
                    f"({step}); resume with train.max_steps of at least that")
    assert tree_hashes(interrupted) == before


@pytest.mark.slow
def test_resume_falls_back_from_a_truncated_checkpoint_to_the_same_final_loss(tmp_path):
    """The newest checkpoint is truncated (a disk that filled up): resume=auto says so, continues from the one
    before and ends where an uninterrupted run ends."""
    quick = ["method=lora", "train.max_steps=4", "train.save_steps=1", "train.save_total_limit=5",
             "train.logging_steps=1", "train.per_device_train_batch_size=2", "data.max_train_samples=8",
             "data.dev_file=null", "eval.before_training=false", "tracking=none"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    result = run_cli([*quick, f"hydra.run.dir={whole}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # the same run as if killed after checkpoint-3 was written, whose trainable tensors were then cut short
    shutil.copytree(whole, broken, ignore=shutil.ignore_patterns("result.json", "adapter", "checkpoint-4"))
    damaged = broken / "checkpoints" / "checkpoint-3" / "trainable.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])

    result = run_cli([*quick, f"hydra.run.dir={broken}", "resume=auto"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout + result.stderr  # Hydra's log handler writes to stdout
    assert f"resume=auto: checkpoint-3 is damaged ({damaged}: " in said
    assert "resuming from checkpoint-2, the newest intact checkpoint" in said
    final = [json.loads((d / "result.json").read_text())["train"]["loss"] for d in (whole, broken)]
    assert final[1] == pytest.approx(final[0], abs=1e-5)
    assert tree_hashes(broken / "checkpoints").keys() == tree_hashes(whole / "checkpoints").keys()  # no staging left


@pytest.mark.slow
def test_resume_of_a_finished_sweep(tmp_path):
    """``--multirun resume=auto`` over a finished sweep: each job checks its own composed config against the one it
    saved (Hydra rewrites .hydra/*.yaml before a job starts; the saved one is put back on a refusal), so finished
    jobs are left as they were and a changed setting is refused in one line."""
    sweep_dir = tmp_path / "sweep"
    args = ["--multirun", *BASE, "tracking=none", "train.max_steps=2", "seed=1,2", f"hydra.sweep.dir={sweep_dir}"]
    first = run_cli(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / "result.json").is_file())
    assert len(jobs) == 2

    def job_bytes() -> list[dict]:  # the job's log file aside: Hydra appends to it
        return [{k: v for k, v in tree_hashes(job).items() if not k.endswith(".log")} for job in jobs]

    before = job_bytes()
    done = run_cli([*args, "resume=auto"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for job in jobs:
        assert (f"run already finished at step 2: {job} (nothing to do; train.max_steps=<more than 2> trains on)"
                in done.stdout), done.stdout[-3000:]
    assert job_bytes() == before

    # a path is not part of a job directory's name: the same directories, another config
    train_file, _ = demo_data_slice(tmp_path)
    refused = run_cli([*args, "resume=auto", f"data.train_file={train_file}"], tmp_path)
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = error_line(refused)
    assert line.startswith("error: cannot resume ") and f"-> {train_file}" in line, line
    assert job_bytes() == before  # .hydra/*.yaml put back: the jobs still describe the LoRA runs they hold

    # more steps is another job name (steps3): new job directories; the finished ones stay as they were
    more = run_cli([*args[:-2], "train.max_steps=3", *args[-2:], "resume=auto"], tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert len(list(sweep_dir.glob("*steps3*/result.json"))) == 2
    assert job_bytes() == before  # no kept copy left behind in the directories this sweep did not use
