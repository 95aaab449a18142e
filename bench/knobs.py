"""knobs: each memory/speed knob against the baseline on a GLM with ChatGLM's 65,024-token vocabulary.

Hidden 256, 4 layers, full fine-tuning, random weights. Knobs: gradient checkpointing, eager vs SDPA attention,
bf16 autocast vs fp32, chunked cross-entropy (``train.loss_chunk_size=512``, the ``glm_experiments.recipe.losses.chunked_loss``
GlmTrainer uses). Per knob: forward+backward speed vs the baseline (rounds interleaved, order alternating) and the
step's peak memory (a separate process, glibc's mmap threshold lowered, VmHWM reset before each step).
"""

from __future__ import annotations

from functools import partial

import torch
from harness import (
    fmt_ratio,
    paired_ratio,
    precise_malloc,
    reset_peak_rss,
    rss_mib,
    run_worker,
    timed_rounds,
    trim_malloc,
)
from synthetic import glm_config, random_batch

KNOBS = (
    "baseline",
    "grad_checkpointing",
    "eager_attention",
    "bf16_autocast",
    "chunked_ce",
)


def knob_config():
    """The knob model's config (also bench/traced_peaks.py's tracer check)."""
    shape = {
        "vocab_size": 65024,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 32,
    }
    return glm_config(shape, 4, max_position_embeddings=2048)


def knob_model(seed: int = 0):
    from transformers import GlmForCausalLM

    torch.manual_seed(seed)
    return GlmForCausalLM(knob_config())


def knob_batch(bs: int, seq: int) -> dict:
    return random_batch(bs, seq, seq // 3, 65000)  # prompt part unsupervised, as in SFT


def knob_step(model, batch, knob: str) -> float:
    """Forward + backward with one knob changed from the baseline (fp32, SDPA, full logits, no checkpointing)."""
    from glm_experiments.recipe.losses import chunked_loss

    if knob == "grad_checkpointing":
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    if knob == "eager_attention":
        model.set_attn_implementation("eager")
    try:
        with torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=knob == "bf16_autocast"
        ):
            if (
                knob == "chunked_ce"
            ):  # what train.loss_chunk_size=512 does inside GlmTrainer.compute_loss
                with chunked_loss(model, 512):
                    loss = model(**batch).loss
            else:
                loss = model(**batch).loss
        loss.backward()
    finally:
        if knob == "grad_checkpointing":
            model.gradient_checkpointing_disable()
        if knob == "eager_attention":
            model.set_attn_implementation("sdpa")
    model.zero_grad(set_to_none=True)
    return float(loss)


def memory_worker(spec: dict) -> dict:
    """Each knob's step peak over the resting RSS, in a fresh process (``run.py --worker knobs-mem``)."""
    precise_malloc()
    model = knob_model()
    model.train()
    batch = knob_batch(spec["batch"], spec["seq"])
    knob_step(model, batch, "baseline")  # first-call allocations out of the way
    out = {}
    for knob in KNOBS:
        trim_malloc()
        before = rss_mib()[0]
        reset_peak_rss()
        loss = knob_step(model, batch, knob)
        out[knob] = {"peak_over_resting_mib": rss_mib()[1] - before, "loss": loss}
    return out


def run(args) -> dict:
    bs, seq = (1, 192) if args.quick else (4, 512)
    rounds = 2 if args.quick else 5
    knobs = KNOBS
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if args.quick and args.device == "cpu" and not native_bf16:
        knobs = tuple(
            k for k in KNOBS if k != "bf16_autocast"
        )  # emulated bf16: most of the --quick time, known 0.01x
    model = knob_model()
    model.train()
    batch = knob_batch(bs, seq)
    losses = {k: knob_step(model, batch, k) for k in knobs}  # warm-up + equality check
    times = timed_rounds(
        {k: partial(knob_step, model, batch, k) for k in knobs}, rounds
    )
    mem = run_worker("knobs-mem", {"batch": bs, "seq": seq})
    base_mem = mem.get("baseline", {}).get("peak_over_resting_mib")
    res = {
        "model": "GlmForCausalLM hidden 256, 4 layers, 8 heads / 2 kv, vocab 65,024 (ChatGLM's), full fine-tuning, "
        "random weights",
        "batch": bs,
        "seq": seq,
        "rounds": rounds,
        "step": "forward + backward (optimizer step excluded: identical for every knob)",
        "cpu_native_bf16": native_bf16,
        "memory_method": "separate process, glibc mmap threshold 64 KiB, VmHWM reset before each step: peak RSS over "
        "the resting RSS (weights + optimizer-free state) = activations + gradients + logits of one step",
        "knobs": {},
    }
    for knob in knobs:
        m = mem.get(knob, {}).get("peak_over_resting_mib")
        res["knobs"][knob] = {
            "speed_vs_baseline": paired_ratio(times["baseline"], times[knob]),
            "seconds": times[knob],
            "loss": losses[knob],
            "step_peak_mib": m,
            "memory_vs_baseline": (m / base_mem) if (m and base_mem) else None,
        }
    res["chunked_ce_loss_matches"] = (
        abs(losses["chunked_ce"] - losses["baseline"]) < 1e-4
    )
    if "error" in mem:
        res["memory_error"] = mem["error"]
    rows = []
    for knob, v in res["knobs"].items():
        mem_s = (
            f"{v['step_peak_mib']:,.0f} MiB"
            if v["step_peak_mib"] is not None
            else "n/a"
        )
        rel = (
            f" ({v['memory_vs_baseline']:.2f}x mem)" if v["memory_vs_baseline"] else ""
        )
        rows.append(
            (
                knob,
                f"step peak {mem_s}{rel}",
                f"speed {fmt_ratio(v['speed_vs_baseline'])} of baseline",
                "",
            )
        )
    res["rows"] = rows
    return res
