"""compare's paired comparison: the runs' per-sample scores (their ``predictions/after.json`` tables), the runs
grouped into settings (seeds pooled), the baseline, and the verdict table (glm_experiments.study.verdicts).

A setting is the values of the varied params other than the seed: runs that differ only in ``seed`` are one
setting, and a sample's score for it is the mean over those runs. Samples are matched by their input text (the
k-th repeat of one input matches the k-th repeat elsewhere).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm_experiments.errors import UserError
from glm_experiments.study.verdicts import AT, VerdictTable, verdict_table

PREDICTIONS_TABLE = "predictions/after.json"  # the per-sample scores after training (train.Evaluator, tag "after")
AT_LENGTHS_TABLE = "predictions/{}/after.json"  # the same at another length (eval.at_lengths=[<name>, ...])
AT_LENGTHS_METRIC = re.compile(r"^eval/([^/]+)/([^/]+)$")  # eval/<lengths option>/<metric>
AT_LENGTHS_PARAM = "eval.at_lengths"
SEED_PARAM = "seed"
# the table's columns that are not scores: text, and the tokens max_source_length cut (recipe/evaluation.py)
NOT_SCORES = {"input", "reference", "prediction", "history", "prompt", "prompt_seen", "source_tokens_cut"}
DATA_PARAMS = ("data.name", "data.dev_file", "data.validation_file", "eval.max_samples")  # change the dev set


class BaselineError(UserError):
    pass


@dataclass
class PairedComparison:
    table: VerdictTable | None               # None: no verdicts (see notes)
    settings: dict[str, list[str]]           # setting name -> its run ids, in sweep order
    notes: list[str] = field(default_factory=list)  # why runs or metrics were left out, or why there are no verdicts


def setting_name(params: Mapping[str, str], varied: Sequence[str], label: Callable[[str, str | None], str]) -> str:
    """The run's setting: its varied params except the seed, as compare labels them (``src=512 tgt=128``)."""
    return " ".join(label(k, params.get(k)) for k in varied if k != SEED_PARAM) or "all runs"


def group_settings(runs: Sequence[Any], varied: Sequence[str], label: Callable[[str, str | None], str]) -> dict[str, list]:
    """Setting name -> its runs, in the order the settings first appear (sweep order)."""
    settings: dict[str, list] = {}
    for run in runs:
        settings.setdefault(setting_name(run.data.params, varied, label), []).append(run)
    return settings


def keyed_scores(table: Mapping[str, Any], where: str) -> dict[str, dict[str, float]]:
    """``{metric: {sample key: score}}`` from one MLflow table (``{"columns": [...], "data": [[...]]}``)."""
    columns = list(table.get("columns") or [])
    if "input" not in columns:
        raise UserError(f"{where}: the predictions table has no 'input' column to match samples by")
    position = columns.index("input")
    metrics = [c for c in columns if c not in NOT_SCORES]
    out: dict[str, dict[str, float]] = {m: {} for m in metrics}
    seen: dict[str, int] = {}
    for record in table.get("data") or []:
        text = str(record[position])
        repeat = seen[text] = seen.get(text, -1) + 1
        key = text if repeat == 0 else f"{text}\x00{repeat}"
        for metric in metrics:
            value = record[columns.index(metric)]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[metric][key] = float(value)
    return {m: scores for m, scores in out.items() if scores}  # text columns a data format adds are not metrics


def load_predictions(client, run_id: str, path: str = PREDICTIONS_TABLE) -> dict | None:
    """The run's predictions table as logged by ``mlflow.log_table``, or None when the run has none."""
    folder = path.rpartition("/")[0]
    if not any(a.path == path for a in client.list_artifacts(run_id, folder)):
        return None
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no progress bar per run in compare's output
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run_id, path, tmp)
            return json.loads(Path(local).read_text(encoding="utf-8"))
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous


