"""GPU check (issue 19): one command that trains the 6B shapes for real on a CUDA GPU and writes what it measured.

    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT 2>&1 | tee $OUT/log     # on the GPU machine
    python bench/gpu_check.py --device cpu --layers 1 --tiny --out /tmp/gc            # CPU dry run (tests)

Writes ``gpu_check.json`` (rewritten after every case: nothing is lost if the command is killed) and
``gpu_check.md`` (a Markdown table, the traced figure beside each measured one) into ``--out`` (default $OUT).
Nothing else goes into the out dir (the device tool returns at most 8 files): the CLI run lives in a temp dir.

Start: modules the check needs and the GPU machine lacks (hydra-core, omegaconf, antlr4, datasets + pyarrow,
bitsandbytes) are installed from the carried wheels (scripts/fetch_gpu_wheels.sh -> gpu_wheels/) with
``pip install --no-index --find-links gpu_wheels --no-deps --target <tmp>/.../site-packages`` (a ``site-packages``
path: dill, under ``datasets``' fingerprinting, pickles modules from any other path by value and fails).

Cases, in this order (models: random weights built directly on the device in bf16, ``GlmForCausalLM`` with
ChatGLM3-6B's sizes; ChatGLM2-6B has the same shape; settings composed from the project's conf/experiment files):
  * LoRA r8 and P-Tuning v2 (pre_seq_len 128), 28 layers, the ChatGLM3 demo's bs 4 x 256+512, plain and with
    gradient checkpointing + ``train.loss_chunk_size=256`` (= experiment=chatglm3_{lora,ptuning}_lowmem);
  * QLoRA r8 nf4 through real bitsandbytes (``from_pretrained`` with the method's quantization_config), 28
    layers, bs 1 x 1024 (= experiment=chatglm2_qlora_lowmem), with and without the two options;
  * LoRA r32, 28 layers, LLaMA-Factory's bs 4 x 1024 tokens (512+512), plain and with checkpointing
    (LLaMA-Factory's default): samples/s against its 21.67 (A100);
  * full fine-tuning of a 4-layer shortened model (checkpointing + chunked CE);
  * the project's CLI end to end (``python -m glm_experiments``, a GPU-sized tiny GLM, a few hundred steps,
    tracking=none): bf16, ``perf/cuda_max_allocated_mib``, batched generation before/after, checkpoints;
  * ``pytest -m gpu tests/gpu/test_gpu.py``.

Every case runs in its own process on CUDA (clean peak stats, a time cap that can kill it) inside a
try/except: an error or a hit cap is recorded as the case's status and the next case runs. A case starts
only if the overall budget (--budget) leaves room for it; otherwise it is skipped with the reason.

Layout: this file is the command (installing what is missing, the environment record, the driver); the cases and
their settings from conf/ are in gpu_cases.py, a train case in gpu_train.py, the CLI and pytest cases in
gpu_cli.py, the report in gpu_report.py.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from gpu_cases import (
    CASES,
    REFERENCE,
    traced_figures,
    train_spec,
    write_traced,
)
from gpu_cli import CLI_GPU_MODEL, cli_case, cli_child, cli_overrides, pytest_case
from gpu_report import environment, fmt, reference_text, write_report
from gpu_train import failure, run_train_case, worker_main
from harness import ROOT

# read here by tests/gpu/test_gpu_check.py
__all__ = [
    "CASES",
    "CLI_GPU_MODEL",
    "NEEDED",
    "NEEDED_CUDA",
    "cli_overrides",
    "ensure_packages",
    "main",
    "traced_figures",
    "train_spec",
]

WHEELS = ROOT / "gpu_wheels"

# module -> distribution, for what the GPU machine lacks (bitsandbytes only where CUDA is)
NEEDED = {
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "antlr4": "antlr4-python3-runtime",
    "datasets": "datasets",
    "pyarrow": "pyarrow",
    "dill": "dill",
    "multiprocess": "multiprocess",
    "xxhash": "xxhash",
}
NEEDED_CUDA = {"bitsandbytes": "bitsandbytes"}


# ============================================================================ environment
def ensure_packages(
    device: str, wheels: Path = WHEELS, site: Path | None = None
) -> dict:
    """Install the carried wheels of whatever needed module is missing, into ``<tmp>/glm_gpu_check/pyX.Y/site-packages``
    (added to sys.path and PYTHONPATH for the case processes). pip first; if pip is unusable, unzip the wheels."""
    import torch

    needed = dict(
        NEEDED,
        **(NEEDED_CUDA if device == "cuda" and torch.cuda.is_available() else {}),
    )
    # one per Python version (the wheels are cp312): never shadows what this interpreter already has
    site = (
        site
        or Path(tempfile.gettempdir())
        / "glm_gpu_check"
        / f"py{sys.version_info[0]}.{sys.version_info[1]}"
        / "site-packages"
    )
    missing = {m: d for m, d in needed.items() if importlib.util.find_spec(m) is None}
    if missing and site.is_dir():  # a warm machine: what an earlier run installed
        _add_site(site)
        missing = {
            m: d for m, d in missing.items() if importlib.util.find_spec(m) is None
        }
    report = {"missing_before": sorted(missing.values()), "installed": [], "how": None}
    if not missing:
        return report
    if not wheels.is_dir():
        report["how"] = f"no {wheels} to install from"
        return report
    site.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--find-links",
        str(wheels),
        "--no-deps",
        "--upgrade",
        "--target",
        str(site),
        "--disable-pip-version-check",
        "--quiet",
        *sorted(set(missing.values())),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    report["how"] = " ".join(cmd[1:])
    if (
        proc.returncode != 0
    ):  # no pip, or it refused: a wheel is a zip of the installed files
        report["pip_error"] = (proc.stderr or proc.stdout).strip()[-1500:]
        report["how"] = "unzip (pip failed)"
        for dist in set(missing.values()):
            prefix = dist.replace("-", "_").lower() + "-"
            for wheel in wheels.glob("*.whl"):
                if wheel.name.lower().startswith(prefix):
                    with zipfile.ZipFile(wheel) as z:
                        z.extractall(site)
    _add_site(site)
    report["installed"] = sorted(
        d for m, d in missing.items() if importlib.util.find_spec(m) is not None
    )
    report["still_missing"] = sorted(
        d for m, d in missing.items() if importlib.util.find_spec(m) is None
    )
    return report


def _add_site(site: Path) -> None:
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(site) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(site), *[p for p in paths if p]]
        )
    importlib.invalidate_caches()


# ============================================================================ driver
def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default=os.environ.get("OUT"), help="output dir (default $OUT)"
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument(
        "--layers",
        type=int,
        default=28,
        help="decoder layers of the 6B-shaped cases (28)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny hidden sizes and lengths (the CPU dry run)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per case (CUDA 4, CPU 1)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (CUDA 2, CPU 1)"
    )
    parser.add_argument(
        "--cli-steps",
        type=int,
        default=None,
        help="CLI training steps (CUDA 300, tiny 4)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated case keys: " + ",".join(c[0] for c in CASES),
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for all cases (CUDA 420, CPU 900)",
    )
    parser.add_argument(
        "--isolate",
        choices=("auto", "yes", "no"),
        default="auto",
        help="each train case in its own process (auto: on CUDA)",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="do not install carried wheels"
    )
    parser.add_argument(
        "--trace-only",
        action="store_true",
        help="write bench/results/gpu_check_traced.json (CPU)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--cli-child", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    return parser, parser.parse_args(argv)


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.result)
    if args.cli_child:
        cli_child(args.cli_child, args.rest)
        return 0

    started = time.perf_counter()
    cuda = args.device == "cuda"
    args.steps = args.steps if args.steps is not None else (4 if cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    budget = args.budget if args.budget is not None else (420.0 if cuda else 900.0)
    install = (
        {"skipped": "--no-install"} if args.no_install else ensure_packages(args.device)
    )
    if args.trace_only:
        print(f"wrote {write_traced(args)}")
        return 0
    if not args.out:
        parser.error("--out DIR (or $OUT) is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    report = {
        "status": "running",
        "mode": (
            f"{args.device}, {args.layers} layers"
            + (", tiny shapes" if args.tiny else "")
        ),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "install": install,
        "environment": environment(args.device),
        "budget_seconds": budget,
        "mfu_formula": (
            "6 * N * tokens/s / 989e12 (H200 dense bf16 peak); N = all parameters (frozen base, "
            "unquantised for QLoRA, plus the adapter), input tokens only: for LoRA / P-Tuning / QLoRA "
            "a convention (frozen weights get no gradient), not hardware utilisation"
        ),
        "reference": REFERENCE,
        "cases": {},
    }
    if cuda and not torch.cuda.is_available():
        report["status"] = "no CUDA"
        report["error"] = "torch.cuda.is_available() is False"
        write_report(report, out)
        print(report["error"], file=sys.stderr)
        return 1
    isolate = args.isolate == "yes" or (args.isolate == "auto" and cuda)
    only = {k for k in args.only.split(",") if k}
    unknown = only - {c[0] for c in CASES}
    if unknown:
        parser.error(
            f"--only: unknown case(s) {sorted(unknown)}; known: {', '.join(c[0] for c in CASES)}"
        )
    traced = {} if args.tiny or args.layers != 28 else traced_figures()
    for key, title, overrides, layers, ref_key, cap in CASES:
        if only and key not in only:
            continue
        case = {"title": title, "overrides": overrides}
        report["cases"][key] = case
        left = budget - (time.perf_counter() - started)
        cap = cap if cuda else cap * 4
        if left < min(cap, 45 if cuda else 20):
            case.update(
                status="skipped",
                reason=f"budget: {left:.0f} s of --budget {budget:.0f} s left, case needs up to {cap} s",
            )
            write_report(report, out)
            continue
        print(f"[{time.perf_counter() - started:6.1f} s] {key}: {title}", flush=True)
        # what the JSON says if the whole command is killed during this case
        case["status"] = "running"
        write_report(report, out)
        t0 = time.perf_counter()
        try:
            if key == "cli":
                case.update(cli_case(args, timeout=min(cap, left)))
            elif key == "pytest_gpu":
                case.update(pytest_case(args, timeout=min(cap, left)))
            else:
                run_train_case(
                    case, key, overrides, layers, traced, isolate, min(cap, left), args
                )
        except Exception as exc:  # noqa: BLE001  (one failure never loses the others)
            case.update(failure(exc))
        case["seconds"] = time.perf_counter() - t0
        case["reference"] = reference_text(ref_key, case)
        measured = (
            f"alloc {fmt(case.get('cuda_max_allocated_mib', case.get('perf/cuda_max_allocated_mib')))} MiB, "
            f"{fmt(case.get('samples_per_s'), '.2f')} samples/s"
        )
        print(
            f"           -> {case.get('status')}: "
            + (case.get("reason") or case.get("error") or measured)
            + f" ({case['seconds']:.0f} s)",
            flush=True,
        )
        write_report(report, out)
    report["status"] = "done"
    report["total_seconds"] = time.perf_counter() - started
    write_report(report, out)
    print(
        f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} ({report['total_seconds']:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
