"""One job vs a 3-job ``--multirun`` one after another (Hydra's basic launcher) vs the same 3 jobs with
``hydra/launcher=parallel``: wall time of the whole command, from a fresh directory and a fresh ./mlflow.db.

``python bench/sweep_scaling.py [--rounds 3] [--max-parallel 3] [--name smoke] [-- job overrides ...]``
(``--name default -- seed=42``: the default run's jobs, 300 steps each)

Each round runs the variants (also one job at 1 thread) in an order that rotates from round to round, so a neighbour's load falls
on all of them alike; the ratios are medians of per-round ratios. Every sweep's MLflow tree is checked (one
parent FINISHED, every job a FINISHED child of it). Default jobs: ``debug=smoke`` (10 steps of batch 4, 8 eval
samples) with 3 learning rates. Also the CPU seconds of each command and all its processes (what the variants cost
on an idle machine). Writes ``bench/results/sweep_scaling_<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LRS = ["1e-3", "2e-3", "3e-3"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(
    args: list[str], cwd: Path, extra_env: dict | None = None
) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and every process under it)."""
    env = {
        **os.environ,
        **(extra_env or {}),
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
        ),
    }
    env.pop("GLM_EXPERIMENTS_PARENT_RUN_ID", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, "-m", "glm_experiments", *args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(
            f"failed: {' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    return seconds, cpu


def check_tree(cwd: Path, jobs: int) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("glm_experiments").experiment_id],
        max_results=100,
    )
    parents = [
        r for r in runs if r.data.tags.get("glm_experiments.role") == "sweep_parent"
    ]
    children = [r for r in runs if r not in parents]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [
        r.info.status for r in parents
    ]
    assert len(children) == jobs and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {
        parents[0].info.run_id
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-parallel", type=int, default=3)
    parser.add_argument(
        "--name",
        default="smoke",
        help="results file: bench/results/sweep_scaling_<name>.json",
    )
    parser.add_argument(
        "job",
        nargs="*",
        default=["debug=smoke"],
        help="overrides of every job (after --)",
    )
    args = parser.parse_args()
    variants = {
        "one_job": [*args.job, f"train.learning_rate={LRS[0]}"],
        # torch's default is every core; under a neighbour's load 2 threads spin-wait for each other
        "one_job_1_thread": [*args.job, f"train.learning_rate={LRS[0]}"],
        "basic_3_jobs": [
            "--multirun",
            *args.job,
            f"train.learning_rate={','.join(LRS)}",
        ],
        "parallel_3_jobs": [
            "--multirun",
            "hydra/launcher=parallel",
            f"hydra.launcher.max_parallel={args.max_parallel}",
            *args.job,
            f"train.learning_rate={','.join(LRS)}",
        ],
    }
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        run(
            [*args.job, "train.max_steps=1", "tracking=none"], Path(tmp)
        )  # warm caches (tiny model, tokenized data)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                cwd = Path(tmp) / f"r{r}_{name}"
                cwd.mkdir()
                wall, cpu_seconds = run(
                    variants[name],
                    cwd,
                    ONE_THREAD if name.endswith("1_thread") else None,
                )
                times[name].append(wall)
                cpu[name].append(cpu_seconds)
                if name.startswith(("basic", "parallel")):
                    check_tree(cwd, len(LRS))
                loads.append(os.getloadavg()[0])
                print(
                    f"round {r} {name}: {wall:.1f} s, CPU {cpu_seconds:.1f} s (load {loads[-1]:.1f})",
                    flush=True,
                )

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu": platform.processor(),
            "loadavg_1min": loads,
        },
        "job_overrides": args.job,
        "max_parallel": args.max_parallel,
        "seconds": times,
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "cpu_seconds": cpu,
        "median_cpu_seconds": {k: statistics.median(v) for k, v in cpu.items()},
        "ratio_parallel_to_one_job": ratio("parallel_3_jobs", "one_job"),
        "ratio_parallel_to_one_job_1_thread": ratio(
            "parallel_3_jobs", "one_job_1_thread"
        ),
        "ratio_basic_to_one_job": ratio("basic_3_jobs", "one_job"),
        "ratio_parallel_to_basic": ratio("parallel_3_jobs", "basic_3_jobs"),
    }
    out = ROOT / "bench" / "results" / f"sweep_scaling_{args.name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(
        json.dumps(
            {k: v for k, v in result.items() if k.startswith(("ratio", "median"))},
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
