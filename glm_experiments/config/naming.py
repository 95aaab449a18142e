"""Short labels from what a job overrides (``src512-tgt128``, ``lora-r16``), for run names, sweep folders and
titles, so the jobs of a study are told apart by what was varied."""

from __future__ import annotations

from typing import Iterable

# keys whose leaf is long; the label uses the short form
SHORT_NAMES = {
    "max_source_length": "src",
    "max_target_length": "tgt",
    "learning_rate": "lr",
    "pre_seq_len": "psl",
    "max_steps": "steps",
    "per_device_train_batch_size": "bs",
    "num_last_layers": "last",
    "num_virtual_tokens": "vt",
}
# overrides that say where or how a job runs, not what it is
_NOT_A_SETTING = ("hydra", "tracking", "output_dir", "resume", "launcher", "experiment", "hparams_search", "debug")


def override_parts(overrides: Iterable[str], skip_groups: Iterable[str] = ()) -> list[str]:
    """One short part per override that changes the experiment: ``lengths=src512_tgt128`` -> ``src512-tgt128``,
    ``method=lora`` -> ``lora``, ``method.r=16`` -> ``r16``. Paths and bookkeeping keys are left out."""
    parts = []
    for override in overrides:
        key, _, value = str(override).lstrip("+~").partition("=")
        if not value or "/" in value or key.split(".")[0].split("/")[0] in _NOT_A_SETTING:
            continue
        if "." in key:
            leaf = key.rsplit(".", 1)[-1]
            parts.append(f"{SHORT_NAMES.get(leaf, leaf)}{value}")
        elif key not in skip_groups:
            parts.append(value.replace("_", "-"))
    return parts


def job_label(overrides: Iterable[str], fallback: str = "") -> str:
    return "-".join(override_parts(overrides)) or fallback


# ------------------------------------------------------------------------------- the display name of a run
# One name per run, read by people: the MLflow run name, the web page's run labels and compare's row labels.
# MLflow's runs table shows only the start of a name (3.17, Chromium at 1440x900: 122 px, about 20 characters, of
# a parent run; 98 px, about 15, of a child run under it). So "smoke" comes first for a debug=smoke run (a wiring
# check is never read as a result), then the swept values, the method and the model:
# ``smoke · src=1024 tgt=256 · full · tiny``; a real run starts with what its study varies.
SEPARATOR = " · "
SMOKE = "smoke"
# set by the sweep callback for its jobs: the keys the sweep varies (``lengths,method.r``); a job's other
# overrides are the same in every job of the sweep and stay out of its name
SWEPT_KEYS_ENV = "GLM_EXPERIMENTS_SWEPT_KEYS"


def _choice_values(option: str) -> str:
    """A group option made of ``<name><number>`` pieces reads as values: ``src512_tgt128`` -> ``src=512 tgt=128``;
    any other option stays as it is (``history_demo``)."""
    import re

    pieces = option.split("_")
    matched = [re.fullmatch(r"([A-Za-z]+)(\d[\w.+-]*)", piece) for piece in pieces]
    if all(matched):
        return " ".join(f"{m.group(1)}={m.group(2)}" for m in matched)
    return option


def value_label(key: str, value: str) -> str:
    """One setting as people read it: a group choice by its value (``lora``, ``src=512 tgt=128``), a key by its
    short leaf and value (``r=16``, ``lr=1e-3``, ``src=512``)."""
    if "." in key:
        leaf = key.rsplit(".", 1)[-1]
        return f"{SHORT_NAMES.get(leaf, leaf)}={value}"
    return _choice_values(value)


def override_key(override: str) -> str:
    return str(override).lstrip("+~").partition("=")[0]


def varied_values(overrides: Iterable[str], swept_keys: Iterable[str] | None = None,
                  skip_groups: Iterable[str] = ("method", "model")) -> list[str]:
    """The values an override list sets, as :func:`value_label` writes them: only the ``swept_keys`` when
    given (the jobs of a sweep), paths and bookkeeping keys left out, the ``skip_groups`` choices too."""
    swept = None if swept_keys is None else {k.lstrip("+~") for k in swept_keys}
    parts = []
    for override in overrides:
        key, _, value = str(override).lstrip("+~").partition("=")
        if not value or "/" in value or key.split(".")[0].split("/")[0] in _NOT_A_SETTING or key in skip_groups:
            continue
        if swept is not None and key not in swept:
            continue
        parts.append(value_label(key, value))
    return parts


def display_name(values: Iterable[str], method: str | None, model: str | None, smoke: bool = False) -> str:
    """``smoke · src=1024 tgt=256 · full · tiny``: smoke (if it is), what varies, the method and the model."""
    head = " ".join(v for v in values if v)
    return SEPARATOR.join(p for p in (SMOKE if smoke else "", head, method or "", model or "") if p)


def swept_keys_from_env() -> list[str] | None:
    import os

    text = os.environ.get(SWEPT_KEYS_ENV)
    return None if text is None else [k for k in text.split(",") if k]
