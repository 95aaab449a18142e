"""BLEU-4, ROUGE-1/2/L, triple F1 and accuracy on generated text.

Definitions follow ChatGLM-6B/ChatGLM2-6B's official evaluation (and LLaMA-Factory's):
BLEU-4 on characters with smoothing method3, ROUGE on jieba words through rouge_chinese,
both x100 and averaged over samples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache

from glm_experiments.errors import SettingError

DEFINITIONS = {
    "bleu-4": "nltk sentence_bleu on characters, 4-gram uniform weights, SmoothingFunction().method3, x100, mean over samples",
    "rouge-1": "rouge_chinese F-score on jieba words joined by spaces, x100, mean over samples; empty prediction scores 0",
    "rouge-2": "rouge_chinese F-score on jieba words joined by spaces, x100, mean over samples; empty prediction scores 0",
    "rouge-l": "rouge_chinese F-score on jieba words joined by spaces, x100, mean over samples; empty prediction scores 0",
    "triple_f1": "per sample: predicted set = output lines with exactly 3 '_'-separated non-empty parts; F1 vs reference set, x100, mean over samples",
    "triple_f1_micro": "F1 over true/false positives summed across samples, x100",
    "accuracy": "exact match of stripped prediction and reference, x100",
}


@cache
def _scorers():
    """nltk, jieba and rouge_chinese cost ~1.5 s to import: only runs that score text pay it."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)
    return jieba, sentence_bleu, SmoothingFunction().method3, Rouge()


def bleu4(prediction: str, reference: str) -> float:
    if not prediction or not reference:
        return 0.0
    _, sentence_bleu, smoothing, _ = _scorers()
    return 100.0 * sentence_bleu([list(reference)], list(prediction), smoothing_function=smoothing)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    jieba, _, _, scorer = _scorers()
    hyp = " ".join(jieba.cut(prediction)).strip()
    ref = " ".join(jieba.cut(reference)).strip()
    # rouge_chinese raises on an empty hypothesis or reference: that sample scores 0
    if not hyp or not ref:
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    scores = scorer.get_scores(hyp, ref)[0]
    return {name: 100.0 * scores[name]["f"] for name in ("rouge-1", "rouge-2", "rouge-l")}


def parse_triples(text: str) -> set[tuple[str, str, str]]:
    triples = set()
    for line in text.splitlines():
        parts = [p.strip() for p in line.strip().split("_")]
        if len(parts) == 3 and all(parts):
            triples.add((parts[0], parts[1], parts[2]))
    return triples


def _f1(tp: int, n_pred: int, n_ref: int) -> float:
    if n_pred == 0 and n_ref == 0:
        return 100.0  # nothing to extract and nothing extracted
    if tp == 0:
        return 0.0
    precision, recall = tp / n_pred, tp / n_ref
    return 100.0 * 2 * precision * recall / (precision + recall)


def score_sample(prediction: str, reference: str, metrics: Sequence[str]) -> dict[str, float]:
    """Per-sample scores for the requested metrics (micro F1 needs the whole set, see compute_metrics)."""
    out: dict[str, float] = {}
    if "bleu-4" in metrics:
        out["bleu-4"] = bleu4(prediction, reference)
    if any(m.startswith("rouge") for m in metrics):
        out.update({k: v for k, v in rouge(prediction, reference).items() if k in metrics})
    if "triple_f1" in metrics:
        pred, ref = parse_triples(prediction), parse_triples(reference)
        out["triple_f1"] = _f1(len(pred & ref), len(pred), len(ref))
    if "accuracy" in metrics:
        out["accuracy"] = 100.0 * (prediction.strip() == reference.strip())
    return out


def compute_metrics(
    predictions: Sequence[str], references: Sequence[str], metrics: Sequence[str]
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Return (means over samples, per-sample scores)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    unknown = set(metrics) - set(DEFINITIONS)
    if unknown:
        raise SettingError(f"unknown metric(s) {sorted(unknown)}; known: {sorted(DEFINITIONS)}")
    per_sample = [score_sample(p, r, metrics) for p, r in zip(predictions, references)]
    means = {}
    if per_sample:
        for name in per_sample[0]:
            means[name] = sum(s[name] for s in per_sample) / len(per_sample)
    if "triple_f1" in metrics:
        tp = n_pred = n_ref = 0
        for p, r in zip(predictions, references):
            pred, ref = parse_triples(p), parse_triples(r)
            tp, n_pred, n_ref = tp + len(pred & ref), n_pred + len(pred), n_ref + len(ref)
        means["triple_f1_micro"] = _f1(tp, n_pred, n_ref)
    return means, per_sample
