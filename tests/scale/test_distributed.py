"""Multi-process training on CPU: 2 torchrun workers over gloo, composed once by Hydra.

The same global batch (1 process x 8 vs 2 processes x 4) in the same order must give the same loss
curve with DDP, DeepSpeed ZeRO-2 and ZeRO-3; a ZeRO-3 run must save real (gathered) tensors that
reload, for LoRA and for full fine-tuning. Runs are tiny (6 steps) but each worker start costs ~20 s on
a 2-core machine; DeepSpeed's CPU comm op is JIT-compiled on first use (cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.common import ROOT, checkout_env, compose

pytestmark = pytest.mark.slow

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs the deepspeed extra (pip install -e '.[deepspeed]')")
STEPS = 6


def common(tmp: Path) -> list[str]:
    return [
        f"train.max_steps={STEPS}", "train.logging_steps=1", f"train.save_steps={STEPS}", "train.learning_rate=2e-3",
        "train.warmup_ratio=0", "train.group_by_length=false",  # the same sample order whatever the batch split
        "eval.before_training=false", "eval.max_samples=2", "eval.max_new_tokens=8",
        "data.max_train_samples=64", f"data.dev_file={tmp / 'dev.json'}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
    ]


def cli(args: list[str], tmp: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    # one thread per process: 2 workers on 2 cores (torchrun does the same for its workers)
    env = checkout_env({**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.pop("HYDRA_FULL_ERROR", None)
    out = subprocess.run([sys.executable, "-m", "glm_experiments", *args], cwd=tmp, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def loss_curves(tmp: Path, experiment: str) -> dict[str, list[float]]:
    """run name -> train/loss by step, from the MLflow store (also: one run per job, i.e. rank 0 only)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    curves = {}
    for run in client.search_runs([exp.experiment_id]):
        name = run.info.run_name
        assert name not in curves, f"two MLflow runs named {name}: only rank 0 may create one"
        history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
        curves[name] = [m.value for m in history]
        assert run.info.status == "FINISHED"
    return curves


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("distributed")
    dev = (ROOT / "data" / "adgen_demo" / "dev.json").read_text(encoding="utf-8").splitlines()[:8]
    (tmp / "dev.json").write_text("\n".join(dev) + "\n", encoding="utf-8")
    return tmp


@pytest.fixture(scope="module")
def sweep(tmp) -> dict:
    """1 process x bs 8 in-process, then one --multirun: 2 processes x bs 4 with DDP, ZeRO-2, ZeRO-3."""
    backends = ["none", "zero2", "zero3"] if HAS_DEEPSPEED else ["none"]
    cli([*common(tmp), "method.dropout=0", "train.per_device_train_batch_size=8", "tracking.run_name=single",
         "tracking.experiment_name=dist", f"hydra.run.dir={tmp / 'single'}"], tmp)
    cli(["--multirun", *common(tmp), "method.dropout=0", "train.per_device_train_batch_size=4", "launcher.nproc_per_node=2",
         f"deepspeed={','.join(backends)}", "tracking.run_name=2x-${deepspeed.name}", "tracking.experiment_name=dist",
         f"hydra.sweep.dir={tmp / 'multirun'}", "hydra.sweep.subdir=${deepspeed.name}"], tmp)
    return {"curves": loss_curves(tmp, "dist"), "backends": backends}


@pytest.mark.parametrize("backend", ["none", "zero2", "zero3"])
def test_two_processes_match_one_with_the_same_global_batch(sweep, tmp, backend):
    if backend not in sweep["backends"]:
        pytest.skip("needs deepspeed")
    single, multi = sweep["curves"]["single"], sweep["curves"][f"2x-{backend}"]
    assert len(single) == len(multi) == STEPS
    # same data, same order, same optimizer and schedule: only the reduction order differs
    assert multi == pytest.approx(single, rel=2e-3, abs=2e-3), (backend, single, multi)
    assert single[-1] < single[0]  # it trains
    run_dir = tmp / "multirun" / backend
    assert (run_dir / "resolved_config.yaml").is_file() and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["metrics_after"]["loss"] > 0


