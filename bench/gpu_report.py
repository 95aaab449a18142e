"""bench/gpu_check.py's report: ``gpu_check.json`` and ``gpu_check.md`` (the measured figures beside the traced
ones), rewritten after every case so that a killed command loses nothing, and the environment it records."""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from gpu_cases import REFERENCE

MIB = 2**20


def fmt(v, spec=",.0f", suffix=""):
    return "—" if v is None else f"{v:{spec}}{suffix}"


def reference_text(ref_key: str | None, case: dict) -> str:
    if ref_key is None:
        return ""
    value = REFERENCE[ref_key]
    if ref_key.endswith("samples_per_s"):
        sps = case.get("samples_per_s")
        return f"LLaMA-Factory {value} samples/s (A100)" + (
            f": {sps / value:.2f}x" if sps else ""
        )
    label = {
        "chatglm3_demo_lora_mib": "ChatGLM3 demo",
        "chatglm3_demo_ptuning_v2_mib": "ChatGLM3 demo",
        "llama_factory_qlora_mib": "LLaMA-Factory 5.14 GB =",
    }[ref_key]
    return f"{label} {value:,.0f} MiB"


def case_row(case: dict) -> str:
    status = case.get("status", "?")
    note = case.get("reason") or case.get("error") or ""
    status_cell = status + (f": {note[:160]}" if note and status != "measured" else "")
    traced = case.get("traced_peak_mib")
    alloc = case.get("cuda_max_allocated_mib", case.get("perf/cuda_max_allocated_mib"))
    reserved = case.get("cuda_max_reserved_mib", case.get("perf/cuda_max_reserved_mib"))
    ratio = f"{alloc / traced:.2f}x" if alloc and traced else "—"
    tokens_per_s = case.get("tokens_per_s", case.get("perf/tokens_per_s"))
    mfu = case.get("mfu")
    cells = [
        case["title"],
        status_cell,
        fmt(alloc, suffix=" MiB"),
        fmt(reserved, suffix=" MiB"),
        fmt(traced, suffix=" MiB"),
        ratio,
        case.get("reference") or "",
        fmt(case.get("samples_per_s"), ".2f"),
        fmt(tokens_per_s, ",.0f"),
        fmt(mfu, ".1%") if mfu else "—",
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# GPU check ({report['status']})",
        "",
        (
            f"{env.get('date')}, device {env.get('gpu', env.get('device'))}, torch {env.get('torch')} "
            f"(CUDA {env.get('torch_cuda')}), transformers {env.get('transformers')}, peft {env.get('peft')}, "
            f"bitsandbytes {env.get('bitsandbytes')}, python {env.get('python')}. Mode: {report['mode']}."
        ),
        "",
        (
            "Measured: `torch.cuda.max_memory_allocated` / `max_memory_reserved` over the training steps (weights "
            "included); traced: bench/memory_trace.py under FakeTensorMode (no CUDA context, workspaces or "
            f"fragmentation). MFU = {report['mfu_formula']}."
        ),
        "",
        (
            "| case | status | max allocated | max reserved | traced peak | measured / traced | reference | samples/s | "
            "tokens/s | MFU |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [case_row(case) for case in report["cases"].values()]
    cli = report["cases"].get("cli", {})
    if cli.get("checks"):
        lines += [
            "",
            "CLI checks: "
            + ", ".join(
                f"{k}: {'yes' if v else 'NO'}" for k, v in cli["checks"].items()
            ),
        ]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    for name, text in (
        ("gpu_check.json", json.dumps(report, indent=2, default=float)),
        ("gpu_check.md", markdown(report)),
    ):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


def environment(device: str) -> dict:
    import torch

    info = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": device,
        "cpu_count": os.cpu_count(),
    }
    for name in (
        "transformers",
        "peft",
        "accelerate",
        "datasets",
        "pyarrow",
        "hydra",
        "omegaconf",
        "bitsandbytes",
    ):
        try:
            info[name] = importlib.import_module(name).__version__
        except Exception as exc:  # noqa: BLE001
            info[name] = f"not importable: {type(exc).__name__}: {exc}"[:300]
    try:  # what the machine has (issue 19: "check with pip list in the first run")
        listed = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "list",
                "--format=json",
                "--disable-pip-version-check",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        info["pip_list"] = {
            p["name"]: p["version"] for p in json.loads(listed.stdout or "[]")
        }
    except Exception as exc:  # noqa: BLE001
        info["pip_list"] = f"pip list failed: {exc}"[:300]
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_mib=props.total_memory / MIB,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return info
