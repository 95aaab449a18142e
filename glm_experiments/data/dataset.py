"""Samples -> token ids, labels and prompts; cached by fingerprint; the training collator."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, load_from_disk

from glm_experiments.data.formats import Sample, load_samples, resolve_data_path
from glm_experiments.data.templates import IGNORE_INDEX, truncate

log = logging.getLogger(__name__)


@dataclass
class SplitStats:
    records: int = 0
    skipped: int = 0
    truncated: int = 0
    tokens: int = 0
    tokens_dropped: int = 0
    errors: list[str] = field(default_factory=list)


def tokenize_samples(samples: list[Sample], tokenizer, template, data_cfg) -> tuple[dict[str, list], SplitStats]:
    stats = SplitStats(records=len(samples))
    columns: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    for sample in samples:
        encoded = template.encode(tokenizer, sample.messages)
        ids, labels, was_truncated = truncate(encoded, data_cfg.max_source_length, data_cfg.max_target_length)
        stats.truncated += was_truncated
        stats.tokens += len(ids)
        stats.tokens_dropped += len(encoded.input_ids) - len(ids)
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
        columns["length"].append(len(ids))  # read by the length-grouped sampler
    return columns, stats


def tokenized_cache_dir() -> Path:
    """Where load_split caches tokenised splits (shared by the jobs of a sweep)."""
    from glm_experiments.constants import cache_root

    return cache_root() / "tokenized"


def fingerprint(path: Path, tokenizer, template, data_cfg) -> str:
    digest = hashlib.sha256(path.read_bytes())
    settings = {
        "template": template.name,
        "format": data_cfg.format,
        "columns": [data_cfg.prompt_column, data_cfg.response_column, data_cfg.history_column],
        "lengths": [data_cfg.max_source_length, data_cfg.max_target_length],
        "on_error": data_cfg.on_error,
        "version": 2,  # 2: ChatGLM-6B whitespace pieces and special-token strings in content as text
        # a runtime flag of the tokenizer, not part of its serialised backend below
        "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False)),
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode() if tokenizer.is_fast else str(tokenizer.get_vocab()).encode())
    return digest.hexdigest()[:16]


def load_split(path: str, tokenizer, template, data_cfg, cache_dir: Path, loaded=None,
               setting: str | None = None) -> tuple[Dataset, list[Sample], SplitStats]:
    """Read, validate and tokenise one file; the tokenised table is cached so a sweep tokenises once.
    ``loaded``: the file's ``load_samples`` result when it was already read (validated before the model loads)."""
    resolved = resolve_data_path(path, setting)
    samples, report = loaded or load_samples(resolved, data_cfg)
    key = fingerprint(resolved, tokenizer, template, data_cfg)
    cached = cache_dir / f"{resolved.stem}-{key}"
    stats_file = cached / "glm_stats.json"
    if stats_file.exists():
        dataset = load_from_disk(str(cached))
        stats = SplitStats(**json.loads(stats_file.read_text()))
    else:
        columns, stats = tokenize_samples(samples, tokenizer, template, data_cfg)
        dataset = Dataset.from_dict(columns)
        dataset.save_to_disk(str(cached))
        stats_file.write_text(json.dumps(stats.__dict__))
    stats.skipped, stats.errors = report.skipped, list(report.errors)
    return dataset, samples, stats


class CausalCollator:
    """Pads a batch to its own longest sample (not to max length): the padding waste the seeds pay is avoided."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id, self.multiple = pad_token_id, pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            longest = -(-longest // self.multiple) * self.multiple
        input_ids, labels, mask = [], [], []
        for f in features:
            pad = longest - len(f["input_ids"])
            input_ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            mask.append([1] * len(f["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask),
        }


class PackingCollator:
    """A batch as one row without padding (``train.packing``): transformers' ``DataCollatorWithFlattening``
    restarts the position ids per sample, from which the model builds a block-diagonal attention mask.

    ``use_cache=False`` goes with every batch: given a cache object, transformers skips the packed-sequence
    detection and the samples silently attend to each other (measured: loss off by 0.02).
    """

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_position_ids=True)

    def __call__(self, features: list[dict]) -> dict:
        batch = self.flatten([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        return {**batch, "use_cache": False}


def make_collator(train_cfg, pad_token_id: int):
    return PackingCollator() if train_cfg.packing else CausalCollator(pad_token_id)


def eval_prompts(samples: list[Sample], tokenizer, template, data_cfg,
                 cuts: list[int] | None = None) -> tuple[list[list[int]], list[str], list[str]]:
    """(prompt ids, prompt text, reference) per sample: the conversation up to its last reply is the prompt, cut from
    the left to ``max_source_length`` (the template's head kept). ``cuts``, if given, gets the number of source
    tokens cut per prompt."""
    prompts, inputs, references = [], [], []
    for sample in samples:
        *context, last = sample.messages
        if last["role"] != "assistant":
            continue
        ids = template.prompt(tokenizer, context)
        cut = 0
        if len(ids) > data_cfg.max_source_length:
            head = template.prefix(tokenizer)
            keep = data_cfg.max_source_length - len(head)
            cut = len(ids) - len(head) - keep
            ids = ids[: len(head)] + ids[len(ids) - keep :]
        if cuts is not None:
            cuts.append(cut)
        prompts.append(ids)
        inputs.append(context[-1]["content"] if context else "")
        references.append(last["content"])
    return prompts, inputs, references
