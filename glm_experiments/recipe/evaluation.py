"""Generation-based evaluation: batched greedy (by default) generation with left padding, then metrics; the
run's ``Evaluator`` (before, every train.eval_steps, after; the forgetting probe)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from glm_experiments.distributed import is_main, zero3_partitioned
from glm_experiments.metrics import DEFAULT_CONVENTION, compute_metrics

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    prompts: list[list[int]]
    inputs: list[str]
    references: list[str]
    cuts: list[int] | None = None  # source tokens max_source_length cut from each prompt

    @classmethod
    def of(cls, samples, tokenizer, template, data_cfg) -> EvalSet:
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


class RateColumn(ProgressColumn):
    """samples/s of the generation so far (rich's own speed columns are for bytes)."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.2f} samples/s" if task.speed else "- samples/s")


@torch.no_grad()
def generate(model, tokenizer, template, prompts: list[list[int]], eval_cfg, show_progress: bool = True,
             on_batch=None) -> list[str]:
    """Replies to ``prompts`` (token ids), in the given order. Prompts are sorted by length so each
    batch pads little; padding is on the left so every reply starts at the same column. ``on_batch(indices,
    replies)`` is called as each batch finishes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    kwargs = generation_kwargs(eval_cfg, tokenizer, template)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: dict[int, str] = {}
    progress = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                        TimeRemainingColumn(), disable=not show_progress, transient=True)
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
            if on_batch is not None:
                on_batch(batch, [outputs[i] for i in batch])
            progress.advance(task, len(batch))
    model.train(was_training)
    return [outputs[i] for i in range(len(prompts))]


def evaluate_generation(model, tokenizer, template, eval_set: EvalSet, eval_cfg, metrics: list[str],
                        show_progress: bool = True, stream_to: Path | None = None) -> tuple[dict, list[dict]]:
    """Returns (metric means + timing, one row per sample with input, reference, prediction and scores).
    ``stream_to``: a jsonl file that gets each batch's rows as it finishes (generation order: a killed evaluation
    leaves the complete lines of the batches done), rewritten in the dev set's order at the end."""
    convention = getattr(eval_cfg, "metric_convention", None) or DEFAULT_CONVENTION
    cuts = eval_set.cuts or [None] * len(eval_set.prompts)

    def row(i: int, prediction: str, scores: dict) -> dict:
        out = {"input": eval_set.inputs[i], **({} if cuts[i] is None else {"source_tokens_cut": cuts[i]}),
               "reference": eval_set.references[i], "prediction": prediction,
               **{k: round(v, SCORE_DECIMALS) if isinstance(v, float) else v for k, v in scores.items()}}
        # the prompt as the model saw it: after the cut to max_source_length, in its template
        out["prompt_seen"] = tokenizer.decode(eval_set.prompts[i], skip_special_tokens=False)
        return out

    if stream_to is not None:
        Path(stream_to).parent.mkdir(parents=True, exist_ok=True)

    def write_batch(indices: list[int], replies: list[str]) -> None:
        _, scores = compute_metrics(replies, [eval_set.references[i] for i in indices], metrics, convention=convention)
        stream.write("".join(json.dumps(row(i, p, s), ensure_ascii=False) + "\n"
                             for i, p, s in zip(indices, replies, scores)))
        stream.flush()

    start = time.perf_counter()
    with open(stream_to, "w", encoding="utf-8") if stream_to is not None else contextlib.nullcontext() as stream:
        predictions = generate(model, tokenizer, template, eval_set.prompts, eval_cfg, show_progress,
                               on_batch=write_batch if stream else None)
    seconds = time.perf_counter() - start
    means, per_sample = compute_metrics(predictions, eval_set.references, metrics, convention=convention)
    rows = [row(i, p, s) for i, (p, s) in enumerate(zip(predictions, per_sample))]
    if stream_to is not None:
        write_predictions(rows, Path(stream_to))
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


