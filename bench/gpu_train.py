"""One train case of bench/gpu_check.py: build the model, apply the method, time the steps, read the peaks.

Models: random weights built directly on the device in bf16, ``GlmForCausalLM`` of the case's shape (QLoRA: a
random bf16 checkpoint read back by ``from_pretrained`` with the method's quantization_config). ``warmup`` steps,
then ``steps`` timed ones (bf16 autocast, AdamW over the trainable parameters, the same two knobs the trainer
applies). Memory: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over the training steps (peak
stats reset once the model is built and adapted, weights included, as in the trace), plus the peak while
building. Throughput: median step time. MFU = 6 * N * tokens/s / peak bf16 FLOP/s (H200: 989e12 dense). N counts
*all* parameters (frozen base included, the base's unquantised count for QLoRA) and only the input tokens (no
attention FLOPs, no recomputation for checkpointing): for LoRA/P-Tuning/QLoRA, whose backward skips the frozen
weights' gradients, it is the usual convention, not the hardware's utilisation. On CUDA each case runs in its own
process (:func:`run_isolated`: clean peak stats, a cap that can kill it).
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from gpu_cases import trace_case, train_spec
from harness import BENCH
from synthetic import (
    chatglm_config,
    quantized_random_model,
    random_batch,
    random_model,
    train_steps,
)

MIB = 2**20
PEAK_BF16_FLOPS_H200 = 989e12


def param_count(config) -> int:
    from transformers import GlmForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in GlmForCausalLM(config).parameters())


def train_case(spec: dict) -> dict:
    from omegaconf import OmegaConf

    from glm_experiments.methods import get_method, trainable_summary

    device = spec["device"]
    cuda = device == "cuda"
    config = chatglm_config(spec["shape"], spec["layers"])
    method_cfg = OmegaConf.create(spec["method_cfg"])
    method = get_method(method_cfg.name)
    if method.base_quantization:  # QLoRA without bitsandbytes: a clear reason
        from glm_experiments.models.quantization import device_supported

        device_supported(method.base_quantization)
    out: dict = {
        "layers": spec["layers"],
        "batch": spec["batch"],
        "tokens_per_sample": spec["source"] + spec["target"],
        "gradient_checkpointing": spec["gradient_checkpointing"],
        "loss_chunk_size": spec["loss_chunk_size"],
        "method": method_cfg.name,
    }
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if method_cfg.name == "qlora":
        cache = (
            Path(tempfile.gettempdir())
            / "glm_gpu_check"
            / f"random_glm_{config.num_hidden_layers}l_{config.hidden_size}h"
        )
        model = quantized_random_model(
            config, method, method_cfg, cache, build_device=device
        )
    else:
        model = random_model(config, torch.bfloat16, device)
    model = method.apply(model, method_cfg)
    if spec["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    model.train()
    out["build_seconds"] = time.perf_counter() - start
    summary = trainable_summary(model)
    out["trainable_params"] = summary["trainable"]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # QLoRA: PEFT's k-bit preparation upcasts every non-4-bit weight (embedding, head, norms) to fp32
    out["embedding_dtype"] = str(base.get_input_embeddings().weight.dtype)
    out["head_dtype"] = str(base.get_output_embeddings().weight.dtype)
    # N for MFU: every parameter of the unquantised shape plus the method's trainable ones (adapter / prefix)
    n_params = param_count(config) + (
        summary["trainable"] if method_cfg.name != "full" else 0
    )
    out["n_params"] = n_params
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=1e-4, **({"fused": True} if cuda else {})
    )  # Trainer's CUDA default
    out["optimizer"] = "AdamW(fused)" if cuda else "AdamW"
    if cuda:
        torch.cuda.synchronize()
        out["build_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
        out["weights_allocated_mib"] = torch.cuda.memory_allocated() / MIB
        torch.cuda.reset_peak_memory_stats()
    bs, seq = spec["batch"], spec["source"] + spec["target"]
    # loss on the target part, as the data pipeline does
    batch = random_batch(bs, seq, spec["source"], config.vocab_size - 10, device)
    times, losses = train_steps(
        model,
        optimizer,
        batch,
        spec["warmup"] + spec["steps"],
        device,
        loss_chunk_size=spec["loss_chunk_size"],
    )
    out["losses"] = losses
    out["loss_finite"] = all(math.isfinite(v) for v in losses)
    out["step_seconds"] = times
    step = statistics.median(times[spec["warmup"] :] or times)
    out["samples_per_s"] = bs / step
    out["tokens_per_s"] = bs * seq / step
    if cuda:
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
        out["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / MIB
        out["gpu"] = torch.cuda.get_device_name(0)
        out["peak_flops"] = (
            PEAK_BF16_FLOPS_H200
            if any(k in out["gpu"] for k in ("H200", "H100", "H800"))
            else None
        )
        if out["peak_flops"]:
            out["mfu"] = 6 * n_params * out["tokens_per_s"] / out["peak_flops"]
    return out


def failure(exc: BaseException) -> dict:
    """A case's record of ``exc``: skipped where the method needs a CUDA GPU, an error otherwise."""
    text = f"{type(exc).__name__}: {exc}"
    unavailable = "needs a CUDA GPU" in str(exc)
    return {
        "status": "skipped" if unavailable else "error",
        ("reason" if unavailable else "error"): text[:1000],
        "traceback": traceback.format_exc()[-3000:],
    }


