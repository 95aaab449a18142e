"""A training loss or gradient norm that turns NaN/inf (issue 30, item 3): the run stops at that step with one line
naming it and the last finite loss, that step's checkpoint is not saved, the MLflow run ends FAILED with tags saying
why, and the last good checkpoint continues with resume=auto; ``train.on_nonfinite=skip_step`` trains to the end."""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import pytest

from tests.helpers.common import compose

# the tiny model made to diverge: a huge learning rate without clipping, warmed up over 2 steps: step 1 updates
# nothing (lr 0), step 2 at 5e3 wrecks the weights, step 3's gradients are NaN
DIVERGING = ["train.learning_rate=1e4", "train.max_grad_norm=0", "train.lr_scheduler_type=linear",
             "train.warmup_ratio=0.5", "train.max_steps=4"]
SMALL = ["train.save_steps=1", "train.save_total_limit=0", "train.logging_steps=1",
         "train.per_device_train_batch_size=4", "data.max_train_samples=16", "eval.before_training=false",
         "eval.max_samples=2", "eval.max_new_tokens=4", "eval.batch_size=2"]


def _run(tmp_path, overrides: list[str]):
    from glm_experiments.recipe.train import run

    return run(compose([*SMALL, *overrides, f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                        "tracking.experiment_name=nonfinite", f"output_dir={tmp_path / 'run'}"]))


def _runs(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("nonfinite")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_diverging_run_stops_at_the_first_nonfinite_step_and_resumes(tmp_path):
    from glm_experiments.recipe.trainer import NonFiniteTraining

    start = time.perf_counter()
    with pytest.raises(NonFiniteTraining) as info:
        _run(tmp_path, DIVERGING)
    stopped_after = time.perf_counter() - start
    message = str(info.value)
    assert message.startswith("step 3: training gradient norm nan (loss "), message
    assert "(last finite step 2: loss 0.71" in message, message
    # checkpoint-2 holds the weights that give step 3 its NaN: resuming from it would repeat it at any learning rate
    assert "(checkpoint-2 set aside: its weights give this step the same): continue from checkpoint-1 with " \
           "resume=auto and a lower train.learning_rate (now 10000)" in message, message
    assert "\n" not in message
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1", "checkpoint-2.nonfinite"]  # no step 3
    [failed] = _runs(tmp_path)
    assert failed.info.status == "FAILED"
    tags = failed.data.tags
    assert tags["failure"] == "nonfinite_training" and tags["nonfinite.step"] == "3"
    assert tags["nonfinite.last_checkpoint"] == "checkpoint-1" and tags["error"].startswith("NonFiniteTraining: step 3")

    # the last good checkpoint, with a lower learning rate (which replaces the restored schedule's)
    result = _run(tmp_path, [*DIVERGING, "train.learning_rate=1e-3", "resume=auto"])
    state = json.loads((checkpoints / "checkpoint-4" / "trainer_state.json").read_text())
    logged = {h["step"]: h for h in state["log_history"] if "loss" in h}
    assert sorted(logged) == [1, 2, 3, 4] and all(math.isfinite(h["loss"]) for h in logged.values())
    assert logged[3]["learning_rate"] == pytest.approx(1e-3)  # not 1e4 from the checkpoint's scheduler
    assert json.loads((tmp_path / "run" / "result.json").read_text())["run_id"] == result.run_id
    assert [r.info.status for r in _runs(tmp_path)] == ["FAILED", "FINISHED"]
    print(f"stopped after {stopped_after:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_skip_step_trains_to_the_end(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        result = _run(tmp_path, [*DIVERGING, "train.on_nonfinite=skip_step", "train.save_steps=0"])
    assert result.train_metrics["skipped_steps"] == 2
    skipped = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert skipped[0].startswith("step 3: training gradient norm nan"), skipped
    [run] = _runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.metrics["train/skipped_steps"] == 2


def test_a_zero_loss_with_supervised_tokens_is_warned_once(monkeypatch, caplog):
    from transformers import Trainer

    from glm_experiments.recipe.trainer import GlmTrainer

    monkeypatch.setattr(Trainer, "log", lambda self, logs, *a, **k: None)
    trainer = object.__new__(GlmTrainer)  # the logging path alone, without a model
    vars(trainer).update(tokens_seen=100, skipped_steps=0, _window_tokens=100, _window_supervised=40,
                         _window_start=time.perf_counter(), _warned=set(), state=SimpleNamespace(global_step=7))
    with caplog.at_level("WARNING"):
        trainer.log({"loss": 0.0})
        trainer._window_supervised = 40
        trainer.log({"loss": 0.0})
        trainer.log({"loss": 0.0})  # no supervised tokens in this window: not this warning
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("step 7: training loss is exactly 0 while the batches hold 40 supervised tokens: likely "
                           "every label masked by truncation"), line
    assert "half-precision underflow" in line
