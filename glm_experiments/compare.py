"""Compare tracked runs: which params vary, the final metrics, the curves.

    python -m glm_experiments.compare --experiment method_comparison
    python -m glm_experiments.compare --parent <sweep parent run id> [--filter "params.method.name = 'lora'"]
    python -m glm_experiments.compare --tracking-uri sqlite:///mlflow.db --experiment glm_experiments --out cmp/

Selects the runs (the children of a sweep's parent run, or every training run of an experiment), works out
which params differ between them, names each run by those values (``src=512 tgt=128``) and prints three
tables that fit a 100-column terminal: scores (BLEU-4, ROUGE-1/2/L, F1, accuracy; the best in green),
training (final train loss, eval loss, samples truncated in train / dev) and cost (trainable %, peak memory,
and the one-off timings, marked as such); metrics identical in every run are named. Writes into --out
(default ``./comparisons/<name>/``):

* ``loss_curves.png``   train/loss per run, overlaid
* ``final_metrics.png`` grouped bars of the final quality metrics per run (+ trainable %, memory, speed)
* ``report.md``         the tables, before/after training, the params all runs share, links to the PNGs
* ``report.html``       the same with the plots embedded (MLflow's artifact view renders it)

and logs them as artifacts (``comparison/``) to the parent run (``--parent``, or with ``--experiment`` the
experiment's latest sweep parent), else to the experiment's one ``comparison`` run, made on first use.
``compare_runs(...)`` returns the table rows for programmatic use.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm_experiments.errors import UserError, cli_main
from glm_experiments.naming import SHORT_NAMES

ROLE_TAG = "glm_experiments.role"  # same tag as glm_experiments.tracking.sweep
NOT_TRAINING_RUNS = {"sweep_parent", "comparison", "human_eval"}

# params that always differ between runs and say nothing about the setting
IGNORED_PARAMS = {"output_dir", "tracking.run_name", "tracking.experiment_name", "tracking.tracking_uri",
                  "tracking.artifact_location"}
# a group whose choice varies: its other params follow from the choice, show only the choice
GROUPS = ("method", "model", "data", "deepspeed")

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
LABEL_WIDTH = 28
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


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def collect(tracking_uri: str | None = None, experiment: str | None = None, parent: str | None = None,
            filter_string: str | None = None) -> Comparison:
    tracking_uri = tracking_uri or default_tracking_uri()
    client = _client(tracking_uri)
    runs, name, selection, experiment_id = select_runs(client, experiment, parent, filter_string)
    varied, fixed = varied_params(runs)
    metric_columns = [(key, label, fmt) for key, label, fmt in COLUMNS if any(key in r.data.metrics for r in runs)]
    show_status = any(r.info.status != "FINISHED" for r in runs)
    # nothing varies (e.g. one run): still say what the runs are
    shown = varied or [f"{g}.name" for g in GROUPS[:3] if any(f"{g}.name" in r.data.params for r in runs)]
    columns = [param_label(k) for k in shown] + ([] if varied else ["run name"])
    columns += [label for _, label, _ in metric_columns] + (["status"] if show_status else []) + ["run"]

    rows, labels = [], []
    for run in runs:
        params = run.data.params
        label = " ".join(short_label(k, params.get(k)) for k in varied) or (run.info.run_name or run.info.run_id[:8])
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
    comparison = Comparison(name=name, selection=selection, tracking_uri=tracking_uri, experiment_id=experiment_id,
                            parent_run_id=parent, runs=runs, varied=varied, fixed=fixed, columns=columns, rows=rows,
                            tables={title: [label for _, label, _ in spec if label in shown_labels]
                                    for title, spec in (("scores", SCORE_COLUMNS), ("training", TRAINING_COLUMNS),
                                                        ("cost", COST_COLUMNS))})
    from glm_experiments.human_eval import human_eval_columns

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
    return comparison


def compare_runs(tracking_uri: str | None = None, experiment: str | None = None, parent: str | None = None,
                 filter_string: str | None = None) -> list[dict[str, Any]]:
    """The comparison table: one dict per run (column label -> value, plus run_id, run_name, status, label)."""
    return collect(tracking_uri, experiment, parent, filter_string).rows


def _fmt(value: Any, fmt: str | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt and isinstance(value, (int, float)):
        return fmt.format(value)
    return str(value)


def _formats() -> dict[str, str]:
    return {label: fmt for _, label, fmt in COLUMNS}


def table_cells(comparison: Comparison, columns: list[str] | None = None) -> list[list[str]]:
    formats = _formats()
    return [[_fmt(row.get(col), formats.get(col)) for col in (columns or comparison.columns)] for row in comparison.rows]


def short_run_label(label: str, width: int = LABEL_WIDTH) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def _best(comparison: Comparison, col: str) -> Any:
    """The best value of a results column (lowest for losses and truncations, highest for scores)."""
    values = [row.get(col) for row in comparison.rows if isinstance(row.get(col), (int, float))]
    if len(values) < 2 or col in comparison.identical:
        return None
    return min(values) if ("loss" in col or col.startswith("cut")) else max(values)


def print_table(comparison: Comparison, console=None) -> None:
    """Three narrow tables (results, cost, which run is which) that fit a 100-column terminal."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: the tables are sized for 100 columns anyway
            console = Console(width=100)
    labels = [short_run_label(row["label"]) for row in comparison.rows]

    def metric_table(title: str, columns: list[str], mark_best: bool) -> Table:
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
        table.add_column("run", no_wrap=True, max_width=LABEL_WIDTH)
        for col in columns:
            table.add_column(col, justify="right", no_wrap=True)
        for label, row, cells in zip(labels, comparison.rows, table_cells(comparison, columns)):
            styled = [f"[bold green]{cell}[/]" if mark_best and row.get(col) is not None and row.get(col) == _best(comparison, col)
                      else cell for col, cell in zip(columns, cells)]
            table.add_row(label, *styled)
        return table

    console.print(f"[bold]{comparison.name}[/]: {len(comparison.rows)} runs (best in green)")
    for title, columns in comparison.tables.items():
        if columns:
            console.print(metric_table(title, columns, title != "cost"))
    if comparison.identical:
        console.print(f"[yellow]identical in every run:[/] {', '.join(comparison.identical)}")
    if any(c.endswith("*") for c in comparison.tables["cost"]):
        console.print(TIMING_NOTE, style="dim")
    runs = Table(title="runs", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    runs.add_column("run", no_wrap=True, max_width=LABEL_WIDTH)
    runs.add_column("run id", no_wrap=True)
    runs.add_column("status", no_wrap=True)
    runs.add_column("MLflow run name", overflow="fold")
    for label, row in zip(labels, comparison.rows):
        runs.add_row(label, row["run_id"][:8], row["status"], row["run_name"] or "")
    console.print(runs)
    if comparison.varied:
        console.print(f"varied: {', '.join(comparison.varied)}; {len(comparison.fixed)} params identical in every run")


# --------------------------------------------------------------------------- plots
def legend_label(label: str, width: int = 36, limit: int = 90) -> str:
    """Runs differing in many params get long labels: shorten and wrap them so the axes keep their room."""
    import textwrap

    short = label if len(label) <= limit else label[: limit - 1] + "…"
    return "\n".join(textwrap.wrap(short, width)) or label


def plot_loss_curves(comparison: Comparison, path: Path) -> Path | None:
    curves = {label: points for label, points in comparison.loss_curves.items() if points}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for label, points in curves.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3, label=legend_label(label))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("train/loss")
    ax.set_title(f"{comparison.name}: training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def plot_final_metrics(comparison: Comparison, path: Path) -> Path | None:
    rows = comparison.rows
    quality = [label for _, label in QUALITY if any(row.get(label) is not None for row in rows)]
    extra = [label for label in ("trainable %", "GPU peak MiB", "RSS peak MiB", "tokens/s")
             if any(row.get(label) is not None for row in rows)]
    if not quality and not extra:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(8, 1.2 * len(rows) * max(len(quality), 1) / 2)
    fig = plt.figure(figsize=(width, 4.5 + (3.2 if extra else 0)))
    grid = fig.add_gridspec(2 if quality and extra else 1, max(len(extra), 1))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if quality:
        ax = fig.add_subplot(grid[0, :])
        bar = 0.8 / len(rows)
        for i, row in enumerate(rows):
            xs = [j + (i - (len(rows) - 1) / 2) * bar for j in range(len(quality))]
            values = [_number(row.get(label)) for label in quality]
            bars = ax.bar(xs, values, bar, label=legend_label(row["label"]), color=colors[i % len(colors)])
            if len(rows) * len(quality) <= 40:  # a missing value is a gap, not a zero
                ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.1f}" for v in values], fontsize=6, padding=1)
        ax.set_xticks(range(len(quality)), quality)
        ax.set_ylabel("score (x100)")
        ax.set_title(f"{comparison.name}: final metrics")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small", ncol=max(1, min(len(rows), 3)))
    for k, label in enumerate(extra):
        ax = fig.add_subplot(grid[1 if quality else 0, k])
        values = [_number(row.get(label)) for row in rows]
        ax.bar(range(len(rows)), values, color=[colors[i % len(colors)] for i in range(len(rows))])
        names = [row["label"] if len(row["label"]) <= 16 else row["label"][:15] + "…" for row in rows]
        ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=6)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------- report
