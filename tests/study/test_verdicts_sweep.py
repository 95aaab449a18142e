"""A real study end to end: ``--multirun experiment=source_length_ablation seed=1,2`` (debug=smoke, a few steps and
dev samples), then compare; verdicts.json's deltas must be the per-sample differences of the runs' predictions
tables, each sample averaged over the 2 seeds, computed here independently from the logged tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

from tests.helpers.common import checkout_env

pytestmark = pytest.mark.slow
LABELS = {"BLEU-4": "bleu-4", "ROUGE-L": "rouge-l", "acc.": "accuracy"}  # compare's labels -> table columns


@pytest.mark.timeout(1500)
def test_two_settings_two_seeds_verdicts_equal_the_tables(tmp_path, capsys):
    from mlflow import MlflowClient

    from glm_experiments.compare import main as compare

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = checkout_env({**os.environ, "PYTHONUNBUFFERED": "1"})
    env.pop("GLM_EXPERIMENTS_PARENT_RUN_ID", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    args = ["--multirun", "experiment=source_length_ablation", "seed=1,2", "debug=smoke", "train.max_steps=2",
            "train.per_device_train_batch_size=2", "train.save_steps=0", "data.max_train_samples=8",
            "eval.max_samples=4", "eval.batch_size=4", "eval.max_new_tokens=8", "eval.at_lengths=[src512_tgt128]",
            f"tracking.tracking_uri={uri}", f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    proc = subprocess.run([sys.executable, "-m", "glm_experiments", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("source_length_ablation")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("glm_experiments.role") == "sweep_parent"]
    children = [r for r in runs if r is not parent and r.info.run_id != parent.info.run_id]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    # seed=1,2 on the command line wins over the experiment file's seed
    assert sorted((r.data.params["data.max_source_length"], r.data.params["seed"]) for r in children) == [
        ("1024", "1"), ("1024", "2"), ("512", "1"), ("512", "2")]

    out = tmp_path / "cmp"
    assert compare(["--tracking-uri", uri, "--parent", parent.info.run_id, "--out", str(out), "--no-log"]) == 0
    printed = capsys.readouterr().out
    assert "trained at (rows) x evaluated at (columns)" in printed and "mean ± sd over seeds" in printed
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert verdicts["baseline"] == "src=512 tgt=128"

    # independently: each run's tables, each sample's score averaged over the seeds, then mean of the differences
    def table(run_id, path):
        local = client.download_artifacts(run_id, path, str(tmp_path / "dl" / run_id / path.replace("/", "_")))
        data = json.loads(open(local, encoding="utf-8").read())
        return [dict(zip(data["columns"], row)) for row in data["data"]]

    def expected(path, metric):
        by_setting = defaultdict(lambda: defaultdict(list))  # source length -> input -> scores over seeds
        for run in children:
            seen = defaultdict(int)  # history_demo asks the same last question in every sample: the k-th repeat
            for row in table(run.info.run_id, path):  # of an input is one sample (compare matches them so too)
                key = (row["input"], seen[row["input"]])
                seen[row["input"]] += 1
                by_setting[run.data.params["data.max_source_length"]][key].append(row[metric])
        assert all(len(v) == 2 for s in by_setting.values() for v in s.values())  # 2 seeds each
        mean = {s: {k: sum(v) / len(v) for k, v in samples.items()} for s, samples in by_setting.items()}
        diffs = [mean["1024"][k] - mean["512"][k] for k in mean["512"]]
        return sum(diffs) / len(diffs), len(diffs)

    checked = set()
    for row in verdicts["rows"]:
        path = f"predictions/{row['evaluated_at']}/after.json" if row["evaluated_at"] else "predictions/after.json"
        delta, n = expected(path, LABELS[row["metric"]])
        assert row["setting"] == "src=1024 tgt=256" and row["n_seeds"] == 2 and row["n_samples"] == n == 4
        assert row["delta"] == pytest.approx(delta, abs=1e-9), row
        assert row["ci_low"] <= row["delta"] <= row["ci_high"] or row["ci_low"] == row["ci_high"]
        checked.add((row["evaluated_at"], row["metric"]))
    assert checked == {(at, m) for at in (None, "src512_tgt128") for m in LABELS}
