"""Performance harness: ``python bench/run.py [--quick] [--only NAME[,NAME...]]``.

Each benchmark measures a *ratio inside one run* (interleaved, paired rounds), so the figures survive a
loaded machine; absolute timings are recorded too but only for context. Results: a rich table on stdout and
``bench/results/<name>.json`` per benchmark (with machine info). See bench/README.md for what each one
measures and the figures recorded on the reference machine.

Benchmarks (one file each): padding (padding.py), overhead (trainer_overhead.py), generation
(batched_generation.py), startup (startup.py), memory (method_memory.py), memory_trace (traced_peaks.py),
knobs (knobs.py); what they share is in harness.py and synthetic.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import batched_generation
import harness
import knobs
import method_memory
import padding
import quantized_memory
import startup
import torch
import traced_peaks
import trainer_overhead

BENCHMARKS = {
    "padding": padding.run,
    "overhead": trainer_overhead.run,
    "generation": batched_generation.run,
    "startup": startup.run,
    "memory": method_memory.run,
    "memory_trace": traced_peaks.run,
    "knobs": knobs.run,
    "quantized_memory": quantized_memory.run,
}
# --worker KIND: one measurement in a fresh process (harness.run_worker starts it)
WORKERS = {
    "memory": method_memory.worker,
    "knobs-mem": knobs.memory_worker,
    "trace-check": traced_peaks.check_worker,
    "quantized-memory": quantized_memory.worker,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes (~9 min on an idle 2-core CPU, ~5.5 min without memory)",
    )
    p.add_argument(
        "--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", "1")),
        help="torch intra-op threads (default 1 / $OMP_NUM_THREADS: the machine is shared)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--padding-limits",
        type=int,
        nargs=2,
        default=[64, 128],
        metavar=("SRC", "TGT"),
        help="max_source_length max_target_length the seed-style pipeline pads to (THUDM ADGEN: 64 128; "
        "the seeds' length ablation: 512 128 / 1024 256)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.names = [n.strip() for n in args.only.split(",") if n.strip()] or list(
        BENCHMARKS
    )
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown and not args.worker:
        p.error(
            f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}"
        )
    return args


def run_benchmark(name: str, args, machine: dict) -> tuple[dict, float, Path]:
    """One benchmark, its result written: (result, wall seconds, results file). An exception is recorded as the
    result (``error``; no benchmark's own result has that key)."""
    start, cpu0 = time.perf_counter(), harness.cpu_seconds()
    try:
        result = BENCHMARKS[name](args)
    except Exception as exc:  # noqa: BLE001  (one broken benchmark should not hide the others)
        import traceback

        traceback.print_exc()
        result = {
            "error": f"{type(exc).__name__}: {exc}",
            "rows": [("error", f"{type(exc).__name__}: {exc}", "", "ERROR")],
        }
    seconds = time.perf_counter() - start
    result["cpu_seconds"] = (
        harness.cpu_seconds() - cpu0
    )  # ~ wall time on an idle machine at 1 thread
    suffix = (
        ""
        if name != "padding" or args.padding_limits == [64, 128]
        else "-{}+{}".format(*args.padding_limits)
    )
    return (
        result,
        seconds,
        harness.write_result(name + suffix, machine, args, result, seconds),
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        import logging

        logging.disable(logging.WARNING)
        print(json.dumps(WORKERS[args.worker](json.loads(args.spec)), default=str))
        return 0
    args.device = (
        ("cuda" if torch.cuda.is_available() else "cpu")
        if args.device == "auto"
        else args.device
    )

    import logging
    import warnings

    import transformers
    from rich.console import Console
    from rich.table import Table

    transformers.logging.set_verbosity_error()
    logging.getLogger("glm_experiments").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    console = Console()
    machine = harness.machine_info(args.device)
    console.print(
        f"[bold]bench[/bold] {'--quick ' if args.quick else ''}on {machine['cpu_count']} CPU(s) "
        f"({machine['cpu_model']}), torch {machine['torch']} ({args.threads} thread(s)), device {args.device}, "
        f"load {machine['load_average'][0]:.1f}"
    )
    table = Table(
        "benchmark",
        "measure",
        "value",
        "ratio / target",
        "status",
        title="glm_experiments performance",
    )
    failed = False
    for name in args.names:
        console.print(f"running {name} ...")
        result, seconds, path = run_benchmark(name, args, machine)
        failed = failed or "error" in result
        for i, row in enumerate(result["rows"]):
            table.add_row(name if i == 0 else "", *[str(c) for c in row])
        table.add_section()
        console.print(
            f"  {name}: {seconds:.0f} s wall, {result['cpu_seconds']:.0f} s CPU -> {path.relative_to(harness.ROOT)}"
        )
    console.print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
