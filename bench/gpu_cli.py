"""The GPU check's two cases that are not a train case: the project's CLI end to end, and ``pytest -m gpu``.

The CLI case runs ``python -m glm_experiments`` (a GPU-sized tiny GLM, a few hundred steps, tracking=none) through
``gpu_check.py --cli-child``, which records every metric the run logs and the Trainer's precision in a file:
bf16, ``perf/cuda_max_allocated_mib``, batched generation before/after, checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import BENCH, ROOT

# the CLI case's model on a GPU: the tiny family (pre-trained briefly on the demo corpus on the CPU first)
CLI_GPU_MODEL = {
    "hidden_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 2048,
    "pretrain_steps": 20,
}
# what the CLI case reads from the metrics the run logged
LOGGED = (
    "perf/cuda_max_allocated_mib",
    "perf/cuda_max_reserved_mib",
    "perf/peak_rss_mib",
    "perf/tokens_per_s",
    "perf/train_seconds",
    "perf/startup_seconds",
    "model/total_params",
    "model/trainable_params",
    "eval/accuracy",
    "eval/loss",
    "train/loss",
)


def cli_overrides(args, run_dir: Path) -> list[str]:
    tiny = args.tiny or args.device != "cuda"
    model = {} if tiny else CLI_GPU_MODEL
    steps = args.cli_steps or (4 if tiny else 300)
    overrides = [
        "tracking=none",
        f"hydra.run.dir={run_dir}",
        f"train.max_steps={steps}",
        f"train.save_steps={max(1, steps // 2)}",
        "train.save_total_limit=1",
        f"train.logging_steps={max(1, steps // 10)}",
        "data.metrics=[accuracy]",  # jieba/nltk not carried
        f"eval.max_samples={4 if tiny else 64}",
        f"eval.batch_size={4 if tiny else 16}",
        f"eval.max_new_tokens={4 if tiny else 32}",
    ]
    if tiny:  # the default tiny model (cached by the test suite's runs too)
        overrides += [
            "train.per_device_train_batch_size=4",
            "data.max_train_samples=64",
        ]
    else:  # bf16 weights + bf16 autocast, as a 6B run on this GPU (the tiny preset keeps fp32 weights)
        overrides += ["model.dtype=auto"]
    overrides += [f"model.tiny.{k}={v}" for k, v in model.items()]
    return overrides


def cli_child(metrics_file: str, overrides: list[str]) -> None:
    """``python -m glm_experiments OVERRIDES`` in this process, every metric the run logs also appended to
    ``metrics_file`` (with tracking=none they go nowhere else) and the Trainer's precision recorded."""
    from glm_experiments.recipe import train
    from glm_experiments.tracking.mlflow_tracker import Tracker

    log_metrics, training_arguments = Tracker.log_metrics, train.training_arguments

    def record(self, metrics, step):
        with open(metrics_file, "a") as f:
            f.write(
                json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}})
                + "\n"
            )
        return log_metrics(self, metrics, step)

    def args_recorded(cfg, checkpoint_dir):
        targs = training_arguments(cfg, checkpoint_dir)
        precision = {"bf16": targs.bf16, "fp16": targs.fp16, "use_cpu": targs.use_cpu}
        with open(metrics_file, "a") as f:
            f.write(json.dumps({"training_arguments": precision}) + "\n")
        return targs

    Tracker.log_metrics, train.training_arguments = record, args_recorded
    from glm_experiments.__main__ import main

    sys.argv = ["glm_experiments", *overrides]
    main()


