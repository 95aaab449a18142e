import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(ROOT / "conf")

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny model's tokenizer, trained offline on the demo corpus (< 1 s)."""
    from glm_experiments.config import TinyModelConfig
    from glm_experiments.models.tiny import tokenizer_corpus, train_tokenizer

    return train_tokenizer(tokenizer_corpus(), TinyModelConfig().vocab_size)


def compose(overrides: list[str] | None = None):
    """The real config, composed by Hydra as the CLI does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import glm_experiments.config  # noqa: F401

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("train", overrides=overrides or [])


def checkout_env(env: dict) -> dict:
    """``env`` for a subprocess that must run this checkout's code, not whichever one an editable install
    points at (subprocesses start in a temp dir)."""
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}


def run_cli(args: list[str], tmp_path: Path, module: str = "glm_experiments", timeout: int = 600) -> subprocess.CompletedProcess:
    env = checkout_env({**os.environ, "PYTHONUNBUFFERED": "1"})
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)
