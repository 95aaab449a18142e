"""Generation-based evaluation: batched greedy (by default) generation with left padding, then metrics."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from glm_experiments.metrics import DEFAULT_CONVENTION, compute_metrics


@dataclass
class EvalSet:
    prompts: list[list[int]]
    inputs: list[str]
    references: list[str]
    cuts: list[int] | None = None  # source tokens max_source_length cut from each prompt

    @classmethod
    def of(cls, samples, tokenizer, template, data_cfg) -> "EvalSet":
        from glm_experiments.data.dataset import eval_prompts

        cuts: list[int] = []
        return cls(*eval_prompts(samples, tokenizer, template, data_cfg, cuts), cuts)


SCORE_DECIMALS = 2  # per-sample scores in the predictions tables (the means are logged unrounded)


def generation_kwargs(eval_cfg, tokenizer, template) -> dict:
    kwargs = {
        "max_new_tokens": eval_cfg.max_new_tokens,
        "do_sample": eval_cfg.do_sample,
        "num_beams": eval_cfg.num_beams,
        "eos_token_id": template.stop_ids(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
    }
    if eval_cfg.do_sample:
        kwargs.update(temperature=eval_cfg.temperature, top_p=eval_cfg.top_p)
    return kwargs


@torch.no_grad()
def generate(model, tokenizer, template, prompts: list[list[int]], eval_cfg, show_progress: bool = True) -> list[str]:
    """Replies to ``prompts`` (token ids), in the given order. Prompts are sorted by length so each
    batch pads little; padding is on the left so every reply starts at the same column."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    kwargs = generation_kwargs(eval_cfg, tokenizer, template)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: dict[int, str] = {}
    progress = Progress(
        TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not show_progress, transient=True
    )
    with progress:
        task = progress.add_task("gen", total=len(prompts))
        for start in range(0, len(order), eval_cfg.batch_size):
            batch = order[start : start + eval_cfg.batch_size]
            longest = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), longest), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, longest - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, longest - len(prompts[i]) :] = 1
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            for row, i in enumerate(batch):
                text = tokenizer.decode(generated[row, longest:], skip_special_tokens=True)
                outputs[i] = template.clean_response(text)
            progress.advance(task, len(batch))
    model.train(was_training)
    return [outputs[i] for i in range(len(prompts))]


def evaluate_generation(model, tokenizer, template, eval_set: EvalSet, eval_cfg, metrics: list[str],
                        show_progress: bool = True) -> tuple[dict, list[dict]]:
    """Returns (metric means + timing, one row per sample with input, reference, prediction and scores)."""
    start = time.perf_counter()
    predictions = generate(model, tokenizer, template, eval_set.prompts, eval_cfg, show_progress)
    seconds = time.perf_counter() - start
    convention = getattr(eval_cfg, "metric_convention", None) or DEFAULT_CONVENTION
    means, per_sample = compute_metrics(predictions, eval_set.references, metrics, convention=convention)
    cuts = eval_set.cuts or [None] * len(predictions)
    rows = []
    for ids, inp, ref, pred, scores, cut in zip(eval_set.prompts, eval_set.inputs, eval_set.references, predictions,
                                                per_sample, cuts):
        row = {"input": inp, **({} if cut is None else {"source_tokens_cut": cut}), "reference": ref,
               "prediction": pred,
               **{k: round(v, SCORE_DECIMALS) if isinstance(v, float) else v for k, v in scores.items()}}
        # the prompt as the model saw it: after the cut to max_source_length, in its template
        row["prompt_seen"] = tokenizer.decode(ids, skip_special_tokens=False)
        rows.append(row)
    means["gen_seconds"] = seconds
    means["gen_samples_per_s"] = len(predictions) / seconds if seconds else 0.0
    return means, rows


def write_predictions(rows: list[dict], path: Path) -> None:
    from glm_experiments.recipe.outputs import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def eval_sets_at(samples, tokenizer, template, data_cfg, options: dict[str, dict[str, int]]) -> dict[str, tuple[EvalSet, int]]:
    """``eval.at_lengths``: per lengths option (config/lengths.py), the dev prompts cut at its max_source_length,
    and how many of them that cut."""
    from types import SimpleNamespace

    from glm_experiments.data.dataset import eval_prompts

    if not options:
        return {}
    whole = eval_prompts(samples, tokenizer, template, SimpleNamespace(max_source_length=float("inf")))[0]
    sets = {}
    for name, lengths in options.items():
        source = lengths["max_source_length"]
        settings = SimpleNamespace(**{**dict(data_cfg), "max_source_length": source})
        sets[name] = (EvalSet.of(samples, tokenizer, template, settings), sum(len(ids) > source for ids in whole))
    return sets


def load_eval_set(path: str, data_format: str, tokenizer, template, max_source_length: int, max_samples: int | None) -> EvalSet:
    """An evaluation set from any supported file (used for the forgetting probe)."""
    from types import SimpleNamespace

    from glm_experiments.data.formats import load_samples, resolve_data_path

    settings = SimpleNamespace(format=data_format, prompt_column="content", response_column="summary",
                               history_column=None, on_error="raise", max_source_length=max_source_length)
    samples, _ = load_samples(resolve_data_path(path), settings)
    return EvalSet.of(samples[: max_samples or len(samples)], tokenizer, template, settings)
