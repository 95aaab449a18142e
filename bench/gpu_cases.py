"""What bench/gpu_check.py runs: its cases, each one's settings from the project's config, and the traced column.

A train case's method, batch, lengths and the two memory options are composed from conf/ by the case's override
list (:func:`train_spec`); its traced figure is bench/results/memory_trace.json's case of the very same list (the
28-layer cases bench/traced_peaks.py traces) or bench/results/gpu_check_traced.json's (``--trace-only`` traces
the others).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from harness import RESULTS
from overrides import DEMO, LORA_LOWMEM, OFF, PTUNING_LOWMEM, QLORA_LOWMEM
from synthetic import CHATGLM3_6B

from glm_experiments.compose import compose

TRACED_FILE = RESULTS / "memory_trace.json"
GPU_TRACED_FILE = RESULTS / "gpu_check_traced.json"
MIB = 2**20
REFERENCE = {
    "chatglm3_demo_lora_mib": 14082,
    "chatglm3_demo_ptuning_v2_mib": 18426,
    "llama_factory_lora_r32_samples_per_s": 21.67,
    "llama_factory_qlora_mib": 5.14e9 / MIB,
}
# LLaMA-Factory's LoRA benchmark setting on the ChatGLM2-6B shape
_LF = [
    "model=chatglm2",
    "data=adgen",
    "method=lora",
    "method.r=32",
    "data.max_source_length=512",
    "data.max_target_length=512",
    "train.per_device_train_batch_size=4",
]

# (key, title, overrides of the real config, layers (None = --layers / 28), reference key, cap seconds on CUDA)
CASES = [
    (
        "lora",
        "LoRA r8, bs 4, 256+512",
        [LORA_LOWMEM, *OFF],
        None,
        "chatglm3_demo_lora_mib",
        90,
    ),
    (
        "lora_lowmem",
        "LoRA r8, bs 4, 256+512, checkpointing + chunked CE (experiment=chatglm3_lora_lowmem)",
        [LORA_LOWMEM],
        None,
        "chatglm3_demo_lora_mib",
        90,
    ),
    (
        "ptuning",
        "P-Tuning v2 pre_seq_len 128, bs 4, 256+512",
        [PTUNING_LOWMEM, *OFF],
        None,
        "chatglm3_demo_ptuning_v2_mib",
        90,
    ),
    (
        "ptuning_lowmem",
        (
            "P-Tuning v2 pre_seq_len 128, bs 4, 256+512, checkpointing + chunked CE "
            "(experiment=chatglm3_ptuning_lowmem)"
        ),
        [PTUNING_LOWMEM],
        None,
        "chatglm3_demo_ptuning_v2_mib",
        90,
    ),
    (
        "qlora_lowmem",
        (
            "QLoRA r8 nf4, ChatGLM2-6B shape, bs 1, 512+512, checkpointing + chunked CE "
            "(experiment=chatglm2_qlora_lowmem)"
        ),
        [QLORA_LOWMEM],
        None,
        "llama_factory_qlora_mib",
        180,
    ),
    (
        "qlora",
        "QLoRA r8 nf4, ChatGLM2-6B shape, bs 1, 512+512",
        [QLORA_LOWMEM, *OFF],
        None,
        "llama_factory_qlora_mib",
        90,
    ),
    (
        "lora_r32_lf",
        "LoRA r32, ChatGLM2-6B shape, bs 4 x 1024 (512+512)",
        [*_LF, *OFF],
        None,
        "llama_factory_lora_r32_samples_per_s",
        90,
    ),
    (
        "lora_r32_lf_ckpt",
        "LoRA r32, ChatGLM2-6B shape, bs 4 x 1024, gradient checkpointing (LLaMA-Factory's default)",
        [*_LF, "train.gradient_checkpointing=true", "train.loss_chunk_size=0"],
        None,
        "llama_factory_lora_r32_samples_per_s",
        90,
    ),
    (
        "full_4l",
        "full fine-tuning, 4 layers, bs 4, 256+512, checkpointing + chunked CE",
        [
            *DEMO,
            "method=full",
            "train.gradient_checkpointing=true",
            "train.loss_chunk_size=256",
        ],
        4,
        None,
        90,
    ),
    (
        "cli",
        "CLI end to end: python -m glm_experiments (GPU-sized tiny GLM, tracking=none)",
        [],
        None,
        None,
        150,
    ),
    (
        "pytest_gpu",
        (
            "pytest -m gpu tests/gpu/test_gpu.py (bf16 vs fp32, QLoRA train+reload, GPU = CPU greedy, CLI CUDA "
            "metrics)"
        ),
        [],
        None,
        None,
        120,
    ),
]

# the CPU dry run's shapes: seconds per case
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
}


def train_spec(key: str, overrides: list[str], layers: int, args) -> dict:
    """What the project's config says for this case (method settings, batch, lengths, the two knobs)."""
    from omegaconf import OmegaConf

    cfg = compose(overrides)
    t, d = cfg.train, cfg.data
    batch, source, target = (
        t.per_device_train_batch_size,
        d.max_source_length,
        d.max_target_length,
    )
    if (
        args.tiny
    ):  # seconds on a CPU: a few short samples, chunks smaller than the supervised part
        batch, source, target = min(batch, 2), 8, 16
    return {
        "key": key,
        "kind": "train",
        "device": args.device,
        "overrides": overrides,
        "layers": layers,
        "shape": TINY_SHAPE if args.tiny else CHATGLM3_6B,
        "method_cfg": OmegaConf.to_container(cfg.method, resolve=True),
        "batch": batch,
        "source": source,
        "target": target,
        "gradient_checkpointing": bool(t.gradient_checkpointing),
        "loss_chunk_size": min(int(t.loss_chunk_size), 8)
        if args.tiny
        else int(t.loss_chunk_size),
        "warmup": args.warmup,
        "steps": args.steps,
    }