def worker_main(spec_json: str, result_path: str) -> int:
    """``gpu_check.py --worker SPEC --result FILE``: one train case, its record written to FILE."""
    try:
        result = {**train_case(json.loads(spec_json)), "status": "measured"}
    except Exception as exc:  # noqa: BLE001
        result = failure(exc)
    Path(result_path).write_text(json.dumps(result, default=float))
    return 0


def run_isolated(spec: dict, timeout: float) -> dict:
    """One train case in a fresh process (clean CUDA peak stats; killable at the cap)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [
        sys.executable,
        str(BENCH / "gpu_check.py"),
        "--worker",
        json.dumps(spec),
        "--result",
        result_path,
    ]
    try:
        proc = subprocess.run(
            cmd, check=False, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"cap {timeout:.0f} s hit"}
    try:
        saved = json.loads(Path(result_path).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        saved = {}
    finally:
        Path(result_path).unlink(missing_ok=True)
    if not saved:
        err = proc.stderr.strip().splitlines()
        oom = proc.returncode in (-9, 137) or any(
            "out of memory" in ln.lower() for ln in err[-8:]
        )
        return {
            "status": "error",
            "error": ("OOM: " if oom else "")
            + (err[-1] if err else f"rc {proc.returncode}")[:500],
            "stderr_tail": proc.stderr[-3000:],
        }
    return saved


def run_train_case(
    case: dict,
    key: str,
    overrides: list[str],
    layers: int | None,
    traced: dict,
    isolate: bool,
    timeout: float,
    args,
) -> None:
    """One train case into ``case``: its spec from conf/, its traced figure, then the measurement (in its own
    process when ``isolate``); QLoRA is skipped without CUDA."""
    cuda = args.device == "cuda"
    spec = train_spec(key, overrides, min(layers or args.layers, args.layers), args)
    case["spec"] = {
        k: v for k, v in spec.items() if k not in ("overrides", "device", "key")
    }
    if key in traced:
        case["traced_peak_mib"] = traced[key]["peak_mib"]
        case["traced_source"] = traced[key]["source"]
    elif (
        args.tiny or not cuda
    ):  # tiny shapes trace in a second: exercises the traced column
        case["traced_peak_mib"] = trace_case(spec)["peak_mib"]
        case["traced_source"] = "traced now (bench/memory_trace.py)"
    if "qlora" in key and not cuda:
        case.update(
            status="skipped", reason="QLoRA needs CUDA + bitsandbytes (4-bit kernels)"
        )
    elif isolate:
        case.update(run_isolated(spec, timeout=timeout))
    else:
        try:
            case.update({**train_case(spec), "status": "measured"})
        except Exception as exc:  # noqa: BLE001
            case.update(failure(exc))
        finally:
            if cuda:
                torch.cuda.empty_cache()
