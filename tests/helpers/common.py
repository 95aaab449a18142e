"""Helpers the tests share: the repository root, composing the real config, running a command as a user would."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = str(ROOT / "conf")

torch.set_num_threads(2)


def compose(overrides: list[str] | None = None):
    """The real config, composed by Hydra as the CLI does (glm_experiments.compose: bench/ composes with it too)."""
    from glm_experiments.compose import compose as compose_config

    return compose_config(overrides)


def checkout_env(env: dict) -> dict:
    """``env`` for a subprocess that must run this checkout's code, not whichever one an editable install
    points at (subprocesses start in a temp dir)."""
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}


def run_cli(args: list[str], tmp_path: Path, module: str = "glm_experiments", timeout: int = 600,
            env_changes: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m module *args`` in ``tmp_path`` on this checkout; ``env_changes``: variables to set (None: unset)."""
    env = checkout_env({**os.environ, "PYTHONUNBUFFERED": "1"})
    for name, value in {"HYDRA_FULL_ERROR": None, **(env_changes or {})}.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


# the settings of a tiny sweep job (add train.max_steps): a few seconds of training and evaluation
TINY_SWEEP_JOB = ["train.logging_steps=1", "train.save_steps=0", "train.warmup_ratio=0",
                  "train.per_device_train_batch_size=8", "eval.max_samples=2", "eval.max_new_tokens=4",
                  "eval.batch_size=2", "data.max_train_samples=16"]


def demo_data_slice(tmp_path: Path, train_lines: int = 16, dev_lines: int = 4) -> tuple[Path, Path]:
    """The first lines of the adgen demo's train and dev files, written into ``tmp_path``."""
    paths = []
    for name, lines in (("train", train_lines), ("dev", dev_lines)):
        source = ROOT / "data" / "adgen_demo" / f"{name}.json"
        path = tmp_path / f"{name}.json"
        path.write_text("".join(source.read_text(encoding="utf-8").splitlines(True)[:lines]), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def assert_close(actual, expected, rel: float = 1e-5, what: str = "") -> None:
    """``actual`` equals ``expected`` up to rounding on any CPU and BLAS.

    Measured as the norm of the difference relative to the norm of ``expected``, in float64: float32 kernels
    differ between CPUs by rounding of the tensor's magnitude, not of each element, so element-wise atol/rtol
    on float32 values fails on some machines (AMD EPYC) and passes on others.
    """
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err, scale = (actual - expected).norm().item(), expected.norm().item()
    assert err <= rel * max(scale, 1e-30), f"{what}: |actual - expected| = {err:.3g} > {rel:g} x |expected| = {scale:.3g}"


def _complete_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def signal_after_checkpoint(args: list[str], run_dir: Path, cwd: Path, step: int, sig: int = signal.SIGKILL,
                            timeout: float = 600) -> tuple[int, str]:
    """Start a training run, send it ``sig`` once ``checkpoint-<step>`` is completely written, wait for it to
    end; its (return code, stderr)."""
    done = run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json"  # written last
    err = cwd / f"stderr-{time.monotonic_ns()}.txt"  # a file, not a pipe: a full pipe would stall the run
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "glm_experiments", *args], cwd=cwd, env=checkout_env(dict(os.environ)),
                                stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not _complete_json(done):
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (rc {proc.returncode}) before checkpoint-{step}:\n"
                                     f"{err.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the run wrote no checkpoint-{step} in {timeout} s")
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, sig)
        proc.wait(timeout=120)
    return proc.returncode, err.read_text()


def sweep_store(tmp: Path, parent_name: str, **parent_tags: str):
    """A fresh SQLite MLflow store in ``tmp`` with a ``source_length_ablation`` experiment and an open sweep parent
    run: (uri, client, experiment id, parent run id), for tests that log the children by hand."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("source_length_ablation", artifact_location=(tmp / "art").as_uri())
    tags = {"glm_experiments.role": "sweep_parent", **parent_tags}
    return uri, client, exp, client.create_run(exp, run_name=parent_name, tags=tags).info.run_id
