"""quantized_memory: the memory of a 4-bit (and 8-bit) base against the same base in bf16 (``model.quantization``).

Two models, each loaded three ways (bf16, ``model.quantization=4bit`` = NF4 with double quantization and bf16
compute, ``8bit`` = LLM.int8) in a fresh process per load (``run.py --worker quantized-memory``):

* **tiny**: the project's pre-trained tiny GLM (``model=tiny``, TinyModelConfig: hidden 128, 4 layers), loaded by
  the project's own loader (``load_model_and_tokenizer`` with ``methods.quantized_base.quantization_config``, the
  path a run takes), ``model.dtype=bfloat16``;
* **chatglm3_layer**: one decoder layer of ChatGLM3-6B's shape (hidden 4096, ffn 13696, 32 heads, 2 kv groups),
  random bf16 weights saved once, vocabulary cut to 1,024 so the decoder's linears (what quantizes) dominate,
  loaded by ``from_pretrained`` with the same ``BitsAndBytesConfig``.

Per load: the **weight bytes**, exact (parameters and buffers, plus bitsandbytes' quantization state: NF4 block
scales and their double-quantized scales, int8 row scales), split into the decoder's linear weights and the rest
(embedding, output head, norms and biases stay bf16); the process RSS growth of the load; and the peak RSS growth
of one P-Tuning v2 training step (pre_seq_len 16, batch 4 x 64 tokens, AdamW) on top of it. The headline is the
bytes ratio (exact arithmetic on what is held, independent of the machine); RSS figures include allocator and
bitsandbytes workspace noise, the tiny model's are within it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from harness import precise_malloc, reset_peak_rss, rss_mib, run_worker, trim_malloc


def rss_parts_mib() -> dict:
    """RssAnon (the process's own memory) and RssFile (mapped file pages: safetensors weights read in place)."""
    import re

    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", text).group(1)) / 1024 for key in ("RssAnon", "RssFile")}

VARIANTS = ("bf16", "4bit", "8bit")
LAYER_VOCAB = 1024


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def weight_bytes(model) -> dict:
    """Exact bytes held by the weights: decoder linears (quantization state included) vs the rest."""
    linears = rest = 0
    seen: set[int] = set()
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = _tensor_bytes(p)
        state = getattr(p, "quant_state", None)
        if state is not None:  # NF4: absmax per 64 weights (double quant: uint8 + its own fp32 scales), code table
            n += sum(_tensor_bytes(v) for v in state.as_dict(packed=True).values())
        scb = getattr(p, "SCB", None)  # LLM.int8: one fp32 scale per output row
        n += _tensor_bytes(scb)
        if ".layers." in name and name.endswith("proj.weight"):
            linears += n
        else:
            rest += n
    return {"decoder_linear_bytes": linears, "other_bytes": rest, "total_bytes": linears + rest}


def _layer_checkpoint() -> Path:
    """One ChatGLM3-6B-shaped layer, random bf16 weights, saved once (temp dir)."""
    from synthetic import CHATGLM3_6B, chatglm_config, random_model

    path = Path(tempfile.gettempdir()) / "bench_quantized_memory_chatglm3_layer"
    if not (path / "done").exists():
        model = random_model(chatglm_config({**CHATGLM3_6B, "vocab_size": LAYER_VOCAB}, 1), torch.bfloat16, "cpu")
        model.save_pretrained(path)
        del model
        (path / "done").write_text("ok\n")
    return path


def worker(spec: dict) -> dict:
    """One (model, variant) load and training step in a fresh process (``run.py --worker quantized-memory``)."""
    precise_malloc()
    from glm_experiments.compose import compose
    from glm_experiments.methods import get_method
    from glm_experiments.models.loading import load_model_and_tokenizer
    from glm_experiments.methods.quantized_base import quantization_config
    from glm_experiments.models.quantization import bnb_config, one_cpu_path

    model_name, variant = spec["model"], spec["variant"]
    quantize = [] if variant == "bf16" else [f"model.quantization={variant}"]
    cfg = compose(["tracking=none", "model.dtype=bfloat16", "method=ptuning", "method.pre_seq_len=16", *quantize])
    path = _layer_checkpoint() if model_name == "chatglm3_layer" else None
    trim_malloc()
    before = rss_parts_mib()
    start = time.perf_counter()
    if model_name == "tiny":
        model, _ = load_model_and_tokenizer(cfg.model, quantization_config(cfg))
    else:
        from transformers import AutoModelForCausalLM

        extra = {} if variant == "bf16" else {"quantization_config": bnb_config(variant), "device_map": "cpu"}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **extra)
        one_cpu_path(model)
    load_seconds = time.perf_counter() - start
    vocab = model.config.vocab_size
    ids = torch.randint(10, vocab, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # every weight read once: a bf16 load maps the file lazily
        model(input_ids=ids[:1, :8])
    trim_malloc()
    loaded = rss_parts_mib()
    out = {"spec": spec, **weight_bytes(model), "load_seconds": load_seconds,
           "anon_growth_after_load_mib": loaded["RssAnon"] - before["RssAnon"],
           "file_growth_after_load_mib": loaded["RssFile"] - before["RssFile"],
           "quantized_layers": sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())}
    loaded_rss = rss_mib()[0]

    model = get_method("ptuning").apply(model, cfg.method)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    reset_peak_rss()
    start = time.perf_counter()
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    optimizer.step()
    out["step_seconds"] = time.perf_counter() - start
    out["step_peak_rss_growth_mib"] = rss_mib()[1] - loaded_rss
    out["loss"] = loss.item()
    return out


def run(args) -> dict:
    results: dict = {}
    for model_name in ("tiny", "chatglm3_layer"):
        for variant in VARIANTS:
            results[f"{model_name}/{variant}"] = run_worker("quantized-memory", {"model": model_name, "variant": variant})
    rows, ratios = [], {}
    mib = 2**20
    for model_name in ("tiny", "chatglm3_layer"):
        base = results[f"{model_name}/bf16"]
        for variant in VARIANTS:
            r = results[f"{model_name}/{variant}"]
            if "error" in r:
                rows.append((f"{model_name} {variant}", r["error"], "", "ERROR"))
                continue
            ratio = r["total_bytes"] / base["total_bytes"]
            linear_ratio = r["decoder_linear_bytes"] / base["decoder_linear_bytes"]
            ratios[f"{model_name}/{variant}"] = {"total": ratio, "decoder_linears": linear_ratio}
            rows.append((
                f"{model_name} {variant}",
                f"weights {r['total_bytes'] / mib:,.2f} MiB (linears {r['decoder_linear_bytes'] / mib:,.2f}); "
                f"loaded: anon +{r['anon_growth_after_load_mib']:,.0f}, file +{r['file_growth_after_load_mib']:,.0f} MiB; "
                f"step peak +{r['step_peak_rss_growth_mib']:,.0f} MiB",
                f"{ratio:.3f}x all, {linear_ratio:.3f}x linears",
                "",
            ))
    return {"results": results, "ratios_vs_bf16": ratios, "rows": rows}
