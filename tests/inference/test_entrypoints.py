"""predict / merge / chat on a tiny LoRA run trained through the CLI and tracked in a temporary MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers.common import ROOT, checkout_env, run_cli

DEV = str(ROOT / "data" / "adgen_demo" / "dev.json")


def one_line_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """(run_dir, MLflow run id, tracking uri) of a 6-step LoRA run on the tiny model."""
    tmp = tmp_path_factory.mktemp("entry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    result = run_cli([
        "method=lora", "train.max_steps=6", "train.logging_steps=2", "eval.max_samples=4", "eval.max_new_tokens=8",
        "data.max_train_samples=64", "eval.before_training=false", f"tracking.tracking_uri={uri}",
        "tracking.experiment_name=entrypoints", f"hydra.run.dir={tmp / 'run'}",
    ], tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp / "run"
    run_id = json.loads((run_dir / "result.json").read_text())["run_id"]
    assert run_id
    return run_dir, run_id, uri


def predict_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(args, cwd, module="glm_experiments.predict")


def check_predictions(result, run_dir: Path, out: Path) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["samples"] == 4 and summary["method"] == "lora"
    assert "metrics (4 samples): bleu-4" in result.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4
    for row in rows:
        assert {"input", "reference", "prediction", "bleu-4", "rouge-1", "rouge-2", "rouge-l"} <= row.keys()
        assert row["reference"]
    assert json.loads(out.with_name(out.stem + ".metrics.json").read_text())["metrics"] == summary["metrics"]
    # same samples, settings and weights as the run's own final evaluation: same scores
    after = json.loads((run_dir / "result.json").read_text())["metrics_after"]
    for name, value in summary["metrics"].items():
        assert value == pytest.approx(after[name], abs=1e-6), name
    return summary


@pytest.mark.slow
def test_predict_by_run_dir(lora_run, tmp_path):
    run_dir, _, _ = lora_run
    out = tmp_path / "preds.jsonl"
    result = predict_cli(["--run", str(run_dir), "--input", DEV, "--output", str(out), "--max-samples", "4",
                          "--max-new-tokens", "8", "--batch-size", "3", "--no-progress"], tmp_path)
    check_predictions(result, run_dir, out)


@pytest.mark.slow
def test_predict_by_mlflow_run_id(lora_run, tmp_path):
    run_dir, run_id, uri = lora_run
    out = tmp_path / "preds.jsonl"
    result = predict_cli(["--run", run_id, "--tracking-uri", uri, "--input", DEV, "--output", str(out),
                          "--max-samples", "4", "--max-new-tokens", "8"], tmp_path)
    summary = check_predictions(result, run_dir, out)
    assert Path(summary["run_dir"]) == run_dir.resolve()


@pytest.mark.slow
def test_run_id_falls_back_to_artifacts_when_the_dir_is_gone(lora_run, tmp_path, monkeypatch):
    from glm_experiments.inference.run_loading import find_run_dir, load_run_config

    run_dir, run_id, uri = lora_run
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    moved = run_dir.with_name("run_moved")
    run_dir.rename(moved)
    try:
        found = find_run_dir(run_id, uri)
    finally:
        moved.rename(run_dir)
    assert found.is_relative_to(tmp_path)
    assert (found / "adapter" / "adapter_model.safetensors").is_file()
    assert load_run_config(found).method.name == "lora"


def test_predict_errors_are_one_line(tmp_path):
    for args, expected in [
        (["--run", str(tmp_path / "nowhere"), "--input", DEV], "run not found"),
        (["--run", "0" * 32, "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}", "--input", DEV], "no MLflow store"),
    ]:
        assert expected in one_line_error(predict_cli(args, tmp_path))
    assert not (tmp_path / "none.db").exists()


@pytest.mark.slow
def test_predict_errors_adapter_and_input_missing(lora_run, tmp_path):
    run_dir, _, _ = lora_run
    bare = tmp_path / "bare"
    shutil.copytree(run_dir / ".hydra", bare / ".hydra")
    assert "adapter missing" in one_line_error(predict_cli(["--run", str(bare), "--input", DEV], tmp_path))
    missing = one_line_error(predict_cli(["--run", str(run_dir), "--input", str(tmp_path / "nope.json")], tmp_path))
    assert "data file not found" in missing and "nope.json" in missing


# ------------------------------------------------------------------------------------------ merge
def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["类型#裙*颜色#黑色", "类型#裤子*风格#街头*材质#真丝"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def assert_same_logits(run_dir: Path, merged: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glm_experiments.inference.run_loading import load_run

    loaded = load_run(run_dir, device="cpu")
    standalone = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    expected, got = logits(loaded.model, loaded.tokenizer), logits(standalone, tokenizer)
    assert expected.shape == got.shape
    assert (expected - got).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_merge_lora_gives_a_standalone_checkpoint(lora_run, tmp_path):
    run_dir, _, _ = lora_run
    out = tmp_path / "merged"
    result = run_cli(["--run", str(run_dir), "--out", str(out)], tmp_path, module="glm_experiments.merge")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "merged the lora adapter into the un-quantised base weights" in result.stdout
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(out.glob("adapter_*")), "a merged checkpoint holds no adapter files"
    assert_same_logits(run_dir, out)
    # the adapter did change the model (otherwise the comparison above proves nothing)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glm_experiments.inference.run_loading import load_base, load_run_config

    base, tokenizer, _ = load_base(load_run_config(run_dir))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (logits(base.eval(), tokenizer) - logits(merged, AutoTokenizer.from_pretrained(out))).abs().max() > 1e-4
    # a second merge into the same directory is refused unless asked
    again = run_cli(["--run", str(run_dir), "--out", str(out)], tmp_path, module="glm_experiments.merge")
    assert "holds an earlier merge output (pass --overwrite to replace it)" in one_line_error(again)


def fake_run(lora_run, tmp_path: Path, method: str, **settings) -> Path:
    """A run dir of ``method`` written by the method's own save(), with perturbed trained weights."""
    from omegaconf import OmegaConf

    from glm_experiments.inference.run_loading import load_base, load_run_config
    from glm_experiments.methods import get_method

    run_dir, _, _ = lora_run
    fake = tmp_path / f"run_{method}"
    cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    cfg["method"] = {"name": method, **settings}
    (fake / ".hydra").mkdir(parents=True)
    (fake / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    typed = load_run_config(fake)
    model, tokenizer, _ = load_base(typed)
    module = get_method(method)
    model = module.apply(model, typed.method)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    module.save(model, fake / "adapter", OmegaConf.create(OmegaConf.to_container(typed.method)))
    tokenizer.save_pretrained(fake / "adapter")
    return fake


@pytest.mark.slow
@pytest.mark.parametrize("method,settings", [("freeze", {"num_last_layers": 1, "trainable_patterns": []}), ("full", {})])
def test_merge_freeze_and_full(lora_run, tmp_path, method, settings):
    from glm_experiments.inference.merging import merge_run

    fake = fake_run(lora_run, tmp_path, method, **settings)
    info = merge_run(str(fake), tmp_path / "merged")
    assert info["method"] == method
    assert_same_logits(fake, tmp_path / "merged")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ptuning", "prompt_tuning"])
def test_merge_refuses_prefix_methods_with_a_reason(lora_run, tmp_path, method):
    run_dir, _, _ = lora_run
    fake = tmp_path / "run"
    shutil.copytree(run_dir / ".hydra", fake / ".hydra")
    (fake / "adapter").mkdir()
    (fake / "adapter" / "method.json").write_text(json.dumps({"method": method, "settings": {}}))
    result = run_cli(["--run", str(fake), "--out", str(tmp_path / "merged")], tmp_path, module="glm_experiments.merge")
    message = one_line_error(result)
    assert "cannot be merged into plain weights" in message and "not a change to any weight" in message
    assert not (tmp_path / "merged").exists()


# ------------------------------------------------------------------------------------------- chat
@pytest.mark.slow
def test_chat_over_stdin_keeps_history_and_resets(lora_run, tmp_path):
    run_dir, _, _ = lora_run
    env = checkout_env({**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"})
    result = subprocess.run(
        [sys.executable, "-m", "glm_experiments.chat", "--run", str(run_dir), "--max-new-tokens", "8"],
        input="类型#裙*颜色#黑色\n再写一句\n/reset\n类型#裙*颜色#黑色\n/exit\n", cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    replies = [line.split("assistant>", 1)[1].strip() for line in out.splitlines() if "assistant>" in line]
    assert len(replies) == 3 and all(replies), out
    assert replies[0] == replies[2], "after /reset the same question gets the same (greedy) reply"
    counts = [int(line.split("(")[1].split()[0]) for line in out.splitlines() if "prompt tokens" in line]
    assert len(counts) == 3
    assert counts[1] > counts[0] + 8, "turn 2's prompt holds turn 1"
    assert counts[2] == counts[0], "/reset empties the history"
    assert "(history cleared)" in out and out.rstrip().endswith("bye")
