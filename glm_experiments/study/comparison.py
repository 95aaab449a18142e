"""A study's runs read from MLflow: which params vary, the final metrics, curves, the headline per score (python -m glm_experiments.compare prints them; study/report.py writes them)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm_experiments.config.naming import SHORT_NAMES
from glm_experiments.errors import UserError
from glm_experiments.study.labels import (  # noqa: F401  (short_run_label, LABEL_WIDTH: imported from here too)
    GROUPS,
    LABEL_WIDTH,
    computed_label,
    distinct_labels,
    param_label,
    short_label,
    short_run_label,
    smoke_runs_note,
)
from glm_experiments.tracking.mlflow_tracker import DISPLAY_NAME_TAG, ROLE_TAG

NOT_TRAINING_RUNS = {"sweep_parent", "comparison", "human_eval"}

# params that always differ between runs and say nothing about the setting
IGNORED_PARAMS = {"output_dir", "tracking.run_name", "tracking.experiment_name", "tracking.tracking_uri",
                  "tracking.artifact_location"}

QUALITY = [  # (metric key, column label); shown where any run has it
    ("eval/bleu-4", "BLEU-4"),
    ("eval/rouge-1", "ROUGE-1"),
    ("eval/rouge-2", "ROUGE-2"),
    ("eval/rouge-l", "ROUGE-L"),
    ("eval/triple_f1", "F1"),
    ("eval/accuracy", "acc."),
]
# three tables, each narrow enough for a 100-column terminal: scores, training, cost
SCORE_COLUMNS = [(key, label, "{:.2f}") for key, label in QUALITY]  # (metric key, column label, format)
TRAINING_COLUMNS = [
    ("train/loss", "train loss", "{:.3f}"),
    ("eval/loss", "eval loss", "{:.3f}"),
    ("data/train_truncated", "cut train", "{:,.0f}"),
    ("data/dev_truncated", "cut dev", "{:,.0f}"),
]
RESULT_COLUMNS = SCORE_COLUMNS + TRAINING_COLUMNS  # the columns a setting can win on
COST_COLUMNS = [
    ("model/trainable_pct", "trainable %", "{:.3f}"),
    ("perf/cuda_max_allocated_mib", "GPU peak MiB", "{:,.0f}"),
    ("perf/peak_rss_mib", "RSS peak MiB", "{:,.0f}"),
    ("perf/train_seconds", "train s*", "{:.1f}"),
    ("perf/tokens_per_s", "tokens/s*", "{:,.0f}"),
]
COLUMNS = RESULT_COLUMNS + COST_COLUMNS
TIMING_NOTE = ("* one timing per run, taken on whatever else the machine was doing: not a repeated measurement "
               "(bench/ measures speed properly)")
BEFORE_AFTER = [key for key, _ in QUALITY]


class CompareError(UserError):
    pass


@dataclass
class Comparison:
    name: str
    selection: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str | None
    runs: list[Any]
    varied: list[str]            # param keys that differ between the runs
    fixed: dict[str, str]        # params every run shares
    columns: list[str]           # column labels of `rows`, in order
    rows: list[dict[str, Any]]   # one per run: column label -> value, plus run_id / run_name / status / label
    tables: dict[str, list[str]] = field(default_factory=dict)  # title -> its metric columns (scores, training, cost)
    identical: list[str] = field(default_factory=list)         # result columns equal in every run
    before_after: dict[str, dict[str, tuple[float | None, float | None]]] = field(default_factory=dict)
    loss_curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    smoke_note: str | None = None  # said above the tables when runs were debug=smoke runs
    paired: Any = None  # study.paired.PairedComparison: settings (seeds pooled) against the baseline, the verdicts
    sample_diffs: Any = None  # study.samples.SampleDiffs: the dev samples the best and the worst run differ most on


# ------------------------------------------------------------------------- selecting
def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.exists():
            raise CompareError(f"no MLflow database at {db.resolve()} (tracking URI {tracking_uri}); "
                               "pass --tracking-uri, or run from the directory that holds mlflow.db")
    from glm_experiments.tracking.store import check_store

    check_store(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


def _search(client, experiment_ids: list[str], filter_string: str) -> list:
    from mlflow.exceptions import MlflowException

    runs, token = [], None
    while True:
        try:
            page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                      order_by=["attributes.start_time ASC"], page_token=token)
        except MlflowException as exc:
            raise CompareError(f"MLflow rejected the search (filter {filter_string!r}): {exc.message}") from None
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def select_runs(client, experiment: str | None = None, parent: str | None = None,
                filter_string: str | None = None) -> tuple[list, str, str, str]:
    """(runs, name, selection description, experiment id)."""
    from mlflow.exceptions import MlflowException

    if (experiment is None) == (parent is None):
        raise CompareError("give exactly one of --experiment NAME or --parent RUN_ID")
    user_filter = (filter_string or "").strip()
    if parent:
        try:
            parent_run = client.get_run(parent)
        except MlflowException:
            raise CompareError(f"no run with id {parent!r} in this tracking store") from None
        # children normally share the parent's experiment, but a sweep may vary tracking.experiment_name
        experiment_ids = [e.experiment_id for e in client.search_experiments()] or [parent_run.info.experiment_id]
        query = f"tags.mlflow.parentRunId = '{parent}'" + (f" and {user_filter}" if user_filter else "")
        runs = _search(client, experiment_ids, query)
        experiment_id = parent_run.info.experiment_id
        name = f"{client.get_experiment(experiment_id).name}-{parent[:8]}"
        selection = f"children of parent run `{parent}` ({parent_run.info.run_name})"
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise CompareError(f"no experiment named {experiment!r}; experiments in this store: {names or 'none'}")
        runs = [r for r in _search(client, [exp.experiment_id], user_filter)
                if r.data.tags.get(ROLE_TAG) not in NOT_TRAINING_RUNS]
        name, selection, experiment_id = experiment, f"runs of experiment `{experiment}`", exp.experiment_id
    if user_filter:
        selection += f" matching `{user_filter}`"
    if not runs:
        raise CompareError(f"no runs match: {selection.replace('`', '')}")
    return runs, name, selection, experiment_id


def check_one_convention(runs: list) -> None:
    """BLEU-4/ROUGE of different eval.metric_convention are different numbers (BLEU on characters x100 vs on
    words as a fraction): refuse to put them in one table. Runs logged before the setting existed used the default."""
    from glm_experiments.metrics import DEFAULT_CONVENTION

    by_convention: dict[str, list[str]] = {}
    for run in runs:
        convention = run.data.params.get("eval.metric_convention", DEFAULT_CONVENTION)
        by_convention.setdefault(convention, []).append(run.info.run_id[:8])
    if len(by_convention) > 1:
        listed = "; ".join(f"{c}: {', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''}" for c, ids in by_convention.items())
        raise CompareError(f"these runs use different eval.metric_convention ({listed}): their BLEU-4/ROUGE are not "
                           "comparable; select runs of one convention (--filter \"params.eval.metric_convention = "
                           "'chatglm3_finetune'\")")


# --------------------------------------------------------------------------- table
def varied_params(runs: list) -> tuple[list[str], dict[str, str]]:
    keys = sorted({k for r in runs for k in r.data.params} - IGNORED_PARAMS)
    varied, fixed = [], {}
    for key in keys:
        values = {r.data.params.get(key) for r in runs}
        if len(values) > 1:
            varied.append(key)
        else:
            fixed[key] = values.pop()
    for group in GROUPS:
        if f"{group}.name" in varied:
            varied = [k for k in varied if not k.startswith(f"{group}.") or k == f"{group}.name"]
    # the choices first (method, model, data), then the rest alphabetically
    varied.sort(key=lambda k: (0, GROUPS.index(k.split(".")[0])) if k.endswith(".name") and k.split(".")[0] in GROUPS
                else (1, k))
    return varied, fixed


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def param_aliases(key: str) -> set[str]:
    """The names ``--baseline KEY=VALUE`` accepts for a param: the key, its column label, its short name."""
    leaf = key.rpartition(".")[2]
    return {key, param_label(key), SHORT_NAMES.get(leaf, leaf)}


def collect(tracking_uri: str | None = None, experiment: str | None = None, parent: str | None = None,
            filter_string: str | None = None, baseline: list[str] | None = None) -> Comparison:
    """The runs, their tables and curves, and the paired verdicts (``baseline``: ``--baseline KEY=VALUE`` specs)."""
    tracking_uri = tracking_uri or default_tracking_uri()
    client = _client(tracking_uri)
    runs, name, selection, experiment_id = select_runs(client, experiment, parent, filter_string)
    check_one_convention(runs)
    varied, fixed = varied_params(runs)
    metric_columns = [(key, label, fmt) for key, label, fmt in COLUMNS if any(key in r.data.metrics for r in runs)]
    show_status = any(r.info.status != "FINISHED" for r in runs)
    # nothing varies (e.g. one run): still say what the runs are
    shown = varied or [f"{g}.name" for g in GROUPS[:3] if any(f"{g}.name" in r.data.params for r in runs)]
    columns = [param_label(k) for k in shown] + ([] if varied else ["run name"])
    columns += [label for _, label, _ in metric_columns] + (["status"] if show_status else []) + ["run"]

    # each run by its display name (its MLflow run name: smoke · what varies · method · model) when every run has
    # one and they tell the runs apart; else one made the same way from the params that differ here
    display_names = [run.data.tags.get(DISPLAY_NAME_TAG) for run in runs]
    use_names = all(display_names) and len(set(display_names)) == len(display_names)
    rows, labels = [], []
    for run, display in zip(runs, display_names):
        params = run.data.params
        label = display if use_names else computed_label(run, varied)
        row: dict[str, Any] = {"run_id": run.info.run_id, "run_name": run.info.run_name,
                               "status": run.info.status, "label": label}
        row.update({param_label(k): params.get(k) for k in shown})
        if not varied:
            row["run name"] = run.info.run_name
        for key, col, _ in metric_columns:
            row[col] = run.data.metrics.get(key)
        row["run"] = run.info.run_id[:8]
        rows.append(row)
        labels.append(label)
    # labels name the runs in plots: make them unique
    for row in rows:
        if labels.count(row["label"]) > 1:
            row["label"] = f"{row['label']} ({row['run']})"

    shown_labels = {label for _, label, _ in metric_columns}
    smoke_note = smoke_runs_note(runs, rows)
    comparison = Comparison(name=name, selection=selection, tracking_uri=tracking_uri, experiment_id=experiment_id,
                            parent_run_id=parent, runs=runs, varied=varied, fixed=fixed, columns=columns, rows=rows,
                            tables={title: [label for _, label, _ in spec if label in shown_labels]
                                    for title, spec in (("scores", SCORE_COLUMNS), ("training", TRAINING_COLUMNS),
                                                        ("cost", COST_COLUMNS))},
                            smoke_note=smoke_note)
    from glm_experiments.study.human_eval_tracking import human_eval_columns

    comparison.tables["human eval"] = human_eval_columns(client, rows)  # blind A/B verdicts (glm_experiments.web)
    result_columns = comparison.tables["scores"] + comparison.tables["training"]
    if len(rows) > 1:  # a setting that changed nothing on a metric is a finding, say so
        comparison.identical = [col for col in result_columns
                                if len({row.get(col) for row in rows}) == 1 and rows[0].get(col) is not None]
    for run, row in zip(runs, rows):
        run_id = run.info.run_id
        comparison.loss_curves[row["label"]] = _history(client, run_id, "train/loss")
        pairs = {}
        for key in BEFORE_AFTER:
            if key not in run.data.metrics:
                continue
            history = _history(client, run_id, key)
            before = history[0][1] if len(history) > 1 and history[0][0] == 0 else None
            pairs[key] = (before, history[-1][1])
        comparison.before_after[row["label"]] = pairs
    from glm_experiments.study.paired import evaluated_at_names, paired_comparison

    comparison.paired = paired_comparison(client, runs, varied, short_label, param_aliases,
                                          metric_labels={key.split("/", 1)[1]: label for key, label in QUALITY},
                                          baseline=baseline, evaluated_at=evaluated_at_names(runs))
    from glm_experiments.study.samples import differing_samples

    comparison.sample_diffs = differing_samples(client, rows) if len(rows) > 1 else None
    return comparison


def compare_runs(tracking_uri: str | None = None, experiment: str | None = None, parent: str | None = None,
                 filter_string: str | None = None) -> list[dict[str, Any]]:
    """The comparison table: one dict per run (column label -> value, plus run_id, run_name, status, label)."""
    return collect(tracking_uri, experiment, parent, filter_string).rows


def format_value(value: Any, fmt: str | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt and isinstance(value, (int, float)):
        return fmt.format(value)
    return str(value)


def _formats() -> dict[str, str]:
    return {label: fmt for _, label, fmt in COLUMNS}


def table_cells(comparison: Comparison, columns: list[str] | None = None) -> list[list[str]]:
    formats = _formats()
    return [[format_value(row.get(col), formats.get(col)) for col in (columns or comparison.columns)] for row in comparison.rows]


def best_value(comparison: Comparison, col: str) -> Any:
    """The best value of a results column (lowest for losses and truncations, highest for scores)."""
    values = [row.get(col) for row in comparison.rows if isinstance(row.get(col), (int, float))]
    if len(values) < 2 or col in comparison.identical:
        return None
    return min(values) if ("loss" in col or col.startswith("cut")) else max(values)


def headlines(comparison: Comparison) -> list[str]:
    """The study in a few lines: per score that differs, the leading run and its margin over the next; then the
    truncation counts that differ (often the why)."""
    labels = [short_run_label(label) for label in distinct_labels([row["label"] for row in comparison.rows])]
    lines = []
    for col in comparison.tables.get("scores", []):
        ranked = sorted(((row[col], label) for row, label in zip(comparison.rows, labels)
                         if isinstance(row.get(col), (int, float))), key=lambda pair: -pair[0])
        if len(ranked) >= 2 and col not in comparison.identical:
            (top, leader), (second, runner_up) = ranked[:2]
            lines.append(f"{col}: {leader} leads with {top:.2f}, {top - second:+.2f} over {runner_up}")
    for col in ("cut train", "cut dev"):
        values = [(label, row.get(col)) for label, row in zip(labels, comparison.rows) if row.get(col) is not None]
        if col in comparison.tables.get("training", []) and len({v for _, v in values}) > 1:
            lines.append(f"{col} (samples truncated): " + ", ".join(f"{label} {value:,.0f}" for label, value in values))
    return lines