def evaluated_at_names(runs: list[Any]) -> list[str]:
    """The lengths options the runs were also evaluated at (``eval/<name>/<metric>``), in ``eval.at_lengths``
    order where the runs give it."""
    names = {m.group(1) for r in runs for k in r.data.metrics if (m := AT_LENGTHS_METRIC.match(k))}
    order = " ".join(str(r.data.params.get(AT_LENGTHS_PARAM, "")) for r in runs)
    return sorted(names, key=lambda n: (order.find(n) if n in order else len(order), n))


def parse_baseline(specs: Sequence[str] | None) -> dict[str, str]:
    """``["src=512", "method=lora tgt=128"]`` -> ``{"src": "512", "method": "lora", "tgt": "128"}``."""
    pairs: dict[str, str] = {}
    for spec in specs or []:
        for part in spec.split():
            key, sep, value = part.partition("=")
            if not sep or not key:
                raise BaselineError(f"--baseline takes KEY=VALUE (e.g. src=512 or data.max_source_length=512), "
                                    f"got {part!r}")
            pairs[key] = value
    return pairs


def resolve_baseline(specs: Sequence[str] | None, settings: Mapping[str, list], varied: Sequence[str],
                     aliases: Callable[[str], set[str]]) -> str | None:
    """The setting ``--baseline KEY=VALUE ...`` names (None: none given, the first setting is the baseline).

    KEY is a varied param as compare names it: the full key (``data.max_source_length``), its short name
    (``src``) or, for a group choice, the group (``method``); the given pairs must pick exactly one setting.
    """
    wanted = parse_baseline(specs)
    if not wanted:
        return None
    keys = {}
    for given in wanted:
        matches = [k for k in varied if given in aliases(k)]
        if not matches:
            names = ", ".join(sorted({a for k in varied for a in aliases(k)})) or "none"
            raise BaselineError(f"--baseline {given}=...: {given!r} is not a param that varies between the runs "
                                f"(those that do: {names})")
        keys[given] = matches[0]
    chosen = [name for name, runs in settings.items()
              if all(str(runs[0].data.params.get(keys[g])) == value for g, value in wanted.items())]
    spec = " ".join(f"{k}={v}" for k, v in wanted.items())
    if not chosen:
        raise BaselineError(f"--baseline {spec} matches none of the settings: {', '.join(settings)}")
    if len(chosen) > 1:
        raise BaselineError(f"--baseline {spec} matches {len(chosen)} settings ({', '.join(chosen)}); "
                            "add KEY=VALUE pairs until it names one")
    return chosen[0]


