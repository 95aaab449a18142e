"""What the benchmarks share: paths, the machine record, process memory, paired timing, subprocesses, results.

A benchmark is a module ``bench/<name>.py`` with ``run(args) -> dict``: the dict's ``rows`` fill the table
``bench/run.py`` prints, the whole dict goes to ``bench/results/<name>.json`` (:func:`write_result`).

Every headline figure is a ratio measured inside one run: the variants are interleaved round by round
(:func:`interleaved`, :func:`timed_rounds`) and the ratio is the median of the per-round ratios
(:func:`paired_ratio`), so a noisy neighbour slows both sides of a ratio alike.

Importing this module costs nothing (the standard library only): bench/gpu_check.py imports it before the
packages its machine lacks are installed.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
if (
    str(ROOT) not in sys.path
):  # this checkout's glm_experiments, not whichever one an editable install points at
    sys.path.insert(0, str(ROOT))

# figures the benchmarks compare against: the ChatGLM3 demo's README and LLaMA-Factory's benchmark (A100)
REFERENCE = {
    "chatglm3_demo_lora_mib": 14082,
    "chatglm3_demo_ptuning_v2_mib": 18426,
    "llama_factory_qlora_gb": 5.14,
    "llama_factory_lora_r32_samples_per_s": 21.67,
}


# ------------------------------------------------------------------------------ numbers
def median(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x"


def interleaved(
    names: Sequence[str], rounds: int, alternate: bool = True
) -> Iterator[str]:
    """Every variant once per round, round after round; with ``alternate`` the order is reversed every other
    round (no variant always runs first, or right after another's warm caches)."""
    for r in range(rounds):
        yield from (names if not alternate or r % 2 == 0 else tuple(reversed(names)))


def timed_rounds(
    variants: dict[str, Callable[[], object]], rounds: int, alternate: bool = True
) -> dict[str, list[float]]:
    """Wall seconds of each variant's call in every round, the variants interleaved (:func:`interleaved`)."""
    times = {name: [] for name in variants}
    for name in interleaved(tuple(variants), rounds, alternate):
        start = time.perf_counter()
        variants[name]()
        times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(
    numerators: Sequence[float], denominators: Sequence[float], scale: float = 1.0
) -> float:
    """Median over rounds of ``numerator / denominator * scale``: a speedup when both are seconds of the same
    round (``scale`` corrects for different amounts of work, e.g. tokens)."""
    return median([n / d * scale for n, d in zip(numerators, denominators)])


# ------------------------------------------------------------------------------ the machine and this process
def meminfo_kib(key: str) -> int:
    """kB from /proc/meminfo (0 where unavailable)."""
    try:
        m = re.search(
            rf"^{key}:\s+(\d+)", Path("/proc/meminfo").read_text(), re.MULTILINE
        )
        return int(m.group(1)) if m else 0
    except OSError:
        return 0


def machine_info(device: str) -> dict:
    import torch
    import transformers

    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
        "load_average": os.getloadavg(),
        "mem_total_gib": round(meminfo_kib("MemTotal") / 2**20, 1),
        "mem_available_gib": round(meminfo_kib("MemAvailable") / 2**20, 1),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def rss_mib() -> tuple[float, float]:
    """(current RSS, high-water mark) of this process in MiB, from /proc/self/status."""
    text = Path("/proc/self/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024
    hwm = int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024
    return rss, hwm


def reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def precise_malloc() -> None:
    """Make glibc hand large frees back to the OS at once, so RSS peaks measure live tensors (worker processes)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: allocations >= 64 KiB via mmap
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def trim_malloc() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def cpu_seconds() -> float:
    """User + system seconds of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime + children_cpu_seconds()


# ------------------------------------------------------------------------------ subprocesses
def subprocess_env() -> dict:
    """This environment, this checkout first on PYTHONPATH, the thread count this process uses."""
    import torch

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def timed_cmd(
    cmd: list[str], env=None, cwd=ROOT
) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(
        cmd,
        check=False,
        cwd=cwd,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
    )
    return time.perf_counter() - start, proc


def cpu_cmd(cmd: list[str]) -> tuple[float, float]:
    """(wall, CPU seconds) of a subprocess; CPU time barely moves with machine load."""
    before = children_cpu_seconds()
    wall, _ = timed_cmd(cmd)
    return wall, children_cpu_seconds() - before


def run_worker(kind: str, spec: dict) -> dict:
    """``bench/run.py --worker KIND --spec JSON`` in a fresh process (its own peak RSS / CUDA stats): the JSON
    line the worker prints, or ``{"spec", "error"}`` (an OOM kill says so)."""
    import torch

    cmd = [
        sys.executable,
        str(BENCH / "run.py"),
        "--worker",
        kind,
        "--spec",
        json.dumps(spec),
        "--threads",
        str(torch.get_num_threads()),
    ]
    wall, proc = timed_cmd(cmd)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines()
        oom = proc.returncode in (-9, 137) or any(
            "out of memory" in ln.lower() for ln in err[-5:]
        )
        return {
            "spec": spec,
            "error": ("OOM: " if oom else "")
            + (err[-1] if err else f"rc {proc.returncode}"),
        }
    return {**json.loads(lines[-1]), "worker_wall_seconds": wall}


# ------------------------------------------------------------------------------ the tiny model, results
def tiny_tokenizer():
    """(path, tokenizer) of the pre-trained tiny checkpoint (built once, cached)."""
    from transformers import AutoTokenizer

    from glm_experiments.config.schema import TinyModelConfig
    from glm_experiments.models.tiny.build import ensure_tiny_checkpoint

    path = ensure_tiny_checkpoint(TinyModelConfig())
    return path, AutoTokenizer.from_pretrained(path)


def write_result(name: str, machine: dict, args, result: dict, seconds: float) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "benchmark": name,
        "quick": args.quick,
        "machine": machine,
        "bench_seconds": seconds,
        "load_average_after": os.getloadavg(),
        **result,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n"
    )
    tmp.replace(path)
    return path