@needs_deepspeed
def test_zero3_lora_adapter_is_gathered_and_reloads(sweep, tmp):
    from safetensors.torch import load_file

    from glm_experiments.methods import get_method
    from glm_experiments.models.loading import load_model_and_tokenizer

    run_dir = tmp / "multirun" / "zero3"
    # written through the Trainer's ZeRO-3 consolidation at the last step, independently of method.save
    checkpoint = load_file(str(run_dir / "checkpoints" / f"checkpoint-{STEPS}" / "trainable.safetensors"))
    cfg = compose(["method=lora"])
    model, _ = load_model_and_tokenizer(cfg.model)
    model = get_method("lora").load(model, run_dir / "adapter")
    params = dict(model.named_parameters())
    lora = {n: p for n, p in params.items() if "lora_" in n}
    assert len(lora) == len(checkpoint) > 0
    for name, saved in checkpoint.items():
        assert saved.numel() > 0 and torch.equal(params[name].detach(), saved), name
    assert any(float(t.abs().sum()) > 0 for n, t in checkpoint.items() if "lora_B" in n)  # trained (B starts at 0)


@needs_deepspeed
def test_zero3_full_fine_tuning_saves_loadable_weights(tmp):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from glm_experiments.models.loading import load_model_and_tokenizer

    run_dir = tmp / "full_zero3"
    cli([*common(tmp), "method=full", "train.per_device_train_batch_size=4", "train.learning_rate=1e-4",
         "launcher.nproc_per_node=2", "deepspeed=zero3", "tracking.experiment_name=full", f"hydra.run.dir={run_dir}"], tmp)
    saved = AutoModelForCausalLM.from_pretrained(run_dir / "adapter")
    base, _ = load_model_and_tokenizer(compose([]).model)
    checkpoint = load_file(str(run_dir / "checkpoints" / f"checkpoint-{STEPS}" / "trainable.safetensors"))
    saved_params, base_params = dict(saved.named_parameters()), dict(base.named_parameters())
    assert set(saved_params) == set(base_params)
    changed = 0
    for name, p in saved_params.items():
        assert p.shape == base_params[name].shape, name
        assert torch.equal(p.detach(), checkpoint[name]), name
        changed += not torch.equal(p.detach(), base_params[name].detach())
    assert changed > len(saved_params) // 2  # trained weights, not the base's and not empty partitions
    assert json.loads((run_dir / "adapter" / "method.json").read_text())["method"] == "full"


def test_bad_requests_fail_with_one_line(tmp):
    from glm_experiments.errors import UserError
    from glm_experiments.scale.launcher import check_deepspeed, check_launcher

    cfg = compose(["launcher.nproc_per_node=512"])
    with pytest.raises(UserError, match="launcher.nproc_per_node=512 but"):
        check_launcher(cfg.launcher)
    with pytest.raises(UserError, match="master_addr"):
        check_launcher(compose(["launcher.nnodes=2"]).launcher)
    zero3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}
    check_deepspeed(zero3)
    for bad, message in [
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "auto"},
                                "stage3_gather_16bit_weights_on_model_save": True}}, "offload_param.device='auto'"),
        ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "needs ZeRO stage >= 3"),
        ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, "needs ZeRO stage >= 1"),
        ({"zero_optimization": {"stage": 3}}, "stage3_gather_16bit_weights_on_model_save must be true"),
        ({"zero_optimization": {"stage": "auto"}}, "stage='auto'"),
    ]:
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            check_deepspeed(bad)

    # end to end: the Hydra process refuses before starting any worker, in one line, no traceback
    env = checkout_env({**os.environ, "OMP_NUM_THREADS": "1"})
    out = subprocess.run([sys.executable, "-m", "glm_experiments", "launcher.nproc_per_node=512", "tracking=none",
                          f"hydra.run.dir={tmp / 'bad'}"], cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "error: launcher.nproc_per_node=512 but" in out.stderr.strip().splitlines()[-1]
