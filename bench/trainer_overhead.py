"""overhead: steps/s of GlmTrainer (+ its TrackingCallback, tracking=none) vs a bare ``transformers.Trainer``.

The default run's config and ``training_arguments()``, the pre-trained tiny model + LoRA, identical batches
(sequential over our sampler's order), the same collator; timed between step callbacks after 3 warm-up steps,
the two trainers alternating round by round. Target: GlmTrainer >= 0.90x.
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
import time
from pathlib import Path

import torch
from harness import fmt_ratio, interleaved, median, tiny_tokenizer

from glm_experiments.compose import compose


def run(args) -> dict:
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

    from glm_experiments.data.dataset import CausalCollator, load_split, tokenized_cache_dir
    from glm_experiments.models.loading import template_for
    from glm_experiments.methods import get_method
    from glm_experiments.tracking.mlflow_tracker import Tracker
    from glm_experiments.recipe.trainer import (
        EpochSeededLengthGroupedSampler,
        GlmTrainer,
        TrackingCallback,
        training_arguments,
    )

    warm, measured = 3, (15 if args.quick else 40)
    rounds = 3 if args.quick else 4
    cfg = compose(
        ["tracking=none", f"train.max_steps={warm + measured}", "train.save_steps=0"]
    )
    path, tok = tiny_tokenizer()
    template = template_for(cfg.model)
    train_set, _, _ = load_split(
        cfg.data.train_file, tok, template, cfg.data, tokenized_cache_dir()
    )
    bs = cfg.train.per_device_train_batch_size
    # identical batches for both: the exact order our GlmTrainer's sampler draws, fed sequentially
    order = list(EpochSeededLengthGroupedSampler(bs, train_set["length"], cfg.seed))[
        : bs * (warm + measured)
    ]
    data = train_set.select(order)
    base = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    method = get_method(cfg.method.name)

    class Clock(TrainerCallback):
        def __init__(self):
            self.stamps = []

        def on_step_end(self, a, state, control, **kw):
            self.stamps.append(time.perf_counter())

    def steps_per_s(kind: str, tmp: str) -> float:
        torch.manual_seed(0)
        model = method.apply(copy.deepcopy(base), cfg.method)
        targs = training_arguments(cfg, Path(tmp) / kind)
        targs.train_sampling_strategy = "sequential"
        clock = Clock()
        common = {
            "model": model,
            "args": targs,
            "train_dataset": data,
            "data_collator": CausalCollator(tok.pad_token_id),
        }
        if kind == "GlmTrainer":
            tracker = Tracker(
                cfg.tracking, active=True
            )  # tracking=none: inactive, as in the default bench run
            callbacks = [TrackingCallback(tracker, lambda step: {}, 0), clock]
            trainer = GlmTrainer(**common, callbacks=callbacks, method_cfg=cfg.method)
        else:
            trainer = Trainer(**common, callbacks=[clock])
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
        s = clock.stamps
        return measured / (s[-1] - s[warm - 1])

    sps = {"GlmTrainer": [], "Trainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in interleaved(("GlmTrainer", "Trainer"), rounds):
            sps[kind].append(steps_per_s(kind, tmp))
    ratios = [g / t for g, t in zip(sps["GlmTrainer"], sps["Trainer"])]
    ratio = median(ratios)
    result = {
        "setup": (
            f"default run config (tiny pre-trained, method={cfg.method.name}, bs {bs}, precision "
            f"{cfg.train.precision}), {measured} timed steps after {warm} warm-up, {rounds} interleaved rounds, same "
            "batches (sequential over our sampler's order), same CausalCollator; GlmTrainer with its TrackingCallback "
            "(tracking=none)"
        ),
        "steps_per_s": sps,
        "paired_ratio_glm_over_bare": ratios,
        "ratio_median": ratio,
        "target": "GlmTrainer >= 0.90x bare Trainer steps/s",
        "pass": ratio >= 0.90,
    }
    result["rows"] = [
        (
            "GlmTrainer / bare Trainer",
            f"{median(sps['GlmTrainer']):.2f} vs {median(sps['Trainer']):.2f} steps/s",
            fmt_ratio(ratio),
            "PASS" if result["pass"] else "MISS",
        )
    ]
    return result
