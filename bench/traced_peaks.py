"""memory_trace: peak training memory of the 28-layer ChatGLM3-6B shape per method and knob, traced.

Under ``FakeTensorMode`` (bench/memory_trace.py): every tensor a bf16 training step allocates (weights, adapter,
saved activations, logits, gradients, AdamW states, temporaries), counted by a dispatch mode, two steps; no data,
no RAM, seconds per case. It is what ``torch.cuda.max_memory_allocated`` counts, minus the CUDA context,
workspaces and fragmentation. QLoRA: the bf16-base trace minus the nf4 saving on the decoder's linears plus
bitsandbytes' largest dequantised weight. Each case's method, batch, lengths and the two memory options come
from the composed config, so the "+ both" rows are exactly the conf/experiment/*_lowmem.yaml runs. The tracer is
checked against a real run of the knob model in a fresh process (traced = counted on real tensors ~ peak RSS).
"""

from __future__ import annotations

import torch
from harness import (
    REFERENCE,
    fmt_ratio,
    precise_malloc,
    reset_peak_rss,
    rss_mib,
    run_worker,
    trim_malloc,
)
from knobs import knob_config
from overrides import DEMO, LORA_LOWMEM, OFF, PTUNING_LOWMEM, QLORA_LOWMEM
from synthetic import CHATGLM3_6B, chatglm_config

from glm_experiments.compose import compose

_TYPICAL = ["data.max_source_length=48", "data.max_target_length=112"]
# (name, overrides of the real config, in --quick)
TRACE_CASES = [
    ("lora r8, bs 4, 256+512 (every sample at max length)", [LORA_LOWMEM, *OFF], True),
    ("  + gradient checkpointing", [LORA_LOWMEM, "train.loss_chunk_size=0"], True),
    (
        "  + chunked CE (train.loss_chunk_size=256)",
        [LORA_LOWMEM, "train.gradient_checkpointing=false"],
        True,
    ),
    ("  + both = experiment=chatglm3_lora_lowmem", [LORA_LOWMEM], True),
    (
        "lora r8, bs 4, AdvertiseGen-typical batch max 48+112",
        [LORA_LOWMEM, *OFF, *_TYPICAL],
        False,
    ),
    (
        "  + gradient checkpointing",
        [LORA_LOWMEM, "train.loss_chunk_size=0", *_TYPICAL],
        False,
    ),
    ("ptuning v2 pre_seq_len 128, bs 4, 256+512", [PTUNING_LOWMEM, *OFF], True),
    ("  + both = experiment=chatglm3_ptuning_lowmem", [PTUNING_LOWMEM], True),
    (
        "prompt tuning 16 tokens, bs 4, 256+512",
        [*DEMO, *OFF, "method=prompt_tuning"],
        False,
    ),
    ("freeze (last 2 layers), bs 4, 256+512", [*DEMO, *OFF, "method=freeze"], False),
    (
        "full, bs 4, 256+512, checkpointing + chunked CE",
        [
            *DEMO,
            "method=full",
            "train.gradient_checkpointing=true",
            "train.loss_chunk_size=256",
        ],
        False,
    ),
    ("qlora r8 nf4, bs 1, 512+512", [QLORA_LOWMEM, *OFF], True),
    ("  + both = experiment=chatglm2_qlora_lowmem", [QLORA_LOWMEM], True),
]


def check_worker(spec: dict) -> dict:
    """The tracer against reality, in a fresh process (``run.py --worker trace-check``): the same two fp32
    training steps of the knob model traced on fake tensors, counted on real ones, and measured as peak RSS
    (glibc returning large frees at once)."""
    precise_malloc()
    from memory_trace import trace_training_step, training_steps

    method_cfg = compose([f"method={spec['method']}"]).method
    shape = (spec["batch"], spec["source"], spec["target"])
    fake = trace_training_step(knob_config(), method_cfg, *shape, dtype=torch.float32)
    trim_malloc()
    start = rss_mib()[0]
    reset_peak_rss()
    real = training_steps(knob_config(), method_cfg, *shape, dtype=torch.float32)
    return {
        "fake_traced_mib": fake["peak_mib"],
        "real_traced_mib": real["peak_mib"],
        "rss_peak_over_start_mib": rss_mib()[1] - start,
    }


def trace_case(config, overrides: list[str]) -> dict:
    """The traced peak of the run ``overrides`` compose, on ``config``'s shape."""
    from memory_trace import trace_any_method

    cfg = compose(overrides)
    t, d = cfg.train, cfg.data
    r = trace_any_method(
        config,
        cfg.method,
        t.per_device_train_batch_size,
        d.max_source_length,
        d.max_target_length,
        gradient_checkpointing=t.gradient_checkpointing,
        loss_chunk_size=t.loss_chunk_size,
    )
    r.update(
        overrides=overrides,
        method=cfg.method.name,
        batch=t.per_device_train_batch_size,
        source_len=d.max_source_length,
        target_len=d.max_target_length,
        gradient_checkpointing=t.gradient_checkpointing,
        loss_chunk_size=t.loss_chunk_size,
    )
    return r


def run(args) -> dict:
    from memory_trace import nf4_saving_mib

    config = chatglm_config(CHATGLM3_6B, 28)  # ChatGLM2-6B has the same shape
    reference = {
        "lora": f"demo {REFERENCE['chatglm3_demo_lora_mib']:,} MiB",
        "ptuning": f"demo {REFERENCE['chatglm3_demo_ptuning_v2_mib']:,} MiB",
        "qlora": f"LLaMA-Factory {REFERENCE['llama_factory_qlora_gb'] * 1e9 / 2**20:,.0f} MiB",
    }
    results, rows = {}, []
    for name, overrides, in_quick in TRACE_CASES:
        if args.quick and not in_quick:
            continue
        r = results[name] = trace_case(config, overrides)
        peak = f"{r['peak_mib']:,.0f} MiB peak ({r['weights_mib']:,.0f} weights)"
        rows.append((name, peak, reference.get(r["method"], ""), ""))
    checks = {}
    for method in (
        "lora",
        "full",
    ):  # does the count match a real run's memory? (fp32 knob model, bs 4 x 512)
        c = checks[method] = run_worker(
            "trace-check", {"method": method, "batch": 4, "source": 128, "target": 384}
        )
        if "error" not in c:
            counts = (
                f"traced {c['fake_traced_mib']:,.0f} / counted {c['real_traced_mib']:,.0f} / "
                f"RSS {c['rss_peak_over_start_mib']:,.0f} MiB"
            )
            ratio = (
                fmt_ratio(c["rss_peak_over_start_mib"] / c["fake_traced_mib"])
                + " RSS / traced"
            )
            rows.append(
                (
                    f"tracer check, {method} (knob model, fp32, real run)",
                    counts,
                    ratio,
                    "",
                )
            )
    return {
        "tracer_checks": checks,
        "how": "FakeTensorMode + a dispatch-mode byte counter (bench/memory_trace.py): the tensor bytes a CUDA run "
        "would allocate, without CUDA context, workspaces and fragmentation; qlora = the bf16-base trace minus "
        "the nf4 saving on the decoder's linear weights plus bitsandbytes' largest dequantised weight",
        "shape": dict(CHATGLM3_6B, num_hidden_layers=28),
        "reference": REFERENCE,
        "nf4_saving_mib": nf4_saving_mib(config),
        "cases": results,
        "rows": rows,
    }
