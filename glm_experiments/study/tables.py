"""compare's console output: the headlines, the verdicts, the cross-evaluation grid and the narrow tables (scores,
training, cost, human eval, runs), each fitting a 100-column terminal. Settings with several seeds are one row,
mean ± sd over their seeds with a ``seeds`` column (study/settings.py)."""

from __future__ import annotations

from glm_experiments.study.comparison import (
    LABEL_WIDTH,
    TIMING_NOTE,
    Comparison,
    best_value,
    headlines,
    short_run_label,
    table_cells,
)
from glm_experiments.study.settings import best_setting_value, grid, setting_cells, setting_headlines, setting_rows


def _table(title: str):
    from rich import box
    from rich.table import Table

    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)


def print_verdicts(comparison: Comparison, console) -> None:
    """The paired verdicts, one setting at a time, a metric (and evaluated-at length) a line."""
    from glm_experiments.study.verdicts import row_phrase

    paired = comparison.paired
    if paired is None:
        return
    if paired.table is not None:
        console.print(f"[bold]verdicts[/] against {paired.table.baseline} (95 % paired bootstrap intervals; "
                      "report.md has p-values):", highlight=False)
        for setting in paired.table.settings():  # the sentence, a metric a line
            rows = [r for r in paired.table.rows if r.setting == setting]
            console.print(f"  {setting} vs {paired.table.baseline}:", highlight=False)
            for row in rows:
                console.print(f"    {row_phrase(row)}", highlight=False)
    for note in paired.notes:
        console.print(f"  {note}", style="dim", highlight=False)


def print_grid(comparison: Comparison, console) -> None:
    """eval.at_lengths: per metric, trained at (rows) x evaluated at (columns), mean ± sd over seeds."""
    for metric, header, cells in grid(comparison):
        console.print(f"{metric}: trained at (rows) x evaluated at (columns)", style="italic", highlight=False)
        table = _table("")  # the title above: a title as wide as a one-column table would wrap
        for i, col in enumerate(header):
            table.add_column(col, justify="left" if i == 0 else "right", no_wrap=True,
                             max_width=LABEL_WIDTH if i == 0 else None)
        for row in cells:
            table.add_row(short_run_label(row[0]), *row[1:])
        console.print(table)


def print_table(comparison: Comparison, console=None) -> None:
    """The headlines, verdicts and grid, then the narrow tables: per run, or per setting (seeds pooled)."""
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: the tables are sized for 100 columns anyway
            console = Console(width=100)
    labels = [short_run_label(row["label"]) for row in comparison.rows]
    pooled = setting_rows(comparison)

    def metric_table(title: str, columns: list[str], mark_best: bool):
        table = _table(title + (" (mean ± sd over seeds)" if pooled and title != "human eval" else ""))
        table.add_column("setting" if pooled and title != "human eval" else "run", no_wrap=True,
                         max_width=LABEL_WIDTH)
        if pooled and title != "human eval":
            table.add_column("seeds", justify="right", no_wrap=True)
            for col in columns:
                table.add_column(col, justify="right", no_wrap=True)
            for row, cells in zip(pooled, setting_cells(pooled, columns)):
                styled = [f"[bold green]{c}[/]" if mark_best and row.get(col) is not None
                          and row.get(col) == best_setting_value(pooled, col, comparison.identical) else c
                          for col, c in zip(columns, cells)]
                table.add_row(short_run_label(row.label), str(len(row.run_ids)), *styled)
            return table
        for col in columns:  # the other run of a human eval: named in full in the report, cut here to fit 100 columns
            table.add_column(col, justify="right", no_wrap=True, max_width=14 if col == "vs" else None)
        for label, row, cells in zip(labels, comparison.rows, table_cells(comparison, columns)):
            styled = [f"[bold green]{cell}[/]" if mark_best and row.get(col) is not None and row.get(col) == best_value(comparison, col)
                      else cell for col, cell in zip(columns, cells)]
            table.add_row(label, *styled)
        return table

    what = f"{len(comparison.rows)} runs" + (f", {len(pooled)} settings" if pooled else "")
    console.print(f"[bold]{comparison.name}[/]: {what} (best in green)")
    if comparison.smoke_note:
        console.print(f"[bold yellow]{comparison.smoke_note}[/]", highlight=False)
    for line in (setting_headlines(comparison, pooled) if pooled else headlines(comparison)):
        console.print(f"  {line}", highlight=False)
    print_verdicts(comparison, console)
    print_grid(comparison, console)
    for title, columns in comparison.tables.items():
        if columns:
            console.print(metric_table(title, columns, title != "cost"))
    if comparison.identical:
        console.print(f"[yellow]identical in every run:[/] {', '.join(comparison.identical)}")
    if any(c.endswith("*") for c in comparison.tables["cost"]):
        console.print(TIMING_NOTE, style="dim")
    runs = _table("runs")
    runs.add_column("run", no_wrap=True, max_width=LABEL_WIDTH)
    runs.add_column("run id", no_wrap=True)
    runs.add_column("status", no_wrap=True)
    named = any((row["run_name"] or "") != row["label"] for row in comparison.rows)  # else the name is the label
    if named:
        runs.add_column("MLflow run name", overflow="fold")
    for label, row in zip(labels, comparison.rows):
        runs.add_row(label, row["run_id"][:8], row["status"], *([row["run_name"] or ""] if named else []))
    console.print(runs)
    if comparison.varied:
        console.print(f"varied: {', '.join(comparison.varied)}; {len(comparison.fixed)} params identical in every run")
