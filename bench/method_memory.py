"""memory: training memory per method on a ChatGLM3-6B-shaped model, measured (one fresh process per case).

Methods: LoRA r8, P-Tuning v2 pre_seq_len 128, prompt tuning, freeze last 2, full (CUDA also LoRA r32 and QLoRA
through from_pretrained + bitsandbytes). Random bf16 weights + bf16 autocast (what the framework does where bf16
is supported), Trainer's default optimizer. CPU: 1 layer (``--quick``, seq 8, LoRA and full) or 1 and 2 layers
(seq 64), peak RSS; the 28-layer figures are estimates (:func:`estimate_28_layers`, bench/README.md). CUDA: all
28 layers, bs 4, len 1024, ``torch.cuda.max_memory_allocated``, samples/s, MFU; then the seeds' settings plain
and with gradient checkpointing + chunked CE (bench/traced_peaks.py traces both).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch
from harness import (
    REFERENCE,
    median,
    meminfo_kib,
    precise_malloc,
    reset_peak_rss,
    rss_mib,
    run_worker,
    trim_malloc,
)
from synthetic import (
    CHATGLM3_6B,
    chatglm_config,
    quantized_random_model,
    random_batch,
    random_model,
    train_steps,
)

from glm_experiments.compose import compose

METHOD_OVERRIDES = {
    "lora": ["method=lora", "method.r=8"],
    "lora_r32": ["method=lora", "method.r=32"],
    "ptuning": ["method=ptuning", "method.pre_seq_len=128"],
    "prompt_tuning": ["method=prompt_tuning"],
    "freeze": ["method=freeze", "method.num_last_layers=2"],
    "full": ["method=full"],
    "qlora": ["method=qlora", "method.r=8"],
}
# dense bf16 peak FLOP/s by device name (substring match, first hit wins): for MFU on CUDA
PEAK_BF16_FLOPS = [
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("4090", 165e12),
    ("3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


def worker(spec: dict) -> dict:
    """One (method, layers) training measurement in a fresh process (``run.py --worker memory``)."""
    precise_malloc()
    from transformers import Trainer, TrainingArguments

    from glm_experiments.methods import get_method, trainable_summary

    device, name, layers = spec["device"], spec["method"], spec["layers"]
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec["dtype"]]
    method_cfg = compose(["tracking=none", *METHOD_OVERRIDES[name]]).method
    if name == "freeze":
        method_cfg.num_last_layers = min(2, layers)
    out = {"spec": spec}
    method = get_method(method_cfg.name)
    try:
        method.check_available()
    except Exception as exc:  # noqa: BLE001
        return {**out, "skipped": str(exc)}
    trim_malloc()
    out["rss_after_imports_mib"] = rss_mib()[0]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    config = chatglm_config(CHATGLM3_6B, layers)
    if (
        name == "qlora"
    ):  # a random bf16 checkpoint of the shape (built on the CPU once), loaded 4-bit
        cache = Path(tempfile.gettempdir()) / f"bench_chatglm3_shape_{layers}l"
        model = quantized_random_model(
            config, method, method_cfg, cache, build_device="cpu"
        )
    else:
        model = random_model(config, dtype, device)
    out["rss_after_model_mib"] = rss_mib()[0]
    if spec.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    model = (
        method.apply(model, method_cfg, tokenizer=None)
        if name == "prompt_tuning"
        else method.apply(model, method_cfg)
    )
    if spec.get("gradient_checkpointing") and hasattr(
        model, "enable_input_require_grads"
    ):
        model.enable_input_require_grads()
    model.train()
    summary = trainable_summary(model)
    out["trainable_params"], out["total_params"] = (
        summary["trainable"],
        summary["total"],
    )
    targs = TrainingArguments(
        str(Path(tempfile.gettempdir()) / "bench_mem"),
        report_to="none",
        use_cpu=device == "cpu",
        learning_rate=1e-4,
    )
    opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(targs)
    if device == "cpu":
        opt_kwargs.pop("fused", None)
    optimizer = opt_cls(
        [p for p in model.parameters() if p.requires_grad], **opt_kwargs
    )
    out["optimizer"] = (
        f"{opt_cls.__name__}({', '.join(f'{k}={v}' for k, v in opt_kwargs.items() if k != 'lr')})"
    )
    bs, seq = spec["batch"], spec["seq"]
    batch = random_batch(bs, seq, seq // 3, 60000, device)
    trim_malloc()
    reset_peak_rss()
    step_times, losses = train_steps(
        model,
        optimizer,
        batch,
        spec["steps"],
        device,
        bf16=dtype == torch.bfloat16,
        loss_chunk_size=spec.get("loss_chunk_size", 0),
    )
    out["loss"] = losses[-1]
    out["peak_rss_mib"] = rss_mib()[1]
    out["step_seconds"] = step_times
    out["static_bytes"] = static_bytes(model, optimizer)
    if device == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        timed = step_times[spec.get("warmup", 1) :] or step_times
        out["samples_per_s"] = bs / median(timed)
        out["tokens_per_s"] = bs * seq / median(timed)
        name_gpu = torch.cuda.get_device_name(0)
        peak = next((f for k, f in PEAK_BF16_FLOPS if k in name_gpu), None)
        out["peak_flops"] = peak
        out["mfu"] = 6 * summary["total"] * out["tokens_per_s"] / peak if peak else None
    return out


def static_bytes(model, optimizer) -> dict:
    """Bytes of weights, gradients and optimizer states, split into the per-layer part (scales with depth) and
    the rest."""
    layer_re = re.compile(
        r"\.layers\.(\d+)\.|prefix_encoder"
    )  # the P-Tuning v2 prefix scales with depth too
    static = {"layer": 0, "other": 0}
    state_of = {id(p): s for p, s in optimizer.state.items()}
    for pname, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if p.requires_grad:
            nbytes += p.numel() * p.element_size()  # gradient, same dtype
            nbytes += sum(
                t.numel() * t.element_size()
                for t in state_of.get(id(p), {}).values()
                if torch.is_tensor(t) and t.dim() > 0
            )
        static["layer" if layer_re.search(pname) else "other"] += nbytes
    return static


def run(args) -> dict:
    device = args.device
    methods = ["lora", "ptuning", "prompt_tuning", "freeze", "full"]
    if device == "cuda":
        layers_list, seq, batch, steps, dtype = [28], 1024, 4, 6, "bfloat16"
        methods = [
            "lora",
            "lora_r32",
            "ptuning",
            "prompt_tuning",
            "freeze",
            "full",
            "qlora",
        ]
    else:
        layers_list = [1] if args.quick else [1, 2]
        if (
            args.quick
        ):  # each method costs ~3 CPU minutes here: the two ends of the range
            methods = ["lora", "full"]
        # CPU without AVX512-BF16 runs bf16 matmuls ~4x slower than fp32: keep the token count tiny
        seq, batch, steps, dtype = (8 if args.quick else 64), 1, 2, "bfloat16"
    needed_gib = {"full": 6.5 if 2 not in layers_list else 8.0}
    results = {}
    for name in methods:
        for layers in layers_list:
            key = f"{name}@{layers}L"
            available_gib = meminfo_kib("MemAvailable") / 2**20
            if device == "cpu" and available_gib < needed_gib.get(name, 4.5) * 1.2:
                results[key] = {"skipped": f"only {available_gib:.1f} GiB available"}
                continue
            spec = {
                "method": name,
                "layers": layers,
                "seq": seq,
                "batch": batch,
                "steps": steps,
                "dtype": dtype,
                "device": device,
                "warmup": 2,
            }
            results[key] = run_worker("memory", spec)
    if (
        device == "cuda"
    ):  # the seeds' settings, plain and with the memory options (memory_trace predicts both)
        for name, batch_, seq_ in (
            ("lora", 4, 768),
            ("ptuning", 4, 768),
            ("qlora", 1, 1024),
        ):
            for ckpt, chunk in ((False, 0), (True, 256)):
                spec = {
                    "method": name,
                    "layers": 28,
                    "seq": seq_,
                    "batch": batch_,
                    "steps": steps,
                    "dtype": dtype,
                    "device": device,
                    "warmup": 2,
                    "gradient_checkpointing": ckpt,
                    "loss_chunk_size": chunk,
                }
                results[
                    f"{name}@28L bs{batch_}x{seq_}"
                    + (" +ckpt +chunk256" if ckpt else "")
                ] = run_worker("memory", spec)
    if device == "cpu":
        results["qlora"] = {
            "skipped": "QLoRA needs CUDA + bitsandbytes (4-bit kernels); not measurable on CPU"
        }
    est = estimate_28_layers(results, layers_list, seq * batch)
    out = {
        "device": device,
        "dtype": dtype,
        "seq": seq,
        "batch": batch,
        "layers_measured": layers_list,
        "shape": dict(CHATGLM3_6B, num_hidden_layers=28),
        "measured": results,
        "estimate_28_layers": est,
        "reference": REFERENCE,
    }
    out["qlora_static_estimate_mib"] = est_qlora_mib()
    out["rows"] = rows(device, results, est, out["qlora_static_estimate_mib"])
    return out


def rows(device: str, results: dict, est: dict, qlora_mib: float) -> list[tuple]:
    out = []
    for key, r in results.items():
        if "skipped" in r or "error" in r:
            out.append(
                (
                    f"{key}",
                    r.get("skipped") or r.get("error"),
                    "",
                    "SKIP" if "skipped" in r else "ERROR",
                )
            )
            continue
        if device == "cuda":
            speed = f"{r['samples_per_s']:.2f} samples/s" + (
                f", MFU {r['mfu']:.1%}" if r.get("mfu") else ""
            )
            out.append(
                (
                    f"{key} (measured, CUDA)",
                    f"{r['cuda_max_allocated_mib']:,.0f} MiB max allocated",
                    speed,
                    "",
                )
            )
        else:
            model_mib = r["rss_after_model_mib"] - r["rss_after_imports_mib"]
            out.append(
                (
                    f"{key} (measured, CPU RSS)",
                    f"peak {r['peak_rss_mib']:,.0f} MiB (model {model_mib:,.0f})",
                    f"trainable {r['trainable_params']:,}",
                    "",
                )
            )
    demo = {
        "lora": f"demo {REFERENCE['chatglm3_demo_lora_mib']:,} MiB",
        "ptuning": f"demo {REFERENCE['chatglm3_demo_ptuning_v2_mib']:,} MiB",
    }
    for name, e in est.items():
        # the activation term is unreliable from a few CPU tokens (fixed transients dominate): JSON only
        out.append(
            (
                f"{name} 28L (ESTIMATE)",
                f"{e['static_mib']:,.0f} MiB weights+grads+optimizer",
                demo.get(name, ""),
                "",
            )
        )
    if device == "cpu":
        out.append(
            (
                "qlora 28L (ESTIMATE)",
                f"{qlora_mib:,.0f} MiB static (4-bit layers, bf16 embed/head)",
                f"LLaMA-Factory {REFERENCE['llama_factory_qlora_gb']} GB",
                "",
            )
        )
    return out


def est_qlora_mib() -> float:
    """4-bit nf4 linear weights, bf16 embedding and output head (not quantized), LoRA r8 on q/k/v/o in fp32 with
    grads + Adam (16 B/param)."""
    from memory_trace import NF4_BYTES_PER_PARAM, decoder_linear_params

    h, v, L = 4096, 65024, 28
    kv = 2 * 128
    lora = 8 * ((h + h) + (h + kv) * 2 + (h + h))
    return (
        decoder_linear_params(chatglm_config(CHATGLM3_6B, L)) * NF4_BYTES_PER_PARAM
        + 2 * v * h * 2
        + L * (2 * h * 2 + (h + 2 * kv) * 2)
        + L * lora * 16
    ) / 2**20


def estimate_28_layers(results: dict, layers_list: list[int], tokens: int) -> dict:
    """ESTIMATE: static bytes (weights + grads + optimizer states, counted exactly on the measured model) with
    the per-layer part x 28, plus activations scaled from the measured transient (peak RSS minus static minus
    process baseline) per layer per token. Activations are the rough part; weights/grads/states are exact counts."""
    est = {}
    for name in ("lora", "ptuning", "prompt_tuning", "freeze", "full"):
        r = results.get(f"{name}@{layers_list[0]}L", {})
        if "static_bytes" not in r:
            continue
        L = r["spec"]["layers"]
        per_layer = r["static_bytes"]["layer"] / L
        if (
            name == "freeze"
        ):  # trains the last 2 of 28 layers: frozen layers cost weights only
            frozen_layer = (
                4096 * (4096 + 512)
                + 4096
                + 512
                + 4096 * 4096
                + 4096 * 2 * 13696
                + 13696 * 4096
                + 2 * 4096
            )
            static = (
                r["static_bytes"]["other"] + 26 * frozen_layer * 2 + 2 * per_layer
            )  # measured layers are trained
        else:
            static = r["static_bytes"]["other"] + 28 * per_layer
        static_measured = r["static_bytes"]["other"] + r["static_bytes"]["layer"]
        transient = max(
            r["peak_rss_mib"] - r["rss_after_imports_mib"] - static_measured / 2**20, 0
        )
        act_per_layer_token = (
            transient / (L + 1) / tokens
        )  # +1: embedding/head/loss as one more "layer"
        est[name] = {
            "static_mib": static / 2**20,
            "activation_mib_per_1k_tokens": act_per_layer_token * 29 * 1000,
            "basis": f"measured at {L} layer(s), {tokens} tokens, bf16 weights; per-layer static x 28",
        }
    return est
