"""resume=auto continues an interrupted run exactly: same optimizer, scheduler, RNG and data order.

Run A trains 12 steps uninterrupted; run B, same config, is SIGKILLed once checkpoint-4 is complete
(mid-epoch: 3 steps per epoch; 8 steps still to go, so B cannot finish before the kill lands), then
restarted with ``resume=auto`` into the same directory. Both must log the same per-step losses and end
with the same trained tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers.common import run_cli, signal_after_checkpoint

MAX_STEPS, SAVE_STEPS, KILL_AFTER = 12, 4, 4


def common(method: str) -> list[str]:
    return [
        f"method={method}",
        f"train.max_steps={MAX_STEPS}",
        f"train.save_steps={SAVE_STEPS}",
        "train.save_total_limit=3",
        "train.logging_steps=1",
        "train.per_device_train_batch_size=8",
        "data.max_train_samples=24",  # 3 steps per epoch: checkpoint-4 is in the middle of epoch 2
        "tracking=none",
        "eval.before_training=false",
        "eval.max_samples=2",
        "eval.max_new_tokens=4",
    ]


def losses(run_dir: Path) -> dict[int, float]:
    last = max((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_resume_auto_matches_uninterrupted_run(method, tmp_path):
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    result = run_cli([*common(method), f"hydra.run.dir={dir_a}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    signal_after_checkpoint([*common(method), f"hydra.run.dir={dir_b}"], dir_b, tmp_path, KILL_AFTER)
    assert not (dir_b / "result.json").exists(), "run B was not interrupted"
    steps_b = sorted(int(p.name.split("-")[1]) for p in (dir_b / "checkpoints").glob("checkpoint-*"))
    assert max(steps_b) < MAX_STEPS, steps_b

    result = run_cli([*common(method), f"hydra.run.dir={dir_b}", "resume=auto"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    loss_a, loss_b = losses(dir_a), losses(dir_b)
    assert sorted(loss_a) == list(range(1, MAX_STEPS + 1)) == sorted(loss_b)
    for step in loss_a:
        assert loss_b[step] == pytest.approx(loss_a[step], abs=1e-5), (step, loss_a, loss_b)

    final_a = json.loads((dir_a / "result.json").read_text())["train"]["loss"]
    final_b = json.loads((dir_b / "result.json").read_text())["train"]["loss"]
    assert final_b == pytest.approx(final_a, abs=1e-5)

    tensors_a = load_file(str(dir_a / "checkpoints" / f"checkpoint-{MAX_STEPS}" / "trainable.safetensors"))
    tensors_b = load_file(str(dir_b / "checkpoints" / f"checkpoint-{MAX_STEPS}" / "trainable.safetensors"))
    assert tensors_a.keys() == tensors_b.keys()
    for name in tensors_a:
        assert (tensors_a[name] - tensors_b[name]).abs().max() <= 1e-5, name


def test_resume_auto_skips_an_incomplete_checkpoint(tmp_path):
    """A run killed while writing checkpoint-N leaves the directory without trainer_state.json."""
    from glm_experiments.recipe.train import resolve_resume

    import torch
    from safetensors.torch import save_file

    ckpts = tmp_path / "checkpoints"
    (ckpts / "checkpoint-4").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(ckpts / "checkpoint-4" / "trainable.safetensors"))
    (ckpts / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    (ckpts / "checkpoint-8").mkdir()
    (ckpts / "checkpoint-8" / "trainable.safetensors").write_bytes(b"")
    assert resolve_resume("auto", ckpts) == str(ckpts / "checkpoint-4")
    assert resolve_resume("4", ckpts) == str(ckpts / "checkpoint-4")
    assert resolve_resume(None, ckpts) is None
    assert resolve_resume("auto", tmp_path / "nothing") is None


def test_building_a_cache_leaves_the_random_state_alone(tmp_path):
    """A run that pre-trains the tiny model (cold cache) and one that finds it built must draw the same adapter
    initialisation afterwards: build_once restores Python's, NumPy's and torch's random state."""
    import random

    import numpy as np
    import torch
    from transformers import set_seed

    from glm_experiments.constants import build_once

    def build(tmp):  # draws and reseeds, as pre-training does
        set_seed(7)
        torch.randn(100), np.random.rand(5), random.random()
        (tmp / "done").write_text("x")

    def draws():
        return torch.randn(3).tolist(), float(np.random.rand()), random.random()

    set_seed(42)
    build_once(tmp_path / "cache", "done", build)  # cold: builds
    cold = draws()
    set_seed(42)
    build_once(tmp_path / "cache", "done", build)  # warm: finds it
    assert draws() == cold