def cli_case(args, timeout: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="glm_gpu_check_cli_"))
    run_dir, metrics_file = work / "run", work / "metrics.jsonl"
    overrides = cli_overrides(args, run_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        str(BENCH / "gpu_check.py"),
        "--cli-child",
        str(metrics_file),
        "--",
        *overrides,
    ]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            check=False,
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-2000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {
            "status": "timeout",
            "reason": f"cap {timeout:.0f} s hit",
            "stderr_tail": tail,
        }
    out: dict = {
        "command": "python -m glm_experiments " + " ".join(overrides),
        "wall_seconds": time.perf_counter() - start,
        "returncode": proc.returncode,
    }
    if proc.returncode != 0:
        return {
            **out,
            "status": "error",
            "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:500],
            "stderr_tail": proc.stderr[-3000:],
        }
    rows = (
        [json.loads(line) for line in metrics_file.read_text().splitlines()]
        if metrics_file.exists()
        else []
    )
    metrics = {}
    for row in rows:
        if "training_arguments" in row:
            out["training_arguments"] = row["training_arguments"]
        else:
            metrics.update({k: v for k, v in row.items() if k != "step"})
    result = json.loads((run_dir / "result.json").read_text())
    out.update({key: metrics[key] for key in LOGGED if key in metrics})
    out["train"] = result.get("train", {})
    out["predictions_after"] = count_lines(run_dir / "predictions" / "after.jsonl")
    out["predictions_before"] = count_lines(run_dir / "predictions" / "before.jsonl")
    out["checkpoints"] = sorted(
        p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")
    )
    out["checkpoint_has_trainable"] = any(
        (run_dir / "checkpoints" / c / "trainable.safetensors").exists()
        for c in out["checkpoints"]
    )
    out["adapter_saved"] = (run_dir / "adapter" / "method.json").exists()
    checks = {
        "exit 0": True,
        "checkpoint saved": out["checkpoint_has_trainable"],
        "adapter saved": out["adapter_saved"],
        "batched generation (predictions written)": out["predictions_after"] > 0,
    }
    if args.device == "cuda":
        checks["bf16 (Trainer)"] = bool(out.get("training_arguments", {}).get("bf16"))
        checks["perf/cuda_max_allocated_mib logged"] = (
            "perf/cuda_max_allocated_mib" in out
        )
    out["checks"] = checks
    out["status"] = "measured" if all(checks.values()) else "error"
    if out["status"] == "error":
        out["error"] = "failed checks: " + ", ".join(
            k for k, v in checks.items() if not v
        )
    shutil.rmtree(work, ignore_errors=True)
    return out


def pytest_case(args, timeout: float) -> dict:
    if args.device != "cuda":
        return {
            "status": "skipped",
            "reason": "pytest -m gpu needs CUDA (on CPU its tests skip; the normal suite collects them)",
        }
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        str(ROOT / "tests" / "test_gpu.py"),
        "-q",
        "-rA",
        "-p",
        "no:cacheprovider",
    ]
    try:
        proc = subprocess.run(
            cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        out = (
            exc.stdout.decode(errors="replace")
            if isinstance(exc.stdout, bytes)
            else (exc.stdout or "")
        )
        return {
            "status": "timeout",
            "reason": f"cap {timeout:.0f} s hit",
            "stdout_tail": out[-3000:],
        }
    lines = proc.stdout.strip().splitlines()
    summary = next(
        (
            ln
            for ln in reversed(lines)
            if any(w in ln for w in (" passed", " failed", " error", " skipped"))
        ),
        "?",
    )
    result = {
        "command": " ".join(cmd[1:]),
        "returncode": proc.returncode,
        "summary": summary.strip("= "),
        "results": [
            ln
            for ln in lines
            if ln.startswith(("PASSED", "FAILED", "ERROR", "SKIPPED"))
        ],
        "stdout_tail": proc.stdout[-4000:],
    }
    if proc.returncode == 0 and " passed" in summary and "skipped" not in summary:
        return {**result, "status": "measured"}
    return {**result, "status": "error", "error": summary.strip("= ")}


def count_lines(path: Path) -> int:
    return (
        sum(1 for line in path.read_text().splitlines() if line.strip())
        if path.exists()
        else 0
    )