def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def markdown_report(comparison: Comparison, images: dict[str, str]) -> str:
    lines = [f"# Comparison: {comparison.name}", "",
             f"{len(comparison.rows)} {comparison.selection}; tracking URI `{comparison.tracking_uri}`.", ""]
    if comparison.varied:
        lines += [f"Varied params: {', '.join(f'`{k}`' for k in comparison.varied)}. "
                  f"Every other param is identical in all runs (listed below).", ""]
    else:
        lines += ["No param differs between these runs.", ""]
    for title, columns in comparison.tables.items():
        if not columns:
            continue
        lines += [f"## {title.capitalize()}", "", "| run | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for row, cells in zip(comparison.rows, table_cells(comparison, columns)):
            best = [f"**{c}**" if title != "cost" and row.get(col) is not None and row.get(col) == _best(comparison, col)
                    else c for col, c in zip(columns, cells)]
            lines.append(f"| {_md_escape(row['label'])} | " + " | ".join(best) + " |")
        lines.append("")
        if title == "cost" and any(c.endswith("*") for c in columns):
            lines += [TIMING_NOTE, ""]
    if comparison.identical:
        lines += [f"Identical in every run: {', '.join(comparison.identical)}.", ""]
    if "cut train" in comparison.tables["training"]:
        lines += ["`cut train` / `cut dev`: samples that max_source_length / max_target_length truncated.", ""]
    labels = [label for key, label in QUALITY if any(key in pairs for pairs in comparison.before_after.values())]
    if labels:
        keys = dict((label, key) for key, label in QUALITY)
        lines += ["## Before / after training", "", "Generation metrics at step 0 (before training) -> after the last step.", "",
                  "| run | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        for label, pairs in comparison.before_after.items():
            cells = []
            for metric in labels:
                before, after = pairs.get(keys[metric], (None, None))
                cells.append("-" if after is None else f"{_fmt(before, '{:.2f}')} -> {after:.2f}")
            lines.append(f"| {_md_escape(label)} | " + " | ".join(cells) + " |")
        lines.append("")
    if images:
        lines += ["## Plots", ""]
        for title, file in images.items():
            lines += [f"![{title}]({file})", ""]
    lines += ["## Runs", "", "| label | run id | run name | status |", "|---|---|---|---|"]
    for row in comparison.rows:
        lines.append(f"| {_md_escape(row['label'])} | `{row['run_id']}` | {_md_escape(row['run_name'] or '')} "
                     f"| {row['status']} |")
    lines.append("")
    if comparison.fixed:
        lines += ["<details><summary>Params shared by every run</summary>", "", "| param | value |", "|---|---|"]
        lines += [f"| `{k}` | {_md_escape(v)[:200]} |" for k, v in comparison.fixed.items()]
        lines += ["", "</details>", ""]
    return "\n".join(lines)


def html_report(comparison: Comparison, out_dir: Path, images: dict[str, str]) -> str:
    """The report as one HTML page with the plots embedded: MLflow's artifact view renders it as a page
    (a .md artifact is shown as plain text, its image links dead)."""
    import base64
    import html

    import pandas as pd

    parts = [f"<h1>Comparison: {html.escape(comparison.name)}</h1>",
             f"<p>{len(comparison.rows)} {html.escape(comparison.selection.replace('`', ''))}</p>"]
    for title, columns in comparison.tables.items():
        if columns:
            frame = pd.DataFrame(table_cells(comparison, columns), columns=columns,
                                 index=[row["label"] for row in comparison.rows])
            parts += [f"<h2>{title.capitalize()}</h2>", frame.to_html(border=0)]
    if comparison.identical:
        parts.append(f"<p>Identical in every run: {html.escape(', '.join(comparison.identical))}.</p>")
    if comparison.tables["cost"]:
        parts.append(f"<p><small>{html.escape(TIMING_NOTE)}</small></p>")
    for title, file in images.items():
        data = base64.b64encode((out_dir / file).read_bytes()).decode()
        parts.append(f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">')
    style = "body{font-family:sans-serif} table{border-collapse:collapse} td,th{padding:2px 8px;text-align:right}"
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{''.join(parts)}</body></html>"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80] or "comparison"


def write_outputs(comparison: Comparison, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    images: dict[str, str] = {}
    if plot_loss_curves(comparison, out_dir / "loss_curves.png"):
        files["loss_curves"] = out_dir / "loss_curves.png"
        images["training loss"] = "loss_curves.png"
    if plot_final_metrics(comparison, out_dir / "final_metrics.png"):
        files["final_metrics"] = out_dir / "final_metrics.png"
        images["final metrics"] = "final_metrics.png"
    report = out_dir / "report.md"
    report.write_text(markdown_report(comparison, images), encoding="utf-8")
    files["report"] = report
    files["report_html"] = out_dir / "report.html"
    files["report_html"].write_text(html_report(comparison, out_dir, images), encoding="utf-8")
    return files


def _study_run(client, comparison: Comparison) -> str | None:
    """Where a comparison of a whole experiment belongs: its latest sweep parent, else the comparison run an
    earlier call made (so calling compare again does not add a run each time)."""
    for role in ("sweep_parent", "comparison"):
        found = client.search_runs([comparison.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = '{role}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            return found[0].info.run_id
    return None


def log_outputs(comparison: Comparison, out_dir: Path) -> str:
    """Artifacts under ``comparison/`` of the parent run (``--parent``, or the experiment's latest sweep parent),
    else of the experiment's one ``comparison`` run, created on first use. Returns its id."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=comparison.tracking_uri)
    run_id = comparison.parent_run_id or _study_run(client, comparison)
    if run_id is None:
        run = client.create_run(comparison.experiment_id, run_name=f"comparison-{comparison.name}"[:200], tags={
            ROLE_TAG: "comparison",
            "compare.selection": comparison.selection[:5000],
            "compare.runs": " ".join(r["run_id"] for r in comparison.rows)[:5000],
            "compare.varied": " ".join(comparison.varied)[:5000] or "(none)",
        })
        run_id = run.info.run_id
        client.set_terminated(run_id, "FINISHED")
    client.log_artifacts(run_id, str(out_dir), "comparison")  # a later call replaces the files
    return run_id


# ----------------------------------------------------------------------------- CLI
@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_experiments.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="compare the training runs of this experiment")
    which.add_argument("--parent", help="compare the child runs of this (sweep parent) run id")
    parser.add_argument("--filter", default=None, help="extra MLflow filter, e.g. \"params.method.name = 'lora'\" "
                        "or \"attributes.status = 'FINISHED'\"")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default ./comparisons/<name>/)")
    parser.add_argument("--no-log", action="store_true", help="do not log the outputs to MLflow")
    args = parser.parse_args(argv)
    comparison = collect(args.tracking_uri, args.experiment, args.parent, args.filter)
    print_table(comparison)
    out_dir = args.out or Path("comparisons") / slug(comparison.name)
    files = write_outputs(comparison, out_dir)
    for path in files.values():
        print(f"wrote {path}")
    if not args.no_log:
        run_id = log_outputs(comparison, out_dir)
        print(f"logged to run {run_id} (artifacts: comparison/; open comparison/report.html in the MLflow UI)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
