"""startup: time from ``python -m glm_experiments`` to the first training step, and what it is spent on.

``python -m glm_experiments train.max_steps=1 eval.before_training=false tracking=none`` in a subprocess through a
probe that records the first ``Trainer.training_step`` call: wall and CPU time to the first step, of the whole
subprocess, of ``python -c "import glm_experiments.recipe.train"``, and ``train.startup_seconds`` from ``result.json``;
then a 2-job ``--multirun`` (no dev set): time from job 1's first step to job 2's.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

from harness import children_cpu_seconds, cpu_cmd, subprocess_env, timed_cmd

PROBE = """
import os, sys, time, runpy, json
import transformers
_orig = transformers.Trainer.training_step
def _probe(self, *a, **k):
    if not getattr(self, "_bench_seen", False):  # one line per Trainer: per job of a sweep
        import resource
        self._bench_seen = True
        ru = resource.getrusage(resource.RUSAGE_SELF)
        with open(os.environ["BENCH_FIRST_STEP_FILE"], "a") as f:
            f.write(json.dumps({"first_step_at": time.time(), "cpu_seconds": ru.ru_utime + ru.ru_stime}) + "\\n")
    return _orig(self, *a, **k)
transformers.Trainer.training_step = _probe
sys.argv = ["glm_experiments", *sys.argv[1:]]
runpy.run_module("glm_experiments", run_name="__main__", alter_sys=True)
"""
OVERRIDES = ["train.max_steps=1", "eval.before_training=false", "tracking=none"]


def probed_runs(reps: int, tmp: str) -> list[dict]:
    """``reps`` one-step default runs through the probe."""
    runs = []
    for r in range(reps):
        out_dir = Path(tmp) / f"run{r}"
        first = Path(tmp) / f"first{r}.json"
        env = {**subprocess_env(), "BENCH_FIRST_STEP_FILE": str(first)}
        t0 = time.time()
        cpu0 = children_cpu_seconds()
        wall, proc = timed_cmd(
            [sys.executable, "-c", PROBE, *OVERRIDES, f"hydra.run.dir={out_dir}"],
            env=env,
        )
        cpu = children_cpu_seconds() - cpu0
        if proc.returncode != 0:
            raise RuntimeError(
                f"default run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        result_json = json.loads((out_dir / "result.json").read_text())
        probe = json.loads(first.read_text().splitlines()[0])
        runs.append(
            {
                "wall_seconds": wall,
                "cpu_seconds": cpu,
                "cpu_seconds_to_first_step": probe["cpu_seconds"],
                "command_to_first_step_seconds": probe["first_step_at"] - t0,
                "startup_seconds_logged": result_json["train"]["startup_seconds"],
                "train_seconds_logged": result_json["train"]["train_seconds"],
            }
        )
    return runs


def probed_sweep(tmp: str) -> dict:
    """A 2-job sweep: Hydra's basic launcher runs the jobs in one process, so only the first pays the imports."""
    first = Path(tmp) / "sweep_first_steps.jsonl"
    t0 = time.time()
    cmd = [
        sys.executable,
        "-c",
        PROBE,
        "--multirun",
        "seed=1,2",
        "train.max_steps=1",
        "train.save_steps=0",
        "eval.before_training=false",
        "data.dev_file=null",
        "tracking=none",
        f"hydra.sweep.dir={tmp}/sweep",
    ]
    _, proc = timed_cmd(
        cmd, env={**subprocess_env(), "BENCH_FIRST_STEP_FILE": str(first)}
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"2-job sweep failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    steps = [json.loads(line) for line in first.read_text().splitlines()]
    return {
        "command": "python -m glm_experiments --multirun seed=1,2 train.max_steps=1 data.dev_file=null ...",
        "job1_first_step_seconds": steps[0]["first_step_at"] - t0,
        "job2_first_step_after_job1_seconds": steps[1]["first_step_at"]
        - steps[0]["first_step_at"],
        "note": "job 2's figure includes job 1's single step and its save",
    }


def top_level_imports() -> list[tuple[str, float]]:
    """The 8 slowest top-level imports of ``import glm_experiments.recipe.train`` (``python -X importtime``)."""
    _, proc = timed_cmd(
        [sys.executable, "-X", "importtime", "-c", "import glm_experiments.recipe.train"]
    )
    cum = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(2)) <= 1:  # top-level imports only
            cum[m.group(3)] = cum.get(m.group(3), 0) + int(m.group(1)) / 1e6
    return sorted(cum.items(), key=lambda kv: -kv[1])[:8]


def run(args) -> dict:
    reps = 1 if args.quick else 2
    py = sys.executable
    import_t = [
        cpu_cmd([py, "-c", "import glm_experiments.recipe.train"]) for _ in range(reps + 1)
    ]
    torch_t = [cpu_cmd([py, "-c", "import torch"]) for _ in range(reps)]
    bare_t = [cpu_cmd([py, "-c", "pass"]) for _ in range(reps)]
    with tempfile.TemporaryDirectory() as tmp:
        runs = probed_runs(reps, tmp)
        sweep = probed_sweep(tmp)
    top = [] if args.quick else top_level_imports()
    best = min(runs, key=lambda r: r["wall_seconds"])
    imp_wall = min(w for w, _ in import_t[1:])
    imp = min(
        c for _, c in import_t[1:]
    )  # CPU seconds (the first run warms the page cache)
    result = {
        "command": "python -m glm_experiments "
        + " ".join(OVERRIDES)
        + (
            " hydra.run.dir=<tmp> (through a probe that "
            "records the first Trainer.training_step call, then runs the module as __main__)"
        ),
        "runs": runs,
        "import_glm_experiments_train_seconds": import_t,
        "import_torch_seconds": torch_t,
        "python_bare_seconds": bare_t,
        "top_level_import_seconds": top,
        "note": "warm caches: tiny checkpoint and tokenized data already built (first ever run pre-trains the tiny model)",
        "sweep": sweep,
        "import_share_of_first_step_cpu": imp / best["cpu_seconds_to_first_step"],
    }
    torch_cpu = min(c for _, c in torch_t)
    jobs = f"{sweep['job1_first_step_seconds']:.1f} s / {sweep['job2_first_step_after_job1_seconds']:.1f} s after job 1's"
    result["rows"] = [
        (
            "command -> first training step",
            f"{best['command_to_first_step_seconds']:.1f} s wall",
            f"{best['cpu_seconds_to_first_step']:.1f} s CPU",
            "",
        ),
        (
            "  import glm_experiments.recipe.train",
            f"{imp_wall:.1f} s wall, {imp:.1f} s CPU",
            f"{result['import_share_of_first_step_cpu']:.0%} of first-step CPU (torch alone {torch_cpu:.1f} s CPU)",
            "",
        ),
        (
            "perf/startup_seconds (model+method+data)",
            f"{best['startup_seconds_logged']:.2f} s",
            "",
            "",
        ),
        (
            "whole subprocess (1 step + final eval)",
            f"{best['wall_seconds']:.1f} s wall",
            f"{best['cpu_seconds']:.1f} s CPU",
            "",
        ),
        (
            "2-job sweep: job 1 / job 2 to first step",
            jobs,
            "imports paid once per sweep",
            "",
        ),
    ]
    return result
