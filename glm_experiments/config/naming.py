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
