"""generation: ``glm_experiments.recipe.evaluation.generate`` at batch 16 vs batch 1, predictions compared.

dev.json prompts through the chatglm3 template, the default run's eval settings (greedy, max_new_tokens 64). Two
models: the fine-tuned default run (tiny + LoRA, 300 steps; trained once and cached in
``~/.cache/glm_experiments/bench/default_run-<hash of its conf files>``, the PEFT adapter unmerged as during
training) and, for contrast, the untrained pre-trained base. Target: >= 5x with identical predictions.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

from harness import ROOT, fmt_ratio, timed_cmd, tiny_tokenizer

from glm_experiments.compose import compose


def finetuned_default_run() -> Path:
    """The embedded default run (tiny model, LoRA, 300 steps on the demo set), trained once and cached: the
    model whose evaluation the framework really batches. ~1 min of CPU the first time."""
    from glm_experiments.constants import cache_root

    # keyed on the files that define the default run, so a changed default retrains
    files = [
        "train.yaml",
        "model/tiny.yaml",
        "method/lora.yaml",
        "data/adgen_demo.yaml",
    ]
    key = hashlib.sha256(
        b"".join((ROOT / "conf" / f).read_bytes() for f in files)
    ).hexdigest()[:12]
    run_dir = cache_root() / "bench" / f"default_run-{key}"
    if not (run_dir / "result.json").exists():
        cmd = [
            sys.executable,
            "-m",
            "glm_experiments",
            "tracking=none",
            "eval.before_training=false",
            "eval.max_samples=8",
            "train.save_steps=0",
            f"hydra.run.dir={run_dir}",
        ]
        _, proc = timed_cmd(cmd)
        if proc.returncode:
            raise RuntimeError(
                f"training the default run for the generation benchmark failed:\n{proc.stderr[-3000:]}"
            )
    return run_dir


def paired_generation(model, tok, template, prompts, eval_cfg) -> dict:
    """Batch 16 vs batch 1 over the same prompts, paired per chunk of 16 with the order alternating (robust to
    load); predictions compared."""
    from omegaconf import OmegaConf

    from glm_experiments.recipe.evaluation import generate

    batched_cfg = OmegaConf.merge(eval_cfg, {"batch_size": 16})
    single_cfg = OmegaConf.merge(eval_cfg, {"batch_size": 1})
    generate(
        model, tok, template, prompts[:2], batched_cfg, show_progress=False
    )  # warm-up
    t_b, t_s, out_b, out_s, pairs = 0.0, 0.0, [], [], []
    for k in range(0, len(prompts), 16):
        chunk = prompts[k : k + 16]
        runs = (
            [("b", batched_cfg), ("s", single_cfg)]
            if k % 32 == 0
            else [("s", single_cfg), ("b", batched_cfg)]
        )
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
    return {
        "prompts": len(prompts),
        "seconds_batched": t_b,
        "seconds_one_at_a_time": t_s,
        "speedup": t_s / t_b,
        "speedup_per_chunk": pairs,
        "identical_predictions": not mism,
        "mismatched_indices": mism,
        "samples_per_s_batched": len(prompts) / t_b,
        "samples_per_s_single": len(prompts) / t_s,
        "mean_reply_tokens": sum(reply_tokens) / max(len(reply_tokens), 1),
        "replies_at_max_new_tokens": sum(
            n >= eval_cfg.max_new_tokens for n in reply_tokens
        ),
    }


def run(args) -> dict:
    from transformers import AutoModelForCausalLM

    from glm_experiments.data.dataset import eval_prompts
    from glm_experiments.data.formats import load_samples, resolve_data_path
    from glm_experiments.inference.run_loading import load_run
    from glm_experiments.models.loading import template_for

    n = 32 if args.quick else 64
    cfg = compose(
        ["tracking=none"]
    )  # the default run's eval settings: greedy, max_new_tokens 64
    path, tok = tiny_tokenizer()
    template = template_for(cfg.model)
    samples, _ = load_samples(resolve_data_path(cfg.data.dev_file), cfg.data)
    prompts, _, _ = eval_prompts(samples[:n], tok, template, cfg.data)

    finetuned = load_run(finetuned_default_run(), device="cpu")
    tuned = paired_generation(
        finetuned.model, finetuned.tokenizer, finetuned.template, prompts, cfg.eval
    )
    # the pre-trained base, for contrast: it often stops after 1-2 tokens, so a batch runs as long as its longest
    # reply while single prompts stop early
    base = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    as_is = paired_generation(base, tok, template, prompts, cfg.eval)
    identical = tuned["identical_predictions"] and as_is["identical_predictions"]
    result = {
        "max_new_tokens": cfg.eval.max_new_tokens,
        "batch_size": 16,
        "models": {
            "fine_tuned": "the default run (tiny + LoRA r8, 300 steps), PEFT adapter unmerged, as evaluated in training",
            "base": "pre-trained tiny checkpoint (ensure_tiny_checkpoint), no fine-tuning",
        },
        "prompt_source": "data/adgen_demo/dev.json through the chatglm3 template (eval_prompts)",
        "fine_tuned": tuned,
        "base": as_is,
        "speedup": tuned["speedup"],
        "target": ">= 5x with identical predictions",
        "pass": tuned["speedup"] >= 5 and identical,
    }

    def row(name, r):
        rates = f"{r['samples_per_s_batched']:.1f} vs {r['samples_per_s_single']:.1f} samples/s"
        return (
            name,
            f"{rates}, {r['mean_reply_tokens']:.0f} tokens/reply",
            fmt_ratio(r["speedup"]),
            "PASS" if r["speedup"] >= 5 else "MISS",
        )

    same = f"{n - len(tuned['mismatched_indices'])}/{n}, {n - len(as_is['mismatched_indices'])}/{n}"
    result["rows"] = [
        row("batched (16) vs one at a time, fine-tuned (default run)", tuned),
        row("  same, untrained base (replies stop early)", as_is),
        ("identical predictions", same, "all", "PASS" if identical else "FAIL"),
    ]
    return result
