"""compare's tables by setting: runs that differ only in ``seed`` are one setting, shown as mean ± sd over its seeds
with ``seeds`` (their number); and the cross-evaluation grid, trained-at (a row per setting) x evaluated-at (a
column per ``eval.at_lengths`` option), from the runs' ``eval/<lengths>/<metric>`` metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from glm_experiments.study.comparison import QUALITY, Comparison, _formats, short_run_label
from glm_experiments.study.paired import AT_LENGTHS_METRIC, evaluated_at_names
from glm_experiments.study.verdicts import seed_summary

NOT_SCORES = {"gen_seconds", "gen_samples_per_s"}  # logged beside the scores of every evaluation


@dataclass
class SettingRow:
    """One setting: its runs (seeds) and, per column, (mean, sd or None, how many runs had it)."""

    label: str
    run_ids: list[str]
    values: dict[str, tuple[float | None, float | None, int]] = field(default_factory=dict)

    def get(self, col: str) -> float | None:
        return self.values.get(col, (None, None, 0))[0]


def has_seeds(comparison: Comparison) -> bool:
    paired = comparison.paired
    return paired is not None and any(len(ids) > 1 for ids in paired.settings.values())


def _pooled(label: str, ids: list[str], value_of) -> SettingRow:
    row = SettingRow(label, ids)
    for col, values in value_of.items():
        row.values[col] = seed_summary(values)
    return row


def setting_rows(comparison: Comparison) -> list[SettingRow]:
    """Every metric column of the tables per setting (seeds pooled); empty unless some setting has several runs."""
    if not has_seeds(comparison):
        return []
    by_id = {row["run_id"]: row for row in comparison.rows}
    columns = [c for cols in comparison.tables.values() for c in cols]
    rows = []
    for name, ids in comparison.paired.settings.items():
        present = [i for i in ids if i in by_id]
        rows.append(_pooled(name, present, {col: [by_id[i].get(col) for i in present] for col in columns}))
    return rows


def cell(mean: float | None, sd: float | None, n: int, total: int, fmt: str = "{:.2f}") -> str:
    """``37.71 ± 0.59``; ``(2)`` after it where only 2 of the setting's runs have the value; ``-`` for none."""
    if mean is None:
        return "-"
    text = fmt.format(mean) + ("" if sd is None else " ± " + fmt.format(sd).lstrip("+"))
    return text + ("" if n == total else f" ({n})")


def setting_cells(rows: list[SettingRow], columns: list[str]) -> list[list[str]]:
    formats = _formats()
    return [[cell(*row.values.get(col, (None, None, 0)), len(row.run_ids), formats.get(col, "{:.2f}"))
             for col in columns] for row in rows]


def best_setting_value(rows: list[SettingRow], col: str, identical: list[str]) -> float | None:
    values = [row.get(col) for row in rows if isinstance(row.get(col), (int, float))]
    if len(values) < 2 or col in identical:
        return None
    return min(values) if ("loss" in col or col.startswith("cut")) else max(values)


def setting_headlines(comparison: Comparison, rows: list[SettingRow]) -> list[str]:
    """As comparison.headlines, by setting: the leading setting's mean over its seeds and its margin."""
    lines = []
    for col in comparison.tables.get("scores", []):
        ranked = sorted(((row.get(col), row) for row in rows if row.get(col) is not None), key=lambda p: -p[0])
        if len(ranked) >= 2 and col not in comparison.identical:
            (top, lead), (second, runner_up) = ranked[:2]
            lines.append(f"{col}: {short_run_label(lead.label)} leads with {top:.2f} (mean of {len(lead.run_ids)} "
                         f"seeds), {top - second:+.2f} over {short_run_label(runner_up.label)}")
    for col in ("cut train", "cut dev"):
        values = [(row.label, row.get(col)) for row in rows if row.get(col) is not None]
        if col in comparison.tables.get("training", []) and len({v for _, v in values}) > 1:
            lines.append(f"{col} (samples truncated): " + ", ".join(f"{short_run_label(label)} {value:,.0f}"
                                                                    for label, value in values))
    return lines


def study_headlines(comparison: Comparison) -> list[str]:
    """The headlines by setting where settings have several seeds, else by run."""
    from glm_experiments.study.comparison import headlines

    rows = setting_rows(comparison)
    return setting_headlines(comparison, rows) if rows else headlines(comparison)


def grid(comparison: Comparison) -> list[tuple[str, list[str], list[list[str]]]]:
    """The cross-evaluation grid, one per metric: (metric label, header, cells), rows the settings (trained at;
    seeds pooled: mean ± sd) and columns the evaluated-at lengths options; empty without eval.at_lengths."""
    names = evaluated_at_names(comparison.runs)
    if not names:
        return []
    labels = dict((key.split("/", 1)[1], label) for key, label in QUALITY)
    runs = {r.info.run_id: r for r in comparison.runs}
    if comparison.paired is not None and comparison.paired.settings:
        settings = comparison.paired.settings
    else:
        settings = {row["label"]: [row["run_id"]] for row in comparison.rows}
    metrics = list(dict.fromkeys(m.group(2) for r in comparison.runs for k in sorted(r.data.metrics)
                                 if (m := AT_LENGTHS_METRIC.match(k)) and m.group(1) in names
                                 and m.group(2) not in NOT_SCORES))
    order = list(labels)  # BLEU-4, ROUGE-1/2/L, F1, acc. first, as in the scores table; a data config's own after
    metrics.sort(key=lambda m: order.index(m) if m in order else len(order))
    tables = []
    for metric in metrics:
        cells = []
        for setting, ids in settings.items():
            row = [setting]
            for name in names:
                values = [runs[i].data.metrics.get(f"eval/{name}/{metric}") for i in ids if i in runs]
                row.append(cell(*seed_summary(values), len(values)))
            cells.append(row)
        tables.append((labels.get(metric, metric), ["trained at \\ evaluated at", *names], cells))
    return tables



def pooled_table(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """(header, cells) for the reports: per setting its seeds and the score and training columns as mean ± sd;
    empty unless some setting has several runs."""
    rows = setting_rows(comparison)
    if not rows:
        return [], []
    columns = comparison.tables.get("scores", []) + comparison.tables.get("training", [])
    cells = [[row.label, str(len(row.run_ids)), *values] for row, values in zip(rows, setting_cells(rows, columns))]
    return ["setting", "seeds", *columns], cells


def grid_markdown(comparison: Comparison) -> list[str]:
    tables = grid(comparison)
    if not tables:
        return []
    lines = ["## Cross-evaluation: trained at x evaluated at", "",
             "Each setting's trained models evaluated again at every `eval.at_lengths` option (mean ± sd over seeds); "
             "the verdicts above compare the settings per evaluated-at column (`<metric> at <lengths>`).", ""]
    for metric, header, cells in tables:
        lines += [f"**{metric}**", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells] + [""]
    return lines


def grid_html(comparison: Comparison) -> str:
    import html

    tables = grid(comparison)
    if not tables:
        return ""
    parts = ["<h2>Cross-evaluation: trained at x evaluated at</h2>"]
    for metric, header, cells in tables:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
        parts.append(f"<h3>{html.escape(metric)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    return "".join(parts)
