"""The dev samples on which two runs of a comparison differ most (report.md / report.html): per sample the input,
how many source tokens each run's length cut, both scores and both predictions, read from the runs'
``predictions/after.json`` tables (recipe/evaluation.py). Which two runs: the best and the worst on the metric."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from glm_experiments.study.paired import PREDICTIONS_TABLE, load_predictions

METRICS = ("rouge-l", "bleu-4", "accuracy", "triple_f1", "rouge-1", "rouge-2")  # the first one the tables have
SHOWN = 5


@dataclass
class SampleDiffs:
    metric: str
    labels: tuple[str, str]  # (the run ahead on the metric, the run behind)
    rows: list[dict[str, Any]]  # input, reference, and per run: cut, score, prediction (keys 0 / 1)


def _records(table: dict) -> list[dict]:
    columns = list(table.get("columns") or [])
    return [dict(zip(columns, record)) for record in table.get("data") or []]


def _keyed(records: list[dict]) -> dict[str, dict]:
    """Records by input text (the k-th repeat of an input matches the k-th repeat in the other table)."""
    out, seen = {}, {}
    for record in records:
        text = str(record.get("input", ""))
        repeat = seen[text] = seen.get(text, -1) + 1
        out[text if repeat == 0 else f"{text}\x00{repeat}"] = record
    return out


def differing_samples(client, rows: list[dict], shown: int = SHOWN, load=load_predictions) -> SampleDiffs | None:
    """The ``shown`` samples with the largest score difference between the best and the worst run (``rows``:
    compare's rows, with ``run_id`` and ``label``); None with fewer than two tables or no shared metric."""
    tables = []
    for row in rows:
        table = load(client, row["run_id"], PREDICTIONS_TABLE)
        if table:
            tables.append((row, _keyed(_records(table))))
    if len(tables) < 2:
        return None
    metric = next((m for m in METRICS if all(m in next(iter(t.values()), {}) for _, t in tables)), None)
    if metric is None:
        return None

    def mean(keyed: dict) -> float:
        values = [float(r[metric]) for r in keyed.values() if isinstance(r.get(metric), (int, float))]
        return sum(values) / len(values) if values else float("-inf")

    ranked = sorted(tables, key=lambda pair: -mean(pair[1]))
    (row_a, a), (row_b, b) = ranked[0], ranked[-1]
    shared = [key for key in a if key in b]
    shared.sort(key=lambda key: -abs(float(a[key].get(metric) or 0) - float(b[key].get(metric) or 0)))
    out = []
    for key in shared[:shown]:
        out.append({"input": a[key].get("input", ""), "reference": a[key].get("reference", ""),
                    **{f"{name}{i}": side[key].get(column) for i, side in enumerate((a, b))
                       for name, column in (("cut", "source_tokens_cut"), ("score", metric),
                                            ("prediction", "prediction"))}})
    return SampleDiffs(metric, (row_a["label"], row_b["label"]), out)


def _cut(value) -> str:
    return "-" if value is None else f"{value:,}"


def markdown_section(diffs: SampleDiffs | None) -> list[str]:
    if diffs is None or not diffs.rows:
        return []
    a, b = diffs.labels
    escape = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [f"## Samples that differ most ({diffs.metric})", "",
             f"A = {escape(a)}, B = {escape(b)}; cut = source tokens max_source_length cut from the prompt "
             f"(`source_tokens_cut` in each run's {PREDICTIONS_TABLE}).", "",
             f"| input | reference | cut A | cut B | {diffs.metric} A | {diffs.metric} B | A wrote | B wrote |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for row in diffs.rows:
        lines.append(f"| {escape(row['input'])[:80]} | {escape(row['reference'])[:60]} | {_cut(row['cut0'])} | "
                     f"{_cut(row['cut1'])} | {row['score0']} | {row['score1']} | {escape(row['prediction0'])[:60]} | "
                     f"{escape(row['prediction1'])[:60]} |")
    return lines + [""]


def html_section(diffs: SampleDiffs | None) -> str:
    import html

    lines = markdown_section(diffs)
    if not lines:
        return ""
    a, b = diffs.labels
    head = (f"<h2>Samples that differ most ({html.escape(diffs.metric)})</h2><p>A = {html.escape(a)}, "
            f"B = {html.escape(b)}; cut = source tokens max_source_length cut from the prompt</p>")
    cells = ["input", "reference", "cut A", "cut B", f"{diffs.metric} A", f"{diffs.metric} B", "A wrote", "B wrote"]
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            row["input"], row["reference"], _cut(row["cut0"]), _cut(row["cut1"]), row["score0"], row["score1"],
            row["prediction0"], row["prediction1"])) + "</tr>"
        for row in diffs.rows)
    return head + "<table><tr>" + "".join(f"<th>{c}</th>" for c in cells) + f"</tr>{body}</table>"