def paired_comparison(client, runs: Sequence[Any], varied: Sequence[str], label: Callable[[str, str | None], str],
                      aliases: Callable[[str], set[str]], metric_labels: Mapping[str, str] | None = None,
                      baseline: Sequence[str] | None = None, seed: int = 0,
                      load: Callable[..., dict | None] = load_predictions,
                      evaluated_at: Sequence[str] = ()) -> PairedComparison:
    """Every setting against the baseline on every per-sample metric the settings share.

    ``metric_labels`` maps a per-sample column (``rouge-l``) to its label in compare's tables (``ROUGE-L``);
    columns a data config adds keep their name. Runs without a predictions table (failed, or trained before
    per-sample tables existed) are left out with a note; a metric whose run reports it (``eval/<metric>``) but
    whose table lacks its per-sample scores, or settings sharing fewer than 2 dev samples, are errors.
    ``evaluated_at``: lengths options the runs were also evaluated at (eval.at_lengths): their tables
    (``predictions/<name>/after.json``) are compared too, as the metrics ``<name>/<metric>`` (rows with
    ``evaluated_at``), all in one table (one Holm adjustment).
    """
    metric_labels = dict(metric_labels or {})
    settings_runs = group_settings(runs, varied, label)
    settings = {name: [r.info.run_id for r in members] for name, members in settings_runs.items()}
    baseline_name = resolve_baseline(baseline, settings_runs, varied, aliases)
    notes: list[str] = []
    if len(settings_runs) < 2:
        return PairedComparison(None, settings, ["one setting only: nothing to compare"])
    different_data = [k for k in varied if k in DATA_PARAMS or k.startswith("data.") and k.endswith("_file")]
    if different_data:
        why = (f"no paired verdicts: the settings differ in {', '.join(different_data)}, so they were not scored on "
               "the same dev samples")
        return PairedComparison(None, settings, [why])

    scores: dict[str, dict[str, list[dict[str, float]]]] = {}
    reported: dict[str, set[str]] = {}  # setting -> metrics its runs report as eval/<metric>
    missing_tables = []
    for name, members in settings_runs.items():
        for run in members:
            table = load(client, run.info.run_id)
            if table is None:
                missing_tables.append(f"{name} ({run.info.run_id[:8]})")
                continue
            for metric, by_sample in keyed_scores(table, f"run {run.info.run_id[:8]} ({name})").items():
                scores.setdefault(name, {}).setdefault(metric, []).append(by_sample)
            for at in evaluated_at:  # cross-evaluation: metric "<lengths>/<metric>" as the run logs eval/<lengths>/...
                other = load(client, run.info.run_id, AT_LENGTHS_TABLE.format(at))
                where = f"run {run.info.run_id[:8]} ({name}) at {at}"
                for metric, by_sample in (keyed_scores(other, where) if other is not None else {}).items():
                    scores.setdefault(name, {}).setdefault(f"{at}/{metric}", []).append(by_sample)
            reported.setdefault(name, set()).update(
                k.split("/", 1)[1] for k in run.data.metrics if k.startswith("eval/"))
    if baseline_name is not None and baseline_name not in scores:
        raise BaselineError(f"--baseline {baseline_name}: its runs have no per-sample scores ({PREDICTIONS_TABLE})")
    if not scores:
        return PairedComparison(None, settings, [f"no paired verdicts: no run has per-sample scores ({PREDICTIONS_TABLE})"])
    if missing_tables:
        notes.append(f"left out of the verdicts, no per-sample scores ({PREDICTIONS_TABLE}): {', '.join(missing_tables)}")
    if len(scores) < 2:
        return PairedComparison(None, settings, [*notes, "no paired verdicts: fewer than 2 settings have per-sample scores"])
    # a setting whose seeds do not all have a table: use the seeds that do (n_seeds says how many)
    for name, by_metric in scores.items():
        counts = {len(v) for v in by_metric.values()}
        if len(counts) > 1:
            raise UserError(f"setting {name}: its runs' predictions tables have different per-sample columns")
    # a metric some setting scores per sample, which another reports (eval/<metric>) without per-sample scores
    union = {m for by_metric in scores.values() for m in by_metric}
    for name, by_metric in scores.items():
        for metric in sorted(union - set(by_metric)):
            if metric in reported.get(name, set()):
                raise UserError(f"setting {name} reports eval/{metric} but its predictions table has no per-sample "
                                f"{metric} scores: cannot compare {metric} sample by sample")
    every = {m for m in union if all(m in by_metric for by_metric in scores.values())}
    metrics = [m for m in dict.fromkeys(m for by_metric in scores.values() for m in by_metric) if m in every]
    left_out = sorted({m for by_metric in scores.values() for m in by_metric} - set(metrics))
    if left_out:
        notes.append(f"not compared (not every setting has per-sample scores for it): {', '.join(left_out)}")
    if not metrics:
        return PairedComparison(None, settings, notes + ["no paired verdicts: no per-sample metric shared by the settings"])
    def label(metric: str) -> str:
        at, _, plain = metric.rpartition("/")
        return metric_labels.get(plain, plain) + (f"{AT}{at}" if at else "")

    labelled = {name: {label(m): by_metric[m] for m in metrics} for name, by_metric in scores.items()}
    table = verdict_table(labelled, baseline=baseline_name, seed=seed)
    return PairedComparison(table, settings, notes)



