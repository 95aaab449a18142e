"""How compare names the runs it compares: by their display names (config/naming.py) or the same form made from
the params that differ, shorter for prose; and the note said above the tables when they are debug=smoke runs."""

from __future__ import annotations

from glm_experiments.config.naming import SEPARATOR, SHORT_NAMES, display_name
from glm_experiments.tracking.mlflow_tracker import SMOKE_TAG

# a group whose choice varies: its other params follow from the choice, show only the choice
GROUPS = ("method", "model", "data", "deepspeed")
LABEL_WIDTH = 40  # a display name: smoke · src=1024 tgt=256 · full · tiny


def param_label(key: str) -> str:
    group, _, leaf = key.rpartition(".")
    if leaf == "name" and group in GROUPS:
        return group
    return key


def short_label(key: str, value: str | None) -> str:
    group, _, leaf = key.rpartition(".")
    if leaf == "name" and group in GROUPS:
        return str(value)
    return f"{SHORT_NAMES.get(leaf, leaf)}={value}"


def is_smoke(run) -> bool:
    return bool(run.data.tags.get(SMOKE_TAG)) or run.data.tags.get("hydra.choices.debug") == "smoke"


def computed_label(run, varied: list[str]) -> str:
    """What differs between the compared runs, then smoke, the method and the model where they do not differ."""
    params = run.data.params
    values = " ".join(short_label(k, params.get(k)) for k in varied)
    if not values:
        return run.info.run_name or run.info.run_id[:8]
    method = None if "method.name" in varied else params.get("method.name")
    model = None if "model.name" in varied else params.get("model.name")
    return display_name([values], method, model, smoke=is_smoke(run))


def smoke_runs_note(runs: list, rows: list[dict]) -> str | None:
    """"smoke runs (10 steps): wiring check, not a result" when debug=smoke runs are compared (which ones, when
    not all are)."""
    smoke = [(run, row) for run, row in zip(runs, rows) if is_smoke(run)]
    if not smoke:
        return None
    steps = sorted({run.data.params.get("train.max_steps", "?") for run, _ in smoke}, key=str)
    note = f"smoke runs ({'/'.join(steps)} steps): wiring check, not a result"
    if len(smoke) < len(runs):
        note += f" ({len(smoke)} of {len(runs)}: {', '.join(row['label'] for _, row in smoke)})"
    return note


def short_run_label(label: str, width: int = LABEL_WIDTH) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def distinct_labels(labels: list[str]) -> list[str]:
    """The labels without the parts every one of them shares (``smoke · src=512 tgt=128 · full · tiny`` ->
    ``src=512 tgt=128`` when all runs are smoke full tiny runs): what tells them apart, for prose."""
    split = [label.split(SEPARATOR) for label in labels]
    if len(split) < 2:
        return labels
    common = set.intersection(*(set(parts) for parts in split))
    short = [SEPARATOR.join(p for p in parts if p not in common) or label for parts, label in zip(split, labels)]
    return short if len(set(short)) == len(short) else labels