class Evaluator:
    """Generation metrics on the dev prompts (before, every train.eval_steps, after), and the forgetting probe."""

    def __init__(self, cfg: DictConfig, pieces, tracker, predictions_dir: Path, resume_from):
        self.cfg, self.pieces, self.tracker, self.predictions_dir = cfg, pieces, tracker, predictions_dir
        self.forgetting_set = None
        self.results: dict[int, tuple[dict, list[dict]]] = {}  # step -> (means, rows): the latest and the pinned
        self.pinned: set[int] = set()
        # rank 0 alone (under ZeRO-3 generation needs every rank: not supported); not measurable after a resume
        if cfg.eval.forgetting_file and is_main() and not zero3_partitioned(pieces.model) and not resume_from:
            self.forgetting_set = load_eval_set(cfg.eval.forgetting_file, cfg.eval.forgetting_format, pieces.tokenizer,
                                                pieces.template, cfg.data.max_source_length, cfg.eval.max_samples)

    def __call__(self, step: int, tag: str | None = None) -> dict:
        """The model's generation metrics at ``step``, logged as eval/* there. "after" reuses the evaluation of the
        same step made during training (the best or the last step's: train.keep_best) instead of generating again."""
        cfg, p = self.cfg, self.pieces
        # rank 0 generates alone, except under ZeRO-3 where every forward needs all ranks (generate syncs them)
        if p.eval_set is None or not (is_main() or zero3_partitioned(p.model)):
            return {}
        name = tag or f"step{step}"
        path = self.predictions_dir / f"{name}.jsonl"
        if step in self.results and tag == "after":
            means, rows = self.results[step]
            if is_main():
                write_predictions(rows, path)
        else:
            means, rows = evaluate_generation(p.model, p.tokenizer, p.template, p.eval_set, cfg.eval,
                                              list(cfg.data.metrics), stream_to=path if is_main() else None)
        self.results = {s: r for s, r in self.results.items() if s in self.pinned}
        self.results[step] = (means, rows)
        if not is_main():
            return means
        self.tracker.log_table(rows, f"predictions/{name}.json")
        self.tracker.log_metrics({f"eval/{k}": v for k, v in means.items()}, step=step)
        log.info("eval @ step %d%s: %s", step, f" ({tag})" if tag else "",
                 ", ".join(f"{k} {v:.2f}" for k, v in means.items() if k in cfg.data.metrics))
        return means

    def pin(self, step: int) -> None:
        """Keep ``step``'s results (the best so far) for the "after" evaluation; the others go as the next comes."""
        self.pinned = {step}

    def at_lengths(self, step: int) -> dict:
        """eval.at_lengths: the model again on the dev prompts cut at each option's source length (rank 0 only;
        not under ZeRO-3): ``eval/<name>/<metric>``, ``predictions/<name>/after.json``. Returns {name: means}."""
        cfg, p = self.cfg, self.pieces
        if not p.eval_sets_at or not is_main() or zero3_partitioned(p.model):
            return {}
        out = {}
        for name, (eval_set, _) in p.eval_sets_at.items():
            means, rows = evaluate_generation(p.model, p.tokenizer, p.template, eval_set, cfg.eval, list(cfg.data.metrics),
                                              stream_to=self.predictions_dir / name / "after.jsonl")
            self.tracker.log_table(rows, f"predictions/{name}/after.json")
            self.tracker.log_metrics({f"eval/{name}/{k}": v for k, v in means.items()}, step=step)
            log.info("eval at %s @ step %d: %s", name, step,
                     ", ".join(f"{k} {v:.2f}" for k, v in means.items() if k in cfg.data.metrics))
            out[name] = means
        return out

    def forgetting(self) -> dict:
        if self.forgetting_set is None:
            return {}
        p, metrics = self.pieces, list(self.cfg.eval.forgetting_metrics)
        means, _ = evaluate_generation(p.model, p.tokenizer, p.template, self.forgetting_set, self.cfg.eval, metrics)
        return {m: means[m] for m in metrics}