# ------------------------------------------------------------------------------------------ report sections
METHOD_NOTE = ("Each setting against the baseline on the dev samples both evaluated (matched by input), each "
               "sample's score averaged over the setting's seeds: delta = mean per-sample difference, 95 % interval "
               "by paired bootstrap, p by a paired sign-flip permutation test, p (Holm) adjusted across the whole "
               "table; better / worse when the interval excludes 0, else within noise, with the dev samples that "
               "would detect the observed difference at 80 % power.")
COLUMNS = ["setting", "metric", "delta", "95% CI", "p", "p (Holm)", "samples", "seeds", "verdict", "samples needed"]


def table_cells(table: VerdictTable) -> list[list[str]]:
    from glm_experiments.study.verdicts import decimals, delta_decimals

    cells = []
    for r in table.rows:
        k, d = decimals(r.ci_low, r.ci_high), delta_decimals(r.delta, r.ci_low, r.ci_high)
        metric = r.metric + (f"{AT}{r.evaluated_at}" if r.evaluated_at else "")
        cells.append([r.setting, metric, f"{r.delta:+.{d}f}", f"[{r.ci_low:.{k}f}, {r.ci_high:.{k}f}]",
                      _p(r.p_value), _p(r.p_adjusted), f"{r.n_samples:,}", str(r.n_seeds), r.verdict,
                      "-" if r.samples_needed is None else f"{r.samples_needed:,}"])
    return cells


def _p(p: float | None) -> str:
    if p is None:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def markdown_section(result: PairedComparison | None) -> list[str]:
    """The 'Verdicts' section of report.md (first): the sentences, the table, the notes."""
    if result is None:
        return []
    lines = ["## Verdicts", ""]
    if result.table is not None:
        lines += [f"Baseline: **{result.table.baseline}**. {METHOD_NOTE}", ""]
        lines += [f"* {sentence}" for sentence in result.table.sentences()] + [""]
        lines += ["| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * 6 + "---|---:|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table_cells(result.table)]
        lines.append("")
    lines += [f"_{note}_" for note in result.notes] + ([""] if result.notes else [])
    return lines


def html_section(result: PairedComparison | None) -> str:
    import html

    if result is None:
        return ""
    parts = ["<h2>Verdicts</h2>"]
    if result.table is not None:
        parts.append(f"<p>Baseline: <b>{html.escape(result.table.baseline)}</b>. {html.escape(METHOD_NOTE)}</p>")
        parts.append("<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in result.table.sentences()) + "</ul>")
        head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                       for row in table_cells(result.table))
        parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    parts += [f"<p><i>{html.escape(note)}</i></p>" for note in result.notes]
    return "".join(parts)


def description(result: PairedComparison | None) -> str | None:
    """The parent run's description (MLflow's ``mlflow.note.content``): the sentences, one per line."""
    if result is None or result.table is None:
        return None
    return "\n".join([f"Paired verdicts against {result.table.baseline} (95 % bootstrap intervals):",
                      *(f"- {s}" for s in result.table.sentences())])


VERDICTS_START, VERDICTS_END = "<!-- verdicts -->", "<!-- /verdicts -->"


def with_description(existing: str | None, result: PairedComparison | None) -> str | None:
    """The run description with the verdicts first (replacing those of an earlier compare), the rest kept."""
    rest = existing or ""
    if VERDICTS_START in rest and VERDICTS_END in rest:
        before, _, tail = rest.partition(VERDICTS_START)
        rest = before + tail.partition(VERDICTS_END)[2].lstrip("\n")
    text = description(result)
    if text is None:
        return rest if rest != (existing or "") else None
    return f"{VERDICTS_START}\n{text}\n{VERDICTS_END}\n\n{rest}".rstrip() + "\n"
