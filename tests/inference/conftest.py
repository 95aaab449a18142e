"""A finished run the inference tests share."""

import pytest

from tests.helpers.common import run_cli


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A finished 2-step LoRA run (checkpoints at 1 and 2) on the tiny model, untracked, inside a parent dir
    (tests copy it before damaging anything)."""
    tmp = tmp_path_factory.mktemp("small_run")
    run_dir = tmp / "parent" / "run"
    result = run_cli(["method=lora", "train.max_steps=2", "train.save_steps=1", "train.logging_steps=1",
                      "train.per_device_train_batch_size=2", "data.max_train_samples=4", "data.dev_file=null",
                      "eval.before_training=false", "tracking=none", f"hydra.run.dir={run_dir}"], tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir
