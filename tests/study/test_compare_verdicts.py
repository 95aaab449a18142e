"""compare's paired verdicts end to end on a hand-made MLflow store: a sweep parent with children that differ in
max_source_length and seed, each with a per-sample predictions table like training logs (no training)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers.common import sweep_store

from glm_experiments.study.paired import PREDICTIONS_TABLE, VERDICTS_START

N = 150
METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    uri, client, exp, parent_id = sweep_store(
        tmp_path_factory.mktemp("verdict_store"), "sweep: data.max_source_length=512,1024 seed=1,2",
        **{"mlflow.note.content": "Sweep parent: each job of this --multirun is a child run."})
    inputs = [f"类型#裙*颜色#{i}" for i in range(N)]
    difficulty = np.linspace(5, 60, N)
    for src, shift in (("512", 0.0), ("1024", 8.0)):
        for seed in ("1", "2"):
            rng = np.random.default_rng(int(src) + int(seed))
            run = client.create_run(exp, run_name=f"src{src}-seed{seed}", tags={"mlflow.parentRunId": parent_id})
            rid = run.info.run_id
            for key, value in {"data.max_source_length": src, "seed": seed, "method.name": "lora",
                               "output_dir": f"out/{src}-{seed}"}.items():
                client.log_param(rid, key, value)
            table = {"input": inputs, "reference": ["r"] * N, "prediction": ["p"] * N}
            for metric in METRICS:
                scores = difficulty + (shift if metric == "rouge-l" else 0.0) + 6 * rng.standard_normal(N)
                table[metric] = scores.tolist()
                client.log_metric(rid, f"eval/{metric}", float(np.mean(scores)), step=4)
            client.log_metric(rid, "train/loss", 2.0, step=4)
            client.log_table(rid, table, PREDICTIONS_TABLE)
            client.set_terminated(rid, "FINISHED")
    client.set_terminated(parent_id, "FINISHED")
    return uri, client, parent_id


def test_compare_writes_and_logs_the_verdicts(sweep, tmp_path, capsys):
    from glm_experiments.compare import main

    uri, client, parent = sweep
    out = tmp_path / "cmp"
    assert main(["--tracking-uri", uri, "--parent", parent, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verdicts against src=512" in printed
    assert "src=1024 vs src=512:\n    BLEU-4 " in printed and "\n    ROUGE-L +" in printed  # a metric a line

    verdicts = json.loads((out / "verdicts.json").read_text())
    assert verdicts["baseline"] == "src=512"
    rows = {r["metric"]: r for r in verdicts["rows"]}
    assert list(rows) == ["BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L"]
    assert all(r["setting"] == "src=1024" and r["n_seeds"] == 2 and r["n_samples"] == N for r in rows.values())
    assert rows["ROUGE-L"]["verdict"] == "better" and 6 < rows["ROUGE-L"]["delta"] < 10
    assert rows["ROUGE-L"]["samples_needed"] is None
    assert {r["verdict"] for m, r in rows.items() if m != "ROUGE-L"} == {"within noise"}

    report = (out / "report.md").read_text()
    assert report.index("## Verdicts") < report.index("## Scores")  # first
    assert "* src=1024 vs src=512: BLEU-4" in report and "| src=1024 | ROUGE-L |" in report
    assert "Scores over seeds" in report and "| src=512 | 2 |" in report and " ± " in report
    page = (out / "report.html").read_text()
    assert page.index("<h2>Verdicts</h2>") < page.index("<h2>Scores</h2>")

    logged = {a.path for a in client.list_artifacts(parent, "comparison")}
    assert "comparison/verdicts.json" in logged
    run = client.get_run(parent)
    metrics = run.data.metrics
    assert metrics["verdict/src_1024/ROUGE-L/delta"] == pytest.approx(rows["ROUGE-L"]["delta"])
    assert {f"verdict/src_1024/ROUGE-L/{k}" for k in ("delta", "ci_low", "ci_high", "p")} <= set(metrics)
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith(VERDICTS_START) and "src=1024 vs src=512: BLEU-4" in note
    assert note.rstrip().endswith("Sweep parent: each job of this --multirun is a child run.")  # kept

    # another baseline; compare again replaces the verdicts in the description instead of stacking them
    assert main(["--tracking-uri", uri, "--parent", parent, "--out", str(out), "--baseline", "src=1024"]) == 0
    capsys.readouterr()
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert verdicts["baseline"] == "src=1024" and {r["setting"] for r in verdicts["rows"]} == {"src=512"}
    assert next(r for r in verdicts["rows"] if r["metric"] == "ROUGE-L")["verdict"] == "worse"
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert note.count(VERDICTS_START) == 1 and "src=512 vs src=1024" in note


def test_compare_bad_baseline_is_one_line(sweep, tmp_path, capsys):
    from glm_experiments.compare import main

    uri, _, parent = sweep
    args = ["--tracking-uri", uri, "--parent", parent, "--out", str(tmp_path / "x"), "--no-log"]
    assert main([*args, "--baseline", "src=4096"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --baseline src=4096 matches none of the settings: src=512, src=1024")
    assert err.count("\n") == 1
    assert main([*args, "--baseline", "lr=0.1"]) == 2
    assert "not a param that varies" in capsys.readouterr().err
