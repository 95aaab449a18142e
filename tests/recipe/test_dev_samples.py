"""data.max_dev_samples bounds the eval-loss pass after training; debug=smoke sets it small."""

from __future__ import annotations

import json

import pytest

from tests.helpers.common import ROOT, compose, demo_data_slice, run_cli


def test_smoke_sets_a_small_bound_and_the_default_is_all():
    assert compose([]).data.max_dev_samples is None
    assert 1 <= compose(["debug=smoke"]).data.max_dev_samples <= 16


@pytest.mark.slow
def test_smoke_with_a_1000_sample_dev_file_evaluates_at_most_max_dev_samples(tmp_path):
    from mlflow import MlflowClient

    train_file, _ = demo_data_slice(tmp_path, train_lines=32)
    lines = (ROOT / "data/adgen_demo/dev.json").read_text(encoding="utf-8").splitlines(True)
    dev_file = tmp_path / "dev_1000.json"
    dev_file.write_text("".join(lines[i % len(lines)] for i in range(1000)), encoding="utf-8")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    result = run_cli(["debug=smoke", f"data.train_file={train_file}", f"data.dev_file={dev_file}",
                      "train.max_steps=2", f"tracking.tracking_uri={uri}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    bound = compose(["debug=smoke"]).data.max_dev_samples
    after = json.loads((run_dir / "result.json").read_text())["metrics_after"]
    assert after["loss_samples"] == bound < 1000
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("glm_experiments").experiment_id])
    assert run.data.metrics["eval/loss_samples"] == bound
    assert run.data.metrics["data/dev_records"] == 1000  # the whole file was read and validated
    assert f"loss ({bound:,} dev samples)" in result.stdout


@pytest.mark.slow
def test_num_train_epochs_counts_passes_instead_of_steps(tmp_path):
    """train.num_train_epochs=2 over 16 samples at batch 8: 4 optimizer steps, whatever train.max_steps says."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    result = run_cli(["train.num_train_epochs=2", "train.max_steps=1000", "data.max_train_samples=16",
                      "train.per_device_train_batch_size=8", "train.logging_steps=1", "train.save_steps=0",
                      "eval.before_training=false", "eval.max_samples=2", "eval.max_new_tokens=4",
                      "data.max_dev_samples=4", f"tracking.tracking_uri={uri}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    run_id = json.loads((run_dir / "result.json").read_text())["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4]
