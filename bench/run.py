"""Performance harness: ``python bench/run.py [--quick] [--only NAME[,NAME...]]``.

Each benchmark measures a *ratio inside one run* (interleaved, paired rounds), so the figures survive a
loaded machine; absolute timings are recorded too but only for context. Results: a rich table on stdout and
``bench/results/<name>.json`` per benchmark (with machine info). See bench/README.md for what each one
measures and the figures recorded on the reference machine.

Benchmarks: padding, overhead, generation, startup, memory, memory_trace, knobs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime as dt
import gc
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))  # bench/memory_trace.py

import torch  # noqa: E402

BENCHMARKS = ("padding", "overhead", "generation", "startup", "memory", "memory_trace", "knobs")

# dense bf16 peak FLOP/s by device name (substring match, first hit wins) - for MFU on CUDA
PEAK_BF16_FLOPS = [
    ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("A10G", 70e12), ("A10", 125e12), ("4090", 165e12),
    ("3090", 71e12), ("V100", 125e12), ("T4", 65e12),
]

# ChatGLM3-6B / ChatGLM2-6B shape (DESIGN.md "Checkpoint layouts")
CHATGLM3_6B = dict(hidden_size=4096, intermediate_size=13696, num_attention_heads=32, num_key_value_heads=2,
                   head_dim=128, vocab_size=65024, num_hidden_layers=28)
REFERENCE = {
    "chatglm3_demo_lora_mib": 14082, "chatglm3_demo_ptuning_v2_mib": 18426,
    "llama_factory_qlora_gb": 5.14, "llama_factory_lora_r32_samples_per_s": 21.67,
}


# =============================================================================== helpers
def machine_info(device: str) -> dict:
    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

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
        "mem_total_gib": round(_meminfo("MemTotal") / 2**20, 1),
        "mem_available_gib": round(_meminfo("MemAvailable") / 2**20, 1),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _meminfo(key: str) -> int:
    """kB from /proc/meminfo (0 where unavailable)."""
    try:
        m = re.search(rf"^{key}:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
        return int(m.group(1)) if m else 0
    except OSError:
        return 0


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


def _cpu_seconds() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x"


def compose(overrides: list[str] | None = None):
    """The run config exactly as ``python -m glm_experiments`` composes it (without Hydra's runtime)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import glm_experiments.config  # noqa: F401  (registers the schema)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides or []))


def tiny_tokenizer():
    from transformers import AutoTokenizer

    from glm_experiments.config import TinyModelConfig
    from glm_experiments.models.tiny import ensure_tiny_checkpoint

    path = ensure_tiny_checkpoint(TinyModelConfig())
    return path, AutoTokenizer.from_pretrained(path)


def random_tiny_model(tokenizer, seed: int = 0):
    from glm_experiments.config import TinyModelConfig
    from glm_experiments.models.tiny import build_model

    torch.manual_seed(seed)
    model = build_model(TinyModelConfig(), tokenizer)
    model.config._attn_implementation = "sdpa"
    return model


def train_step(model, optimizer, batch: dict | list[dict]) -> float:
    """One optimizer step; a list of micro-batches is accumulated first (the seeds' bs 1 x 16 accumulation)."""
    micro = batch if isinstance(batch, list) else [batch]
    total = 0.0
    for b in micro:
        loss = model(**b).loss / len(micro)
        loss.backward()
        total += float(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


# =============================================================================== 1. padding
def adgen_like_lengths(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(source, target) token counts shaped like AdvertiseGen through a ChatGLM tokenizer, template included:
    source 20-60 (attribute strings, ~38 mean), target ~40-130 with a long right tail (log-normal, median 78),
    truncated as the seeds do at max_source_length 64 / max_target_length 128."""
    g = torch.Generator().manual_seed(seed)
    src = (torch.randn(n, generator=g) * 9 + 38).round().clamp(20, 64)
    tgt = torch.exp(torch.randn(n, generator=g) * 0.33 + torch.log(torch.tensor(78.0))).round().clamp(36, 128)
    return [(int(s), int(t)) for s, t in zip(src, tgt)]


def synth_samples(lengths, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for s, t in lengths:
        ids = torch.randint(10, vocab, (s + t,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * s + ids[s:], "length": s + t})
    return out


SEEDS_AS_RUN = "pad_to_max, bs 1 x GA 16 (seeds as run)"


def pad_to_max_collate(features, pad_id: int, max_len: int) -> dict:
    """THUDM ptuning main.py: every sample padded to max_source_length + max_target_length."""
    ids = torch.full((len(features), max_len), pad_id)
    labels = torch.full((len(features), max_len), -100)
    mask = torch.zeros((len(features), max_len), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def packing_works(model, samples, collator_flat, collator_pad) -> tuple[bool, float]:
    """Does a flattened batch (position ids reset per sample, no attention mask) give the padded batch's loss?"""
    model.eval()
    with torch.no_grad():
        a = model(**collator_pad(samples)).loss.item()
        b = model(**collator_flat(samples)).loss.item()
    model.train()
    return abs(a - b) < 1e-4 * max(1.0, abs(a)), abs(a - b)


def bench_padding(args) -> dict:
    from glm_experiments.data.dataset import CausalCollator, PackingCollator
    from glm_experiments.train import EpochSeededLengthGroupedSampler

    _, tok = tiny_tokenizer()
    vocab, pad = len(tok), tok.pad_token_id
    bs, max_len, seed = 16, args.padding_limits[0] + args.padding_limits[1], 42
    n_all = 3000  # the demo set's size: the sampler's megabatches (50 x bs) as in a real epoch
    lengths = adgen_like_lengths(n_all)
    samples = synth_samples(lengths, vocab)
    total_real = sum(s["length"] for s in samples)

    ours = CausalCollator(pad)
    g = torch.Generator().manual_seed(seed)
    random_order = torch.randperm(n_all, generator=g).tolist()
    grouped_order = list(EpochSeededLengthGroupedSampler(bs, [s["length"] for s in samples], seed))
    batches_of = lambda order: [order[i:i + bs] for i in range(0, len(order), bs)]  # noqa: E731
    flat_collate = PackingCollator()  # train.packing=true

    pipelines = {
        "pad_to_max (seeds)": (batches_of(random_order), lambda fs: pad_to_max_collate(fs, pad, max_len)),
        # THUDM's train.sh as the seeds run it: per_device_train_batch_size 1, gradient_accumulation_steps 16
        SEEDS_AS_RUN: (batches_of(random_order), lambda fs: [pad_to_max_collate([f], pad, max_len) for f in fs]),
        "pad_to_batch_max": (batches_of(random_order), ours),
        "ours (dyn. pad + length-grouped)": (batches_of(grouped_order), ours),
    }
    # padding efficiency over the whole epoch (deterministic: no timing involved)
    efficiency = {}
    for name, (batches, collate) in pipelines.items():
        padded = sum((max_len if name.startswith("pad_to_max") or name == SEEDS_AS_RUN else max(samples[i]["length"] for i in b)) * len(b)
                     for b in batches)
        efficiency[name] = total_real / padded

    torch.manual_seed(0)
    model = random_tiny_model(tok)
    ok, diff = packing_works(model, [samples[i] for i in random_order[:4]], flat_collate, ours)
    packing_note = ("transformers detects packed sequences from position_ids (no attention mask, use_cache=False) and builds "
                    f"a block-diagonal mask for SDPA: loss matches the padded batch (|diff| {diff:.1e}); the mask is dense, "
                    "so attention costs (16 x len)^2 per row on CPU/SDPA - flash-attention varlen would not")
    if ok:
        pipelines["packing (flattened, no cross-attn)"] = (batches_of(random_order), flat_collate)
        efficiency["packing (flattened, no cross-attn)"] = 1.0
    else:
        packing_note = f"skipped: flattened batch loss differs from the padded one by {diff:.3g} on this backend"

    # timed: the same randomly chosen batch positions of every pipeline's epoch, rounds interleaved
    n_batches = 4 if args.quick else 16
    rounds = 3 if args.quick else 5
    pick = torch.randperm(len(pipelines["pad_to_max (seeds)"][0]), generator=torch.Generator().manual_seed(1))[:n_batches]
    prepared = {}
    for name, (batches, collate) in pipelines.items():
        chosen = [batches[i] for i in pick.tolist()]
        prepared[name] = ([collate([samples[i] for i in b]) for b in chosen], sum(samples[i]["length"] for b in chosen for i in b))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for batch in prepared["pad_to_max (seeds)"][0][:2]:  # warm-up
        train_step(model, optimizer, batch)
    times = {name: [] for name in prepared}
    for _ in range(rounds):
        for name, (batches, _) in prepared.items():
            start = time.perf_counter()
            for batch in batches:
                train_step(model, optimizer, batch)
            times[name].append(time.perf_counter() - start)
    base = "pad_to_max (seeds)"
    result = {"batch_size": bs, "max_len": max_len, "samples_in_epoch": n_all, "timed_batches": n_batches, "rounds": rounds,
              "mean_sample_len": total_real / n_all, "model": "tiny GlmForCausalLM (TinyModelConfig shape, random weights), full fine-tuning, AdamW",
              "packing": packing_note, "pipelines": {}}
    for name, (_, tokens) in prepared.items():
        paired = [times[base][r] / times[name][r] * tokens / prepared[base][1] for r in range(rounds)]
        paired_bm = [times["pad_to_batch_max"][r] / times[name][r] * tokens / prepared["pad_to_batch_max"][1] for r in range(rounds)]
        result["pipelines"][name] = {
            "padding_efficiency": efficiency[name],
            "effective_tokens_per_s_median": tokens / median(times[name]),
            "speedup_vs_pad_to_max": median(paired),
            "speedup_vs_pad_to_batch_max": median(paired_bm),
            "seconds_per_round": times[name],
        }
    ours_name = "ours (dyn. pad + length-grouped)"
    r = result["pipelines"][ours_name]
    result["upper_bound_vs_pad_to_max"] = max_len / (total_real / n_all)
    result["target"] = ">= 3x effective tokens/s vs pad_to_max"
    result["pass"] = r["speedup_vs_pad_to_max"] >= 3
    rows = [(f"{name}", f"eff {v['padding_efficiency']:.0%}, {v['effective_tokens_per_s_median']:,.0f} tok/s",
             f"{fmt_ratio(v['speedup_vs_pad_to_max'])} vs max / {fmt_ratio(v['speedup_vs_pad_to_batch_max'])} vs batch-max",
             "") for name, v in result["pipelines"].items()]
    rows.append(("ours vs pad_to_max", fmt_ratio(r["speedup_vs_pad_to_max"]),
                 f">= 3x (token bound {result['upper_bound_vs_pad_to_max']:.2f}x)", "PASS" if result["pass"] else "MISS"))
    as_run = median([times[SEEDS_AS_RUN][k] / times[ours_name][k] * prepared[ours_name][1] / prepared[SEEDS_AS_RUN][1]
                     for k in range(rounds)])
    result["ours_vs_seeds_as_run"] = as_run
    rows.append(("ours vs the seeds' bs 1 x GA 16, pad-to-max", fmt_ratio(as_run), "padding + micro-batching", ""))
    result["rows"] = rows
    return result


# =============================================================================== 2. overhead
def bench_overhead(args) -> dict:
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

    from glm_experiments.data.dataset import CausalCollator, load_split
    from glm_experiments.data.templates import get_template
    from glm_experiments.methods import get_method
    from glm_experiments.tracking.mlflow_tracker import Tracker
    from glm_experiments.train import EpochSeededLengthGroupedSampler, GlmTrainer, TrackingCallback, _data_cache_dir, training_arguments

    warm, measured = 3, (15 if args.quick else 40)
    rounds = 3 if args.quick else 4
    cfg = compose(["tracking=none", f"train.max_steps={warm + measured}", "train.save_steps=0"])
    path, tok = tiny_tokenizer()
    template = get_template(cfg.model.template)
    train_set, _, _ = load_split(cfg.data.train_file, tok, template, cfg.data, _data_cache_dir())
    bs = cfg.train.per_device_train_batch_size
    # identical batches for both: the exact order our GlmTrainer's sampler draws, fed sequentially
    order = list(EpochSeededLengthGroupedSampler(bs, train_set["length"], cfg.seed))[: bs * (warm + measured)]
    data = train_set.select(order)
    base = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    method = get_method(cfg.method.name)

    class Clock(TrainerCallback):
        def __init__(self):
            self.stamps = []

        def on_step_end(self, a, state, control, **kw):
            self.stamps.append(time.perf_counter())

    def one(kind: str, tmp: str) -> float:
        torch.manual_seed(0)
        model = method.apply(copy.deepcopy(base), cfg.method)
        targs = training_arguments(cfg, Path(tmp) / kind)
        targs.train_sampling_strategy = "sequential"
        clock = Clock()
        common = dict(model=model, args=targs, train_dataset=data, data_collator=CausalCollator(tok.pad_token_id))
        if kind == "GlmTrainer":
            tracker = Tracker(cfg.tracking, active=True)  # tracking=none: inactive, as in the default bench run
            trainer = GlmTrainer(**common, callbacks=[TrackingCallback(tracker, lambda step: {}, 0), clock], method_cfg=cfg.method)
        else:
            trainer = Trainer(**common, callbacks=[clock])
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
        s = clock.stamps
        return measured / (s[-1] - s[warm - 1])

    sps = {"GlmTrainer": [], "Trainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for kind in (("GlmTrainer", "Trainer") if r % 2 == 0 else ("Trainer", "GlmTrainer")):
                sps[kind].append(one(kind, tmp))
    ratios = [g / t for g, t in zip(sps["GlmTrainer"], sps["Trainer"])]
    ratio = median(ratios)
    result = {"setup": f"default run config (tiny pre-trained, method={cfg.method.name}, bs {bs}, precision {cfg.train.precision}), "
                       f"{measured} timed steps after {warm} warm-up, {rounds} interleaved rounds, same batches (sequential "
                       "over our sampler's order), same CausalCollator; GlmTrainer with its TrackingCallback (tracking=none)",
              "steps_per_s": sps, "paired_ratio_glm_over_bare": ratios, "ratio_median": ratio,
              "target": "GlmTrainer >= 0.90x bare Trainer steps/s", "pass": ratio >= 0.90}
    result["rows"] = [("GlmTrainer / bare Trainer", f"{median(sps['GlmTrainer']):.2f} vs {median(sps['Trainer']):.2f} steps/s",
                       fmt_ratio(ratio), "PASS" if result["pass"] else "MISS")]
    return result


# =============================================================================== 3. generation
def finetuned_default_run() -> Path:
    """The embedded default run (tiny model, LoRA, 300 steps on the demo set), trained once and cached: the
    model whose evaluation the framework really batches. ~1 min of CPU the first time."""
    from glm_experiments.constants import cache_root

    # keyed on the files that define the default run, so a changed default retrains
    files = ["train.yaml", "model/tiny.yaml", "method/lora.yaml", "data/adgen_demo.yaml"]
    key = hashlib.sha256(b"".join((ROOT / "conf" / f).read_bytes() for f in files)).hexdigest()[:12]
    run_dir = cache_root() / "bench" / f"default_run-{key}"
    if not (run_dir / "result.json").exists():
        cmd = [sys.executable, "-m", "glm_experiments", "tracking=none", "eval.before_training=false",
               "eval.max_samples=8", "train.save_steps=0", f"hydra.run.dir={run_dir}"]
        _, proc = timed_cmd(cmd)
        if proc.returncode:
            raise RuntimeError(f"training the default run for the generation benchmark failed:\n{proc.stderr[-3000:]}")
    return run_dir


def paired_generation(model, tok, template, prompts, eval_cfg) -> dict:
    """Batch 16 vs batch 1 over the same prompts, paired per chunk of 16 with the order alternating (robust to
    load); predictions compared."""
    from omegaconf import OmegaConf

    from glm_experiments.evaluation import generate

    batched_cfg = OmegaConf.merge(eval_cfg, {"batch_size": 16})
    single_cfg = OmegaConf.merge(eval_cfg, {"batch_size": 1})
    generate(model, tok, template, prompts[:2], batched_cfg, show_progress=False)  # warm-up
    t_b, t_s, out_b, out_s, pairs = 0.0, 0.0, [], [], []
    for k in range(0, len(prompts), 16):
        chunk = prompts[k:k + 16]
        runs = [("b", batched_cfg), ("s", single_cfg)] if k % 32 == 0 else [("s", single_cfg), ("b", batched_cfg)]
        took = {}
        for kind, ecfg in runs:
            start = time.perf_counter()
            out = generate(model, tok, template, chunk, ecfg, show_progress=False)
            took[kind] = time.perf_counter() - start
            (out_b if kind == "b" else out_s).extend(out)
        t_b, t_s = t_b + took["b"], t_s + took["s"]
        pairs.append(took["s"] / took["b"])
    reply_tokens = [len(tok(r, add_special_tokens=False)["input_ids"]) for r in out_s]
    mism = [i for i, (a, b) in enumerate(zip(out_b, out_s)) if a != b]
    return {"prompts": len(prompts), "seconds_batched": t_b, "seconds_one_at_a_time": t_s, "speedup": t_s / t_b,
            "speedup_per_chunk": pairs, "identical_predictions": not mism, "mismatched_indices": mism,
            "samples_per_s_batched": len(prompts) / t_b, "samples_per_s_single": len(prompts) / t_s,
            "mean_reply_tokens": sum(reply_tokens) / max(len(reply_tokens), 1),
            "replies_at_max_new_tokens": sum(n >= eval_cfg.max_new_tokens for n in reply_tokens)}


def bench_generation(args) -> dict:
    from transformers import AutoModelForCausalLM

    from glm_experiments.data.dataset import eval_prompts
    from glm_experiments.data.formats import load_samples, resolve_data_path
    from glm_experiments.data.templates import get_template
    from glm_experiments.run_loading import load_run

    n = 32 if args.quick else 64
    cfg = compose(["tracking=none"])  # the default run's eval settings: greedy, max_new_tokens 64
    path, tok = tiny_tokenizer()
    template = get_template(cfg.model.template)
    samples, _ = load_samples(resolve_data_path(cfg.data.dev_file), cfg.data)
    prompts, _, _ = eval_prompts(samples[:n], tok, template, cfg.data)

    finetuned = load_run(finetuned_default_run(), device="cpu")
    tuned = paired_generation(finetuned.model, finetuned.tokenizer, finetuned.template, prompts, cfg.eval)
    # the pre-trained base, for contrast: it often stops after 1-2 tokens, so a batch runs as long as its longest
    # reply while single prompts stop early
    base = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    as_is = paired_generation(base, tok, template, prompts, cfg.eval)
    result = {"max_new_tokens": cfg.eval.max_new_tokens, "batch_size": 16,
              "models": {"fine_tuned": "the default run (tiny + LoRA r8, 300 steps), PEFT adapter unmerged, as evaluated in training",
                         "base": "pre-trained tiny checkpoint (ensure_tiny_checkpoint), no fine-tuning"},
              "prompt_source": "data/adgen_demo/dev.json through the chatglm3 template (eval_prompts)",
              "fine_tuned": tuned, "base": as_is, "speedup": tuned["speedup"],
              "target": ">= 5x with identical predictions",
              "pass": tuned["speedup"] >= 5 and tuned["identical_predictions"] and as_is["identical_predictions"]}

    def row(name, r):
        return (name, f"{r['samples_per_s_batched']:.1f} vs {r['samples_per_s_single']:.1f} samples/s, "
                f"{r['mean_reply_tokens']:.0f} tokens/reply", fmt_ratio(r["speedup"]), "PASS" if r["speedup"] >= 5 else "MISS")

    result["rows"] = [
        row("batched (16) vs one at a time, fine-tuned (default run)", tuned),
        row("  same, untrained base (replies stop early)", as_is),
        ("identical predictions", f"{n - len(tuned['mismatched_indices'])}/{n}, {n - len(as_is['mismatched_indices'])}/{n}",
         "all", "PASS" if tuned["identical_predictions"] and as_is["identical_predictions"] else "FAIL")]
    return result


# =============================================================================== 4. startup
PROBE = """
import os, sys, time, runpy, json
import transformers
_orig = transformers.Trainer.training_step
def _probe(self, *a, **k):
    if not getattr(self, "_bench_seen", False):  # one line per Trainer: per job of a sweep
        import resource
        self._bench_seen = True
        ru = resource.getrusage(resource.RUSAGE_SELF)
        with open(os.environ["BENCH_FIRST_STEP_FILE"], "a") as f:
            f.write(json.dumps({"first_step_at": time.time(), "cpu_seconds": ru.ru_utime + ru.ru_stime}) + "\\n")
    return _orig(self, *a, **k)
transformers.Trainer.training_step = _probe
sys.argv = ["glm_experiments", *sys.argv[1:]]
runpy.run_module("glm_experiments", run_name="__main__", alter_sys=True)
"""


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def timed_cmd(cmd: list[str], env=None, cwd=ROOT) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True)
    return time.perf_counter() - start, proc


def cpu_cmd(cmd: list[str]) -> tuple[float, float]:
    """(wall, CPU seconds) of a subprocess; CPU time barely moves with machine load."""
    before = _cpu_children()
    wall, proc = timed_cmd(cmd)
    return wall, _cpu_children() - before


def _cpu_children() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def bench_startup(args) -> dict:
    reps = 1 if args.quick else 2
    py = sys.executable
    import_t = [cpu_cmd([py, "-c", "import glm_experiments.train"]) for _ in range(reps + 1)]
    torch_t = [cpu_cmd([py, "-c", "import torch"]) for _ in range(reps)]
    bare_t = [cpu_cmd([py, "-c", "pass"]) for _ in range(reps)]
    runs = []
    overrides = ["train.max_steps=1", "eval.before_training=false", "tracking=none"]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(reps):
            out_dir = Path(tmp) / f"run{r}"
            first = Path(tmp) / f"first{r}.json"
            env = {**_env(), "BENCH_FIRST_STEP_FILE": str(first)}
            t0 = time.time()
            cpu0 = _cpu_children()
            wall, proc = timed_cmd([py, "-c", PROBE, *overrides, f"hydra.run.dir={out_dir}"], env=env)
            cpu = _cpu_children() - cpu0
            if proc.returncode != 0:
                raise RuntimeError(f"default run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
            result_json = json.loads((out_dir / "result.json").read_text())
            probe = json.loads(first.read_text().splitlines()[0])
            runs.append({"wall_seconds": wall, "cpu_seconds": cpu, "cpu_seconds_to_first_step": probe["cpu_seconds"],
                         "command_to_first_step_seconds": probe["first_step_at"] - t0,
                         "startup_seconds_logged": result_json["train"]["startup_seconds"],
                         "train_seconds_logged": result_json["train"]["train_seconds"]})
        # a 2-job sweep: Hydra's basic launcher runs the jobs in one process, so only the first pays the imports
        first = Path(tmp) / "sweep_first_steps.jsonl"
        t0 = time.time()
        _, proc = timed_cmd([py, "-c", PROBE, "--multirun", "seed=1,2", "train.max_steps=1", "train.save_steps=0",
                             "eval.before_training=false", "data.dev_file=null", "tracking=none",
                             f"hydra.sweep.dir={tmp}/sweep"], env={**_env(), "BENCH_FIRST_STEP_FILE": str(first)})
        if proc.returncode != 0:
            raise RuntimeError(f"2-job sweep failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        steps = [json.loads(line) for line in first.read_text().splitlines()]
        sweep = {"command": "python -m glm_experiments --multirun seed=1,2 train.max_steps=1 data.dev_file=null ...",
                 "job1_first_step_seconds": steps[0]["first_step_at"] - t0,
                 "job2_first_step_after_job1_seconds": steps[1]["first_step_at"] - steps[0]["first_step_at"],
                 "note": "job 2's figure includes job 1's single step and its save"}
    top = []
    if not args.quick:
        _, proc = timed_cmd([py, "-X", "importtime", "-c", "import glm_experiments.train"])
        cum = {}
        for line in proc.stderr.splitlines():
            m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
            if m and len(m.group(2)) <= 1:  # top-level imports only
                cum[m.group(3)] = cum.get(m.group(3), 0) + int(m.group(1)) / 1e6
        top = sorted(cum.items(), key=lambda kv: -kv[1])[:8]
    best = min(runs, key=lambda r: r["wall_seconds"])
    imp_wall = min(w for w, _ in import_t[1:])
    imp = min(c for _, c in import_t[1:])  # CPU seconds (the first run warms the page cache)
    result = {"command": "python -m glm_experiments " + " ".join(overrides) + " hydra.run.dir=<tmp> (through a probe that "
                         "records the first Trainer.training_step call, then runs the module as __main__)",
              "runs": runs, "import_glm_experiments_train_seconds": import_t, "import_torch_seconds": torch_t,
              "python_bare_seconds": bare_t, "top_level_import_seconds": top,
              "note": "warm caches: tiny checkpoint and tokenized data already built (first ever run pre-trains the tiny model)",
              "sweep": sweep,
              "import_share_of_first_step_cpu": imp / best["cpu_seconds_to_first_step"]}
    result["rows"] = [
        ("command -> first training step", f"{best['command_to_first_step_seconds']:.1f} s wall",
         f"{best['cpu_seconds_to_first_step']:.1f} s CPU", ""),
        ("  import glm_experiments.train", f"{imp_wall:.1f} s wall, {imp:.1f} s CPU",
         f"{result['import_share_of_first_step_cpu']:.0%} of first-step CPU (torch alone {min(c for _, c in torch_t):.1f} s CPU)", ""),
        ("perf/startup_seconds (model+method+data)", f"{best['startup_seconds_logged']:.2f} s", "", ""),
        ("whole subprocess (1 step + final eval)", f"{best['wall_seconds']:.1f} s wall", f"{best['cpu_seconds']:.1f} s CPU", ""),
        ("2-job sweep: job 1 / job 2 to first step", f"{sweep['job1_first_step_seconds']:.1f} s / "
         f"{sweep['job2_first_step_after_job1_seconds']:.1f} s after job 1's", "imports paid once per sweep", ""),
    ]
    return result


# =============================================================================== 5. memory
METHOD_OVERRIDES = {
    "lora": ["method=lora", "method.r=8"],
    "lora_r32": ["method=lora", "method.r=32"],
    "ptuning": ["method=ptuning", "method.pre_seq_len=128"],
    "prompt_tuning": ["method=prompt_tuning"],
    "freeze": ["method=freeze", "method.num_last_layers=2"],
    "full": ["method=full"],
    "qlora": ["method=qlora", "method.r=8"],
}


def chatglm3_config(num_layers: int, attn: str = "sdpa"):
    from transformers import GlmConfig

    shape = dict(CHATGLM3_6B, num_hidden_layers=num_layers)
    cfg = GlmConfig(**shape, max_position_embeddings=8192, rms_norm_eps=1e-5, attention_bias=True, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = attn
    return cfg


def build_shaped_model(num_layers: int, dtype, device: str):
    from transformers import GlmForCausalLM
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    config = chatglm3_config(num_layers)
    torch.manual_seed(0)
    with torch.device("meta"):  # no fp32 init pass over 6B-wide matrices
        model = GlmForCausalLM(config).to(dtype)
    model = model.to_empty(device=device)
    with torch.no_grad():  # touch every page: untouched empty memory would not show in RSS
        for name, p in model.named_parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0 if "norm" in name else 0.0)
    model.model.rotary_emb = GlmRotaryEmbedding(config=config).to(device)  # inv_freq buffer (meta -> real), fp32
    return model


def memory_worker(spec: dict) -> dict:
    """One (method, layers) training measurement in a fresh process; prints one JSON line."""
    precise_malloc()
    from transformers import Trainer, TrainingArguments

    from glm_experiments.losses import chunked_loss
    from glm_experiments.methods import get_method, trainable_summary

    device = spec["device"]
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec["dtype"]]
    name = spec["method"]
    cfg = compose(["tracking=none", *METHOD_OVERRIDES[name]])
    method_cfg = cfg.method
    if name == "freeze":
        method_cfg.num_last_layers = min(2, spec["layers"])
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
    if name == "qlora":
        model = _quantized_shaped_model(spec, method, method_cfg)
    else:
        model = build_shaped_model(spec["layers"], dtype, device)
    out["rss_after_model_mib"] = rss_mib()[0]
    if spec.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = method.apply(model, method_cfg, tokenizer=None) if name == "prompt_tuning" else method.apply(model, method_cfg)
    if spec.get("gradient_checkpointing") and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    model.train()
    chunk = spec.get("loss_chunk_size", 0)
    summary = trainable_summary(model)
    out["trainable_params"], out["total_params"] = summary["trainable"], summary["total"]
    targs = TrainingArguments(str(Path(tempfile.gettempdir()) / "bench_mem"), report_to="none", use_cpu=device == "cpu",
                              learning_rate=1e-4)
    opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(targs)
    if device == "cpu":
        opt_kwargs.pop("fused", None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = opt_cls(trainable, **opt_kwargs)
    out["optimizer"] = f"{opt_cls.__name__}({', '.join(f'{k}={v}' for k, v in opt_kwargs.items() if k != 'lr')})"
    g = torch.Generator().manual_seed(0)
    bs, seq = spec["batch"], spec["seq"]
    ids = torch.randint(10, 60000, (bs, seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : seq // 3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    autocast = torch.autocast(device, dtype=torch.bfloat16) if dtype == torch.bfloat16 else torch.autocast(device, enabled=False)
    trim_malloc()
    reset_peak_rss()
    step_times = []
    for step in range(spec["steps"]):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast, (chunked_loss(model, chunk) if chunk else contextlib.nullcontext()):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
    out["loss"] = float(loss)
    out["peak_rss_mib"] = rss_mib()[1]
    out["step_seconds"] = step_times
    # static bytes, split into the per-layer part (scales with depth) and the rest
    layer_re = re.compile(r"\.layers\.(\d+)\.|prefix_encoder")  # the P-Tuning v2 prefix scales with depth too
    static = {"layer": 0, "other": 0}
    state_of = {id(p): s for p, s in optimizer.state.items()}
    for pname, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if p.requires_grad:
            nbytes += p.numel() * p.element_size()  # gradient, same dtype
            nbytes += sum(t.numel() * t.element_size() for t in state_of.get(id(p), {}).values()
                          if torch.is_tensor(t) and t.dim() > 0)
        static["layer" if layer_re.search(pname) else "other"] += nbytes
    out["static_bytes"] = static
    if device == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        timed = step_times[spec.get("warmup", 1):] or step_times
        out["samples_per_s"] = bs / median(timed)
        out["tokens_per_s"] = bs * seq / median(timed)
        name_gpu = torch.cuda.get_device_name(0)
        peak = next((f for k, f in PEAK_BF16_FLOPS if k in name_gpu), None)
        out["peak_flops"] = peak
        out["mfu"] = 6 * summary["total"] * out["tokens_per_s"] / peak if peak else None
    return out


def _quantized_shaped_model(spec, method, method_cfg):
    """QLoRA needs weights loaded through from_pretrained with a quantization config: save a random bf16
    model of the shape once, then load it quantized (CUDA + bitsandbytes only; not exercised on CPU)."""
    from transformers import AutoModelForCausalLM

    cache = Path(tempfile.gettempdir()) / f"bench_chatglm3_shape_{spec['layers']}l"
    if not (cache / "config.json").exists():
        build_shaped_model(spec["layers"], torch.bfloat16, "cpu").save_pretrained(cache)
    return AutoModelForCausalLM.from_pretrained(cache, quantization_config=method.quantization_config(method_cfg),
                                                dtype=torch.bfloat16, device_map={"": 0})


def run_worker(kind: str, spec: dict, timeout: int = 1800) -> dict:
    cmd = [sys.executable, str(BENCH / "run.py"), "--worker", kind, "--spec", json.dumps(spec),
           "--threads", str(torch.get_num_threads())]
    try:
        wall, proc = timed_cmd(cmd)
    except subprocess.TimeoutExpired:
        return {"spec": spec, "error": "timeout"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines()
        oom = proc.returncode in (-9, 137) or any("out of memory" in ln.lower() for ln in err[-5:])
        return {"spec": spec, "error": ("OOM: " if oom else "") + (err[-1] if err else f"rc {proc.returncode}")}
    return {**json.loads(lines[-1]), "worker_wall_seconds": wall}


def bench_memory(args) -> dict:
    device = args.device
    methods = ["lora", "ptuning", "prompt_tuning", "freeze", "full"]
    if device == "cuda":
        layers_list, seq, batch, steps, dtype = [28], 1024, 4, 6, "bfloat16"
        methods = ["lora", "lora_r32", "ptuning", "prompt_tuning", "freeze", "full", "qlora"]
    else:
        layers_list = [1] if args.quick else [1, 2]
        if args.quick:  # each method costs ~3 CPU minutes here: the two ends of the range
            methods = ["lora", "full"]
        # CPU without AVX512-BF16 runs bf16 matmuls ~4x slower than fp32: keep the token count tiny
        seq, batch, steps, dtype = (8 if args.quick else 64), 1, 2, "bfloat16"
    needed_gib = {"full": 6.5 if 2 not in layers_list else 8.0}
    results = {}
    for name in methods:
        for layers in layers_list:
            key = f"{name}@{layers}L"
            if device == "cpu" and _meminfo("MemAvailable") / 2**20 < needed_gib.get(name, 4.5) * 1.2:
                results[key] = {"skipped": f"only {_meminfo('MemAvailable') / 2**20:.1f} GiB available"}
                continue
            spec = {"method": name, "layers": layers, "seq": seq, "batch": batch, "steps": steps, "dtype": dtype,
                    "device": device, "warmup": 2}
            results[key] = run_worker("memory", spec)
    if device == "cuda":  # the seeds' settings, plain and with the memory options (memory_trace predicts both)
        for name, batch_, seq_ in (("lora", 4, 768), ("ptuning", 4, 768), ("qlora", 1, 1024)):
            for ckpt, chunk in ((False, 0), (True, 256)):
                spec = {"method": name, "layers": 28, "seq": seq_, "batch": batch_, "steps": steps, "dtype": dtype,
                        "device": device, "warmup": 2, "gradient_checkpointing": ckpt, "loss_chunk_size": chunk}
                results[f"{name}@28L bs{batch_}x{seq_}" + (" +ckpt +chunk256" if ckpt else "")] = run_worker("memory", spec)
    if device == "cpu":
        results["qlora"] = {"skipped": "QLoRA needs CUDA + bitsandbytes (4-bit kernels); not measurable on CPU"}
    est = estimate_28_layers(results, layers_list, seq * batch)
    out = {"device": device, "dtype": dtype, "seq": seq, "batch": batch, "layers_measured": layers_list,
           "shape": CHATGLM3_6B, "measured": results, "estimate_28_layers": est, "reference": REFERENCE}
    rows = []
    for key, r in results.items():
        if "skipped" in r or "error" in r:
            rows.append((f"{key}", r.get("skipped") or r.get("error"), "", "SKIP" if "skipped" in r else "ERROR"))
            continue
        if device == "cuda":
            rows.append((f"{key} (measured, CUDA)", f"{r['cuda_max_allocated_mib']:,.0f} MiB max allocated",
                         f"{r['samples_per_s']:.2f} samples/s, MFU {r['mfu']:.1%}" if r.get("mfu") else f"{r['samples_per_s']:.2f} samples/s", ""))
        else:
            rows.append((f"{key} (measured, CPU RSS)", f"peak {r['peak_rss_mib']:,.0f} MiB (model {r['rss_after_model_mib'] - r['rss_after_imports_mib']:,.0f})",
                         f"trainable {r['trainable_params']:,}", ""))
    for name, e in est.items():
        ref = {"lora": f"demo {REFERENCE['chatglm3_demo_lora_mib']:,} MiB", "ptuning": f"demo {REFERENCE['chatglm3_demo_ptuning_v2_mib']:,} MiB"}.get(name, "")
        # the activation term is unreliable from a few CPU tokens (fixed transients dominate): JSON only
        rows.append((f"{name} 28L (ESTIMATE)", f"{e['static_mib']:,.0f} MiB weights+grads+optimizer", ref, ""))
    if device == "cpu":
        rows.append(("qlora 28L (ESTIMATE)", f"{est_qlora_mib():,.0f} MiB static (4-bit layers, bf16 embed/head)",
                     f"LLaMA-Factory {REFERENCE['llama_factory_qlora_gb']} GB", ""))
    out["qlora_static_estimate_mib"] = est_qlora_mib()
    out["rows"] = rows
    return out


def est_qlora_mib() -> float:
    """4-bit nf4 linear weights, bf16 embedding and output head (not quantized), LoRA r8 on q/k/v/o in fp32 with
    grads + Adam (16 B/param)."""
    from memory_trace import NF4_BYTES_PER_PARAM, decoder_linear_params

    h, v, L = 4096, 65024, 28
    kv = 2 * 128
    lora = 8 * ((h + h) + (h + kv) * 2 + (h + h))
    return (decoder_linear_params(chatglm3_config(L)) * NF4_BYTES_PER_PARAM + 2 * v * h * 2
            + L * (2 * h * 2 + (h + 2 * kv) * 2) + L * lora * 16) / 2**20


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
        if name == "freeze":  # trains the last 2 of 28 layers: frozen layers cost weights only
            frozen_layer = 4096 * (4096 + 512) + 4096 + 512 + 4096 * 4096 + 4096 * 2 * 13696 + 13696 * 4096 + 2 * 4096
            static = r["static_bytes"]["other"] + 26 * frozen_layer * 2 + 2 * per_layer  # measured layers are trained
        else:
            static = r["static_bytes"]["other"] + 28 * per_layer
        static_measured = r["static_bytes"]["other"] + r["static_bytes"]["layer"]
        transient = max(r["peak_rss_mib"] - r["rss_after_imports_mib"] - static_measured / 2**20, 0)
        act_per_layer_token = transient / (L + 1) / tokens  # +1: embedding/head/loss as one more "layer"
        est[name] = {"static_mib": static / 2**20, "activation_mib_per_1k_tokens": act_per_layer_token * 29 * 1000,
                     "basis": f"measured at {L} layer(s), {tokens} tokens, bf16 weights; per-layer static x 28"}
    return est


# =============================================================================== 5b. memory traced at 28 layers
# (name, overrides of the real config, in --quick): method, batch, lengths, gradient checkpointing and loss chunk
# all come from the composed config, so the "+ both" rows are exactly the conf/experiment/*_lowmem.yaml runs
_OFF = ["train.gradient_checkpointing=false", "train.loss_chunk_size=0"]
_LORA, _PT, _QLORA = "experiment=chatglm3_lora_lowmem", "experiment=chatglm3_ptuning_lowmem", "experiment=chatglm2_qlora_lowmem"
_DEMO = ["model=chatglm3", "data=adgen", "data.max_source_length=256", "data.max_target_length=512",
         "train.per_device_train_batch_size=4"]
TRACE_CASES = [
    ("lora r8, bs 4, 256+512 (every sample at max length)", [_LORA, *_OFF], True),
    ("  + gradient checkpointing", [_LORA, "train.loss_chunk_size=0"], True),
    ("  + chunked CE (train.loss_chunk_size=256)", [_LORA, "train.gradient_checkpointing=false"], True),
    ("  + both = experiment=chatglm3_lora_lowmem", [_LORA], True),
    ("lora r8, bs 4, AdvertiseGen-typical batch max 48+112", [_LORA, *_OFF, "data.max_source_length=48",
                                                               "data.max_target_length=112"], False),
    ("  + gradient checkpointing", [_LORA, "train.loss_chunk_size=0", "data.max_source_length=48",
                                    "data.max_target_length=112"], False),
    ("ptuning v2 pre_seq_len 128, bs 4, 256+512", [_PT, *_OFF], True),
    ("  + both = experiment=chatglm3_ptuning_lowmem", [_PT], True),
    ("prompt tuning 16 tokens, bs 4, 256+512", [*_DEMO, *_OFF, "method=prompt_tuning"], False),
    ("freeze (last 2 layers), bs 4, 256+512", [*_DEMO, *_OFF, "method=freeze"], False),
    ("full, bs 4, 256+512, checkpointing + chunked CE", [*_DEMO, "method=full", "train.gradient_checkpointing=true",
                                                          "train.loss_chunk_size=256"], False),
    ("qlora r8 nf4, bs 1, 512+512", [_QLORA, *_OFF], True),
    ("  + both = experiment=chatglm2_qlora_lowmem", [_QLORA], True),
]


def trace_check_worker(spec: dict) -> dict:
    """The tracer against reality, in a fresh process: the same two fp32 training steps of the knob model traced
    on fake tensors, counted on real ones, and measured as peak RSS (glibc returning large frees at once)."""
    precise_malloc()
    from memory_trace import trace_training_step, training_steps

    method_cfg = compose([f"method={spec['method']}"]).method
    shape = (spec["batch"], spec["source"], spec["target"])
    fake = trace_training_step(knob_config(), method_cfg, *shape, dtype=torch.float32)
    trim_malloc()
    start = rss_mib()[0]
    reset_peak_rss()
    real = training_steps(knob_config(), method_cfg, *shape, dtype=torch.float32)
    return {"fake_traced_mib": fake["peak_mib"], "real_traced_mib": real["peak_mib"],
            "rss_peak_over_start_mib": rss_mib()[1] - start}


def bench_memory_trace(args) -> dict:
    from memory_trace import dequant_transient_mib, nf4_saving_mib, trace_training_step
    from omegaconf import OmegaConf

    config = chatglm3_config(28)  # ChatGLM2-6B has the same shape
    nf4, dequant = nf4_saving_mib(config), dequant_transient_mib(config)
    results, rows = {}, []
    for name, overrides, in_quick in TRACE_CASES:
        if args.quick and not in_quick:
            continue
        cfg = compose(overrides)
        method_cfg, t, d = cfg.method, cfg.train, cfg.data
        qlora = method_cfg.name == "qlora"
        if qlora:  # bitsandbytes needs CUDA: trace LoRA on the bf16 base, count the 4-bit weights by arithmetic
            method_cfg = OmegaConf.merge(method_cfg, {"name": "lora"})
        r = trace_training_step(config, method_cfg, t.per_device_train_batch_size, d.max_source_length, d.max_target_length,
                                gradient_checkpointing=t.gradient_checkpointing, loss_chunk_size=t.loss_chunk_size)
        r.update(overrides=overrides, method=cfg.method.name, batch=t.per_device_train_batch_size,
                 source_len=d.max_source_length, target_len=d.max_target_length,
                 gradient_checkpointing=t.gradient_checkpointing, loss_chunk_size=t.loss_chunk_size)
        if qlora:
            r["peak_mib"] += dequant - nf4
            r["weights_mib"] -= nf4
            r["nf4_saving_mib"], r["dequant_transient_mib"] = nf4, dequant
        results[name] = r
        ref = {"lora": f"demo {REFERENCE['chatglm3_demo_lora_mib']:,} MiB",
               "ptuning": f"demo {REFERENCE['chatglm3_demo_ptuning_v2_mib']:,} MiB",
               "qlora": f"LLaMA-Factory {REFERENCE['llama_factory_qlora_gb'] * 1e9 / 2**20:,.0f} MiB"}.get(r["method"], "")
        rows.append((name, f"{r['peak_mib']:,.0f} MiB peak ({r['weights_mib']:,.0f} weights)", ref, ""))
    checks = {}
    for method in ("lora", "full"):  # does the count match a real run's memory? (fp32 knob model, bs 4 x 512)
        c = checks[method] = run_worker("trace-check", {"method": method, "batch": 4, "source": 128, "target": 384})
        if "error" not in c:
            rows.append((f"tracer check, {method} (knob model, fp32, real run)",
                         f"traced {c['fake_traced_mib']:,.0f} / counted {c['real_traced_mib']:,.0f} / RSS {c['rss_peak_over_start_mib']:,.0f} MiB",
                         fmt_ratio(c["rss_peak_over_start_mib"] / c["fake_traced_mib"]) + " RSS / traced", ""))
    return {"tracer_checks": checks, "how": "FakeTensorMode + a dispatch-mode byte counter (bench/memory_trace.py): the tensor bytes a CUDA run "
                   "would allocate, without CUDA context, workspaces and fragmentation; qlora = the bf16-base trace minus "
                   "the nf4 saving on the decoder's linear weights plus bitsandbytes' largest dequantised weight",
            "shape": CHATGLM3_6B, "reference": REFERENCE, "nf4_saving_mib": nf4, "cases": results, "rows": rows}


# =============================================================================== 6. knobs
def knob_model(seed: int = 0):
    from transformers import GlmForCausalLM

    torch.manual_seed(seed)
    return GlmForCausalLM(knob_config())


def knob_config():
    from transformers import GlmConfig

    cfg = GlmConfig(vocab_size=65024, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, attention_bias=True,
                    tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                "partial_rotary_factor": 0.5}, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    return cfg


KNOBS = ("baseline", "grad_checkpointing", "eager_attention", "bf16_autocast", "chunked_ce")


def knob_step(model, batch, knob: str) -> float:
    """Forward + backward with one knob changed from the baseline (fp32, SDPA, full logits, no checkpointing)."""
    from glm_experiments.losses import chunked_loss

    if knob == "grad_checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if knob == "eager_attention":
        model.set_attn_implementation("eager")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=knob == "bf16_autocast"):
            if knob == "chunked_ce":  # what train.loss_chunk_size=512 does inside GlmTrainer.compute_loss
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


def knob_batch(bs: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 65000, (bs, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 3] = -100  # prompt part unsupervised, as in SFT
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def knobs_mem_worker(spec: dict) -> dict:
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


def bench_knobs(args) -> dict:
    bs, seq = (1, 192) if args.quick else (4, 512)
    rounds = 2 if args.quick else 5
    knobs = KNOBS
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if args.quick and args.device == "cpu" and not native_bf16:
        knobs = tuple(k for k in KNOBS if k != "bf16_autocast")  # emulated bf16: most of the --quick time, known 0.01x
    model = knob_model()
    model.train()
    batch = knob_batch(bs, seq)
    losses = {k: knob_step(model, batch, k) for k in knobs}  # warm-up + equality check
    times = {k: [] for k in knobs}
    for r in range(rounds):
        order = knobs if r % 2 == 0 else tuple(reversed(knobs))
        for knob in order:
            start = time.perf_counter()
            knob_step(model, batch, knob)
            times[knob].append(time.perf_counter() - start)
    mem = run_worker("knobs-mem", {"batch": bs, "seq": seq})
    base_mem = mem.get("baseline", {}).get("peak_over_resting_mib")
    res = {"model": "GlmForCausalLM hidden 256, 4 layers, 8 heads / 2 kv, vocab 65,024 (ChatGLM's), full fine-tuning, random weights",
           "batch": bs, "seq": seq, "rounds": rounds, "step": "forward + backward (optimizer step excluded: identical for every knob)",
           "cpu_native_bf16": native_bf16,
           "memory_method": "separate process, glibc mmap threshold 64 KiB, VmHWM reset before each step: peak RSS over the resting "
                            "RSS (weights + optimizer-free state) = activations + gradients + logits of one step",
           "knobs": {}}
    for knob in knobs:
        paired = [times["baseline"][r] / times[knob][r] for r in range(rounds)]
        m = mem.get(knob, {}).get("peak_over_resting_mib")
        res["knobs"][knob] = {"speed_vs_baseline": median(paired), "seconds": times[knob], "loss": losses[knob],
                              "step_peak_mib": m, "memory_vs_baseline": (m / base_mem) if (m and base_mem) else None}
    res["chunked_ce_loss_matches"] = abs(losses["chunked_ce"] - losses["baseline"]) < 1e-4
    if "error" in mem:
        res["memory_error"] = mem["error"]
    rows = []
    for knob, v in res["knobs"].items():
        mem_s = f"{v['step_peak_mib']:,.0f} MiB" if v["step_peak_mib"] is not None else "n/a"
        rel = f" ({v['memory_vs_baseline']:.2f}x mem)" if v["memory_vs_baseline"] else ""
        rows.append((knob, f"step peak {mem_s}{rel}", f"speed {fmt_ratio(v['speed_vs_baseline'])} of baseline", ""))
    res["rows"] = rows
    return res


# =============================================================================== main
RUNNERS = {"padding": bench_padding, "overhead": bench_overhead, "generation": bench_generation,
           "startup": bench_startup, "memory": bench_memory, "memory_trace": bench_memory_trace, "knobs": bench_knobs}


def write_result(name: str, machine: dict, args, result: dict, seconds: float) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "quick": args.quick, "machine": machine, "bench_seconds": seconds,
               "load_average_after": os.getloadavg(), **result}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (~9 min on an idle 2-core CPU, ~5.5 min without memory)")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)),
                   help="torch intra-op threads (default 1 / $OMP_NUM_THREADS: the machine is shared)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--padding-limits", type=int, nargs=2, default=[64, 128], metavar=("SRC", "TGT"),
                   help="max_source_length max_target_length the seed-style pipeline pads to (THUDM ADGEN: 64 128; "
                        "the seeds' length ablation: 512 128 / 1024 256)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        import logging

        logging.disable(logging.WARNING)
        fn = {"memory": memory_worker, "knobs-mem": knobs_mem_worker, "trace-check": trace_check_worker}[args.worker]
        print(json.dumps(fn(json.loads(args.spec)), default=str))
        return 0
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")

    import logging
    import warnings

    import transformers
    from rich.console import Console
    from rich.table import Table

    transformers.logging.set_verbosity_error()
    logging.getLogger("glm_experiments").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    console = Console()
    machine = machine_info(args.device)
    console.print(f"[bold]bench[/bold] {'--quick ' if args.quick else ''}on {machine['cpu_count']} CPU(s) "
                  f"({machine['cpu_model']}), torch {machine['torch']} ({args.threads} thread(s)), device {args.device}, "
                  f"load {machine['load_average'][0]:.1f}")
    table = Table("benchmark", "measure", "value", "ratio / target", "status", title="glm_experiments performance")
    failed = False
    for name in names:
        console.print(f"running {name} ...")
        start, cpu0 = time.perf_counter(), _cpu_seconds()
        try:
            result = RUNNERS[name](args)
        except Exception as exc:  # noqa: BLE001  (one broken benchmark should not hide the others)
            import traceback

            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}", "rows": [("error", f"{type(exc).__name__}: {exc}", "", "ERROR")]}
            failed = True
        seconds = time.perf_counter() - start
        result["cpu_seconds"] = _cpu_seconds() - cpu0  # ~ wall time on an idle machine at 1 thread
        suffix = "" if name != "padding" or args.padding_limits == [64, 128] else "-{}+{}".format(*args.padding_limits)
        path = write_result(name + suffix, machine, args, result, seconds)
        for i, row in enumerate(result["rows"]):
            table.add_row(name if i == 0 else "", *[str(c) for c in row])
        table.add_section()
        console.print(f"  {name}: {seconds:.0f} s wall, {result['cpu_seconds']:.0f} s CPU -> {path.relative_to(ROOT)}")
    console.print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
