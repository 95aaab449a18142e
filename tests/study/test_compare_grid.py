"""compare on runs evaluated at other lengths too (eval.at_lengths) and with several seeds: a hand-made store with
the metrics and tables training logs (``eval/<lengths>/<metric>``, ``predictions/<lengths>/after.json``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers.common import sweep_store

N = 30
AT = ("src512_tgt128", "src1024_tgt256")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri, client, exp, parent = sweep_store(tmp_path_factory.mktemp("grid_store"), "sweep")
    inputs = [f"q{i}" for i in range(N)]
    for src, tgt, shift in (("512", "128", 0.0), ("1024", "256", 8.0)):
        for seed in ("1", "2"):
            rng = np.random.default_rng(int(src) + int(seed))
            rid = client.create_run(exp, run_name=f"src{src}-{seed}", tags={"mlflow.parentRunId": parent}).info.run_id
            for key, value in {"data.max_source_length": src, "data.max_target_length": tgt, "seed": seed,
                               "eval.at_lengths": "[src512_tgt128,src1024_tgt256]", "output_dir": src + seed}.items():
                client.log_param(rid, key, value)
            for at, at_shift in ((None, shift), (AT[0], shift / 2), (AT[1], shift)):
                table = {"input": inputs, "reference": ["r"] * N, "prediction": ["p"] * N}
                for metric in ("accuracy", "rouge-l"):
                    scores = 30 + at_shift + 5 * rng.standard_normal(N)
                    table[metric] = scores.tolist()
                    client.log_metric(rid, f"eval/{metric}" if at is None else f"eval/{at}/{metric}", scores.mean(), step=4)
                client.log_table(rid, table, "predictions/after.json" if at is None else f"predictions/{at}/after.json")
                client.log_metric(rid, "eval/gen_seconds" if at is None else f"eval/{at}/gen_seconds", 1.0, step=4)
            client.log_metric(rid, "train/loss", 2.0, step=4)
            client.set_terminated(rid, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return uri, client, parent


def test_grid_seeds_and_verdicts_per_evaluated_at(store, tmp_path, capsys):
    from glm_experiments.compare import main
    from glm_experiments.study.comparison import collect
    from glm_experiments.study.settings import grid, setting_rows

    uri, client, parent = store
    comparison = collect(uri, parent=parent)
    rows = setting_rows(comparison)
    assert [(r.label, len(r.run_ids)) for r in rows] == [("src=512 tgt=128", 2), ("src=1024 tgt=256", 2)]
    tables = grid(comparison)
    assert [metric for metric, _, _ in tables] == ["ROUGE-L", "acc."]  # gen_seconds is no score
    metric, header, cells = tables[0]
    assert header[1:] == list(AT) and [c[0] for c in cells] == ["src=512 tgt=128", "src=1024 tgt=256"]
    runs = {r.info.run_id: r for r in comparison.runs}
    ids = comparison.paired.settings["src=1024 tgt=256"]
    values = [runs[i].data.metrics["eval/src512_tgt128/rouge-l"] for i in ids]
    assert cells[1][1] == f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"

    out = tmp_path / "cmp"
    assert main(["--tracking-uri", uri, "--parent", parent, "--out", str(out), "--no-log"]) == 0
    printed = capsys.readouterr().out
    assert "ROUGE-L: trained at (rows) x evaluated at (columns)" in printed
    assert "scores (mean ± sd over seeds)" in printed and "leads with" in printed and "(mean of 2 seeds)" in printed
    assert "    ROUGE-L at src512_tgt128 +" in printed
    assert all(len(line) <= 100 for line in printed.splitlines())
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert {(r["evaluated_at"], r["metric"]) for r in verdicts["rows"]} == {
        (at, m) for at in (None, *AT) for m in ("ROUGE-L", "acc.")}
    assert all(r["n_seeds"] == 2 and r["n_samples"] == N for r in verdicts["rows"])
    report = (out / "report.md").read_text()
    assert "## Cross-evaluation: trained at x evaluated at" in report and "| trained at \\ evaluated at |" in report
    assert report.index("## Verdicts") < report.index("## Cross-evaluation")
    from glm_experiments.study.verdicts import VerdictRow, VerdictTable

    table = VerdictTable("b", [VerdictRow("ROUGE-L", "s", "b", 1, 0, 2, 0.1, 0.1, 5, 2, "better", None, AT[0])])
    assert set(table.metrics()) == {f"verdict/s/{AT[0]}/ROUGE-L/{k}" for k in ("delta", "ci_low", "ci_high", "p")}
