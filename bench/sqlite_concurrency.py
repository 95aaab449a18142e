"""Several training-like MLflow runs started at once against one SQLite file: are they all recorded completely?

``python bench/sqlite_concurrency.py --processes 3,6,12 --steps 100``

What a parallel launcher does to ``./mlflow.db``: N processes, released together, each through this project's
own ``Tracker`` (store lock, experiment get-or-create, parent link) logging what a training job logs: ~150
params, tags, a metric history (3 keys per step, one call per step, like the training callback), a predictions
table and an artifact directory, then ending the run. Every process records each failed call (``database is
locked`` counted apart); afterwards every run is read back and checked for status, params, metric points and
artifacts. Rounds: a fresh store (tables created while the others wait on the lock) and the same store again.
Writes ``bench/results/sqlite_concurrency.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARAMS, METRIC_KEYS = 150, ("train/loss", "train/tokens_per_s", "train/learning_rate")


def worker(
    uri: str, index: int, steps: int, start_at: float, parent: str, out: str
) -> None:
    from omegaconf import OmegaConf

    from glm_experiments.tracking.mlflow_tracker import PARENT_RUN_ENV, Tracker

    os.environ[PARENT_RUN_ENV] = parent
    errors, locked = [], 0
    cfg = OmegaConf.create(
        {
            "enabled": True,
            "tracking_uri": uri,
            "experiment_name": "concurrency",
            "artifact_location": None,
            "description": None,
        }
    )
    tracker = Tracker(cfg)
    files = Path(out) / f"files{index}"
    files.mkdir(parents=True, exist_ok=True)
    (files / "result.json").write_text(json.dumps({"index": index}))

    def call(fn, *args, **kwargs):
        nonlocal locked
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - counted, that is the measurement
            text = f"{type(exc).__name__}: {exc}"
            locked += "database is locked" in text
            errors.append(text.splitlines()[0][:300])

    time.sleep(max(0.0, start_at - time.time()))  # released together
    began = time.time()
    call(tracker.start, f"job{index}", {"job": str(index)})
    if tracker.run_id:
        call(tracker.log_params, {f"group{p % 7}.param{p}": p for p in range(PARAMS)})
        call(
            tracker.set_tags,
            {"output_dir": str(files), "hydra.overrides": f"job={index}"},
        )
        for step in range(1, steps + 1):
            call(
                tracker.log_metrics,
                {k: step * 0.01 + index for k in METRIC_KEYS},
                step=step,
            )
        call(
            tracker.log_table,
            [{"input": "x", "prediction": "y", "score": 1.0}] * 8,
            "predictions/after.json",
        )
        call(tracker.log_artifacts, files, "files")
        call(tracker.end, "FINISHED")
    Path(out, f"worker{index}.json").write_text(
        json.dumps(
            {
                "run_id": tracker.run_id,
                "errors": errors,
                "locked": locked,
                "seconds": time.time() - began,
            }
        )
    )


def check(uri: str, results: list[dict], steps: int) -> list[str]:
    from mlflow import MlflowClient

    client, problems = MlflowClient(tracking_uri=uri), []
    for i, result in enumerate(results):
        if not result["run_id"]:
            problems.append(f"job{i}: no run")
            continue
        run = client.get_run(result["run_id"])
        if run.info.status != "FINISHED":
            problems.append(f"job{i}: status {run.info.status}")
        if len(run.data.params) != PARAMS:
            problems.append(f"job{i}: {len(run.data.params)}/{PARAMS} params")
        for key in METRIC_KEYS:
            points = len(client.get_metric_history(run.info.run_id, key))
            if points != steps:
                problems.append(f"job{i}: {key} {points}/{steps} points")
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "files")}
        if artifacts != {"files/result.json"}:
            problems.append(f"job{i}: artifacts {sorted(artifacts)}")
        if not client.list_artifacts(run.info.run_id, "predictions"):
            problems.append(f"job{i}: no predictions table")
    return problems


def one_round(uri: str, processes: int, steps: int, parent: str, work: Path) -> dict:
    ctx = mp.get_context("spawn")
    start_at = (
        time.time() + 6
    )  # every process imported mlflow and torch-free modules by then
    procs = [
        ctx.Process(target=worker, args=(uri, i, steps, start_at, parent, str(work)))
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    results = []
    for i in range(processes):
        path = work / f"worker{i}.json"
        results.append(
            json.loads(path.read_text())
            if path.exists()
            else {"run_id": None, "errors": ["crashed"], "locked": 0, "seconds": None}
        )
        path.unlink(missing_ok=True)
    problems = check(uri, results, steps)
    return {
        "processes": processes,
        "steps": steps,
        "failed_calls": sum(len(r["errors"]) for r in results),
        "database_is_locked": sum(r["locked"] for r in results),
        "incomplete": problems,
        "errors": sorted({e for r in results for e in r["errors"]})[:5],
        "max_seconds": max((r["seconds"] or 0) for r in results),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--processes", default="3,6,12", help="comma-separated process counts"
    )
    parser.add_argument(
        "--steps", type=int, default=100, help="metric steps per run (3 keys each)"
    )
    args = parser.parse_args()
    from mlflow import MlflowClient

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.processes.split(",")):
            work = Path(tmp) / f"n{n}"
            work.mkdir()
            uri = f"sqlite:///{work / 'mlflow.db'}"
            for store in ("fresh", "existing"):
                parent = ""
                if (
                    store == "existing"
                ):  # a sweep parent made first, as the sweep callback does
                    client = MlflowClient(tracking_uri=uri)
                    exp = client.get_experiment_by_name("concurrency")
                    parent = client.create_run(
                        exp.experiment_id, run_name="parent"
                    ).info.run_id
                try:
                    row = {
                        "store": store,
                        **one_round(uri, n, args.steps, parent, work),
                    }
                except Exception:  # noqa: BLE001
                    row = {
                        "store": store,
                        "processes": n,
                        "crash": traceback.format_exc()[-500:],
                    }
                rows.append(row)
                print(json.dumps(row), flush=True)
    load = os.getloadavg()
    out = ROOT / "bench" / "results" / "sqlite_concurrency.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": {
                    "cpu_count": os.cpu_count(),
                    "cpu": platform.processor(),
                    "loadavg_after": load,
                },
                "rounds": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return (
        0
        if all(
            not r.get("incomplete") and not r.get("crash") and not r.get("failed_calls")
            for r in rows
        )
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