def trace_case(spec: dict) -> dict:
    """The traced peak of this spec's training steps (bench/memory_trace.py, FakeTensorMode: no data, no GPU)."""
    import torch
    from memory_trace import trace_any_method
    from omegaconf import OmegaConf
    from synthetic import chatglm_config

    return trace_any_method(
        chatglm_config(spec["shape"], spec["layers"]),
        OmegaConf.create(spec["method_cfg"]),
        spec["batch"],
        spec["source"],
        spec["target"],
        gradient_checkpointing=spec["gradient_checkpointing"],
        loss_chunk_size=spec["loss_chunk_size"],
        dtype=torch.bfloat16,
    )


def traced_figures() -> dict:
    """key -> traced case (bench/results/memory_trace.json for the 28-layer cases it has, gpu_check_traced.json
    for the others), matched by the exact override list so a traced figure is of the same config."""
    out = {}
    by_overrides = {}
    if TRACED_FILE.exists():
        for name, case in json.loads(TRACED_FILE.read_text()).get("cases", {}).items():
            by_overrides[json.dumps(case["overrides"])] = {
                **case,
                "source": f"bench/results/memory_trace.json: {name.strip()}",
            }
    extra = (
        json.loads(GPU_TRACED_FILE.read_text()).get("cases", {})
        if GPU_TRACED_FILE.exists()
        else {}
    )
    for key, _title, overrides, layers, _ref, _cap in CASES:
        hit = by_overrides.get(json.dumps(overrides)) if layers is None else None
        if hit is None and key in extra and extra[key]["overrides"] == overrides:
            hit = {**extra[key], "source": "bench/results/gpu_check_traced.json"}
        if hit is not None:
            out[key] = hit
    return out


def write_traced(args) -> Path:
    """``--trace-only``: trace the cases bench/results/memory_trace.json lacks (CPU, fake tensors) and save them."""
    known = traced_figures()
    cases = {}
    for key, _title, overrides, layers, _ref, _cap in CASES:
        if key == "cli" or (
            key in known and "gpu_check_traced" not in known[key]["source"]
        ):
            continue
        spec = train_spec(key, overrides, layers or 28, args)
        start = time.perf_counter()
        r = trace_case(spec)
        cases[key] = {
            **r,
            "overrides": overrides,
            "layers": spec["layers"],
            "batch": spec["batch"],
            "source_len": spec["source"],
            "target_len": spec["target"],
            "gradient_checkpointing": spec["gradient_checkpointing"],
            "loss_chunk_size": spec["loss_chunk_size"],
            "trace_seconds": time.perf_counter() - start,
        }
        print(f"traced {key}: {r['peak_mib']:,.0f} MiB", flush=True)
    how = (
        "bench/gpu_check.py --trace-only: bench/memory_trace.py's FakeTensorMode trace of the gpu_check cases "
        "memory_trace.json lacks (bf16, AdamW, two steps)"
    )
    GPU_TRACED_FILE.write_text(
        json.dumps({"how": how, "cases": cases}, indent=2) + "\n"
    )
    return GPU_TRACED_FILE
