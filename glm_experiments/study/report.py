"""The files a comparison writes (loss curves, final-metrics bars, report.md, report.html) and their logging to
MLflow; compare.py selects the runs and prints the tables."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from glm_experiments.study.comparison import (
    QUALITY,
    ROLE_TAG,
    TIMING_NOTE,
    Comparison,
    best_value,
    format_value,
    table_cells,
)

VERDICTS_FILE = "verdicts.json"


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
    from glm_experiments.study.paired import markdown_section
    from glm_experiments.study.settings import grid_markdown, pooled_table, study_headlines

    lines = [f"# Comparison: {comparison.name}", "",
             f"{len(comparison.rows)} {comparison.selection}; tracking URI `{comparison.tracking_uri}`.", ""]
    if comparison.smoke_note:  # above everything, the verdicts too
        lines += [f"**{comparison.smoke_note}**", ""]
    lines += markdown_section(comparison.paired)  # the verdicts first
    header, cells = pooled_table(comparison)
    if cells:
        lines += ["Scores over seeds: mean ± sd over the runs of each setting (runs that differ only in `seed`).", "",
                  "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in cells] + [""]
    lines += grid_markdown(comparison)
    if comparison.varied:
        lines += [f"Varied params: {', '.join(f'`{k}`' for k in comparison.varied)}. "
                  f"Every other param is identical in all runs (listed below).", ""]
    else:
        lines += ["No param differs between these runs.", ""]
    lines += [f"* {line}" for line in study_headlines(comparison)] + [""]
    for title, columns in comparison.tables.items():
        if not columns:
            continue
        lines += [f"## {title.capitalize()}", "", "| run | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for row, cells in zip(comparison.rows, table_cells(comparison, columns)):
            best = [f"**{c}**" if title != "cost" and row.get(col) is not None and row.get(col) == best_value(comparison, col)
                    else c for col, c in zip(columns, cells)]
            lines.append(f"| {_md_escape(row['label'])} | " + " | ".join(best) + " |")
        lines.append("")
        if title == "cost" and any(c.endswith("*") for c in columns):
            lines += [TIMING_NOTE, ""]
    if comparison.identical:
        lines += [f"Identical in every run: {', '.join(comparison.identical)}", ""]
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
                cells.append("-" if after is None else f"{format_value(before, '{:.2f}')} -> {after:.2f}")
            lines.append(f"| {_md_escape(label)} | " + " | ".join(cells) + " |")
        lines.append("")
    from glm_experiments.study.samples import markdown_section as samples_section

    lines += samples_section(comparison.sample_diffs)
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

    from glm_experiments.study.paired import html_section
    from glm_experiments.study.settings import grid_html, pooled_table, study_headlines

    parts = [f"<h1>Comparison: {html.escape(comparison.name)}</h1>",
             f"<p>{len(comparison.rows)} {html.escape(comparison.selection.replace('`', ''))}</p>",
             *([f"<p><strong>{html.escape(comparison.smoke_note)}</strong></p>"] if comparison.smoke_note else []),
             html_section(comparison.paired)]  # the verdicts first (after the smoke-run note)
    header, cells = pooled_table(comparison)
    if cells:
        parts += ["<p>Scores over seeds: mean ± sd over the runs of each setting.</p>",
                  pd.DataFrame(cells, columns=header).to_html(border=0, index=False)]
    parts.append(grid_html(comparison))
    lines = study_headlines(comparison)
    if lines:
        parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>")
    for title, columns in comparison.tables.items():
        if columns:
            frame = pd.DataFrame(table_cells(comparison, columns), columns=columns,
                                 index=[row["label"] for row in comparison.rows])
            parts += [f"<h2>{title.capitalize()}</h2>", frame.to_html(border=0)]
    if comparison.identical:
        parts.append(f"<p>Identical in every run: {html.escape(', '.join(comparison.identical))}</p>")
    if comparison.tables["cost"]:
        parts.append(f"<p><small>{html.escape(TIMING_NOTE)}</small></p>")
    from glm_experiments.study.samples import html_section as samples_section

    parts.append(samples_section(comparison.sample_diffs))
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
    paired = comparison.paired
    if paired is not None and paired.table is not None:  # machine-readable verdicts (logged with the rest)
        files["verdicts"] = out_dir / VERDICTS_FILE
        files["verdicts"].write_text(json.dumps(paired.table.to_json(), indent=2) + "\n", encoding="utf-8")
    elif (out_dir / VERDICTS_FILE).exists():  # an earlier comparison's verdicts would be taken for these
        (out_dir / VERDICTS_FILE).unlink()
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
    log_verdicts(client, run_id, comparison)
    return run_id


def log_verdicts(client, run_id: str, comparison: Comparison) -> None:
    """The verdicts on the run: metrics ``verdict/<setting>/<metric>/delta|ci_low|ci_high|p`` and the sentences
    first in its description (replacing an earlier compare's)."""
    import time

    from mlflow.entities import Metric

    from glm_experiments.study.paired import with_description

    paired = comparison.paired
    if paired is not None and paired.table is not None:
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, 0) for key, value in paired.table.metrics().items()]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1,000 metrics a batch
            client.log_batch(run_id, metrics=metrics[start:start + 1000])
    note = "mlflow.note.content"
    text = with_description(client.get_run(run_id).data.tags.get(note), paired)
    if text is not None:
        client.set_tag(run_id, note, text if len(text) <= 5000 else text[:4999] + "…")  # MLflow's tag limit
