"""The embedded default run, end to end through the CLI, into a temporary MLflow store."""

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.common import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python -m glm_experiments` exactly as the README runs it, with only the output places moved."""
    tmp = tmp_path_factory.mktemp("default_run")
    uri = f"sqlite:///{tmp}/mlflow.db"
    proc = run_cli([f"hydra.run.dir={tmp}/run", f"tracking.tracking_uri={uri}"], tmp, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, uri, proc


def test_default_run_learns(default_run):
    tmp, _, proc = default_run
    result = json.loads((tmp / "run" / "result.json").read_text())
    before, after = result["metrics_before"]["rouge-l"], result["metrics_after"]["rouge-l"]
    assert after > 20, result
    assert after >= 2 * before, result
    assert result["metrics_after"]["bleu-4"] > result["metrics_before"]["bleu-4"]
    # the summary names the run and how to look at it
    assert "rouge-l" in proc.stdout and "mlflow ui --backend-store-uri" in proc.stdout
    assert result["run_id"] in proc.stdout
    # a quiet console: one line per logging step, no library progress bars, warnings or tracebacks
    output = proc.stdout + proc.stderr
    for noise in ("Loading weights", "Writing model shards", "Saving the dataset", "Warning", "Traceback"):
        assert noise not in output, (noise, output[-3000:])
    assert sum(line.startswith("step ") for line in proc.stdout.splitlines()) == 300 // 10


def test_default_run_is_tracked(default_run):
    tmp, uri, _ = default_run
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("glm_experiments")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    # params: dotted names that are valid Hydra overrides, values as an override spells them
    assert params["method.name"] == "lora" and params["method.r"] == "8"
    assert params["model.name"] == "tiny" and params["data.name"] == "adgen_demo"
    assert params["train.max_steps"] == "300" and params["data.max_source_length"] == "64"
    assert params["method.target_modules"] == "[]" and params["resume"] == "null"
    assert tags["hydra.choices.method"] == "lora" and tags["hydra.choices.model"] == "tiny"
    assert "tracking.tracking_uri=" in tags["hydra.overrides"]
    assert "output_dir" not in params and tags["output_dir"]  # a place, not a setting: not a param
    assert tags["mlflow.runName"] == tags["glm_experiments.display_name"] == "lora · tiny"  # nothing overridden
    assert "method3" in tags["metric_definition.bleu-4"]
    generation = json.loads(tags["eval.generation_kwargs"])
    assert generation["do_sample"] is False and generation["max_new_tokens"] == 64 and len(generation["eos_token_id"]) == 3

    metrics = run.data.metrics
    for name in ["train/loss", "eval/rouge-l", "eval/bleu-4", "eval/loss", "model/trainable_params",
                 "model/total_params", "perf/tokens_per_s", "perf/peak_rss_mib", "data/train_records"]:
        assert name in metrics, name
    assert 0 < metrics["model/trainable_params"] < metrics["model/total_params"]
    assert metrics["data/train_records"] == 3000
    rouge_history = client.get_metric_history(run.info.run_id, "eval/rouge-l")
    assert [m.step for m in rouge_history] == [0, 300]
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(losses) >= 10 and losses[-1] < losses[0]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"hydra", "adapter", "predictions", "result.json"} <= artifacts
    hydra_files = {a.path for a in client.list_artifacts(run.info.run_id, "hydra")}
    assert {"hydra/config.yaml", "hydra/overrides.yaml"} <= hydra_files
    adapter_files = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter_files
    table = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/predictions/after.json")
    assert set(table["columns"]) >= {"input", "reference", "prediction", "rouge-l"}
    assert len(table["data"]) == 64
    # artifacts live beside the database
    assert (tmp / "mlartifacts").is_dir()


def test_default_run_files(default_run):
    tmp, _, _ = default_run
    run_dir = tmp / "run"
    rows = [json.loads(line) for line in (run_dir / "predictions" / "after.jsonl").read_text().splitlines()]
    assert len(rows) == 64 and {"input", "reference", "prediction", "bleu-4"} <= set(rows[0])
    checkpoint = run_dir / "checkpoints" / "checkpoint-300"
    assert (checkpoint / "trainable.safetensors").exists() and (checkpoint / "optimizer.pt").exists()
    # checkpoints hold the trainable tensors only, never the frozen base
    assert (checkpoint / "trainable.safetensors").stat().st_size < 0.2 * 4 * 1_000_000
