"""Sweep parent/child runs (the Hydra callback) and the comparison (compare.py) over them.

The fast tests build runs directly with the MLflow client; the slow ones run real sweeps of the tiny model
through the CLI into a temporary MLflow store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.common import ROOT, checkout_env, compose

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path}"


def assert_png(path: Path) -> None:
    assert path.exists(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, (path, len(data))


# ------------------------------------------------------------------ fast: compare on hand-made runs
def _make_run(client, experiment_id, parent_id, params, metrics_by_step, status="FINISHED", name=None):
    tags = {"mlflow.parentRunId": parent_id} if parent_id else {}
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    for key, points in metrics_by_step.items():
        for step, value in points:
            client.log_metric(run.info.run_id, key, value, step=step)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="module")
def handmade_store(tmp_path_factory):
    from mlflow import MlflowClient

    tmp_path = tmp_path_factory.mktemp("store")
    uri = sqlite_uri(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("method_comparison", artifact_location=(tmp_path / "mlartifacts").as_uri())
    parent = client.create_run(exp, run_name="sweep: method=freeze,lora",
                               tags={"glm_experiments.role": "sweep_parent"}).info.run_id
    common = {"seed": "42", "train.learning_rate": "0.002", "data.name": "adgen_demo", "output_dir": "x"}
    ids = {}
    for i, (method, extra, pct, bleu) in enumerate([("freeze", {"method.num_last_layers": "2"}, 40.0, 3.0),
                                                    ("lora", {"method.r": "8", "method.alpha": "16"}, 2.8, 2.0)]):
        params = {**common, "method.name": method, "output_dir": f"out/{i}", **extra}
        metrics = {"train/loss": [(2, 3.0 - i), (4, 2.5 - i), (6, 2.0 - i)],
                   "eval/bleu-4": [(0, 0.1), (6, bleu)], "eval/rouge-1": [(0, 1.0), (6, 10.0 + i)],
                   "eval/rouge-2": [(0, 0.0), (6, 2.0)], "eval/rouge-l": [(0, 1.0), (6, 8.0 + i)],
                   "eval/loss": [(6, 2.1)], "model/trainable_pct": [(0, pct)], "perf/peak_rss_mib": [(6, 900.0 + i)],
                   "perf/train_seconds": [(6, 12.0)], "perf/tokens_per_s": [(6, 5000.0)],
                   "data/train_truncated": [(0, 12 - 12 * i)], "data/dev_truncated": [(0, 3 - 3 * i)],
                   "eval/triple_f1": [(6, 40.0 + i)], "eval/accuracy": [(6, 50.0)]}
        ids[method] = _make_run(client, exp, parent, params, metrics, name=f"{method}-tiny")
    client.set_terminated(parent, "FINISHED")
    # a run of the same experiment outside the sweep (selected with --experiment, not with --parent)
    ids["other"] = _make_run(client, exp, None, {**common, "method.name": "full", "output_dir": "out/9"},
                             {"eval/bleu-4": [(0, 0.1), (6, 1.0)]}, status="FAILED", name="full-tiny")
    return uri, client, parent, ids


def test_compare_rows_by_parent_and_experiment(handmade_store):
    from glm_experiments.study.comparison import compare_runs

    uri, _, parent, ids = handmade_store
    rows = compare_runs(tracking_uri=uri, parent=parent)
    assert [r["run_id"] for r in rows] == [ids["freeze"], ids["lora"]]
    # only the method choice varies: method.* details and output_dir are not columns
    assert rows[0]["method"] == "freeze" and rows[1]["method"] == "lora"
    assert not any(k.startswith(("method.", "output_dir", "train.")) for k in rows[0])
    assert rows[0]["trainable %"] == 40.0 and rows[1]["BLEU-4"] == 2.0 and rows[1]["ROUGE-L"] == 9.0
    assert rows[0]["eval loss"] == 2.1 and rows[1]["RSS peak MiB"] == 901.0
    assert "GPU peak MiB" not in rows[0]  # no run has it

    rows = compare_runs(tracking_uri=uri, experiment="method_comparison")
    assert {r["run_id"] for r in rows} == {ids["freeze"], ids["lora"], ids["other"]}  # the parent is left out
    assert {r["status"] for r in rows} == {"FINISHED", "FAILED"}

    rows = compare_runs(tracking_uri=uri, experiment="method_comparison", filter_string="params.method.name = 'lora'")
    assert [r["run_id"] for r in rows] == [ids["lora"]]


def test_compare_cli_outputs_and_logs_to_parent(handmade_store, tmp_path, capsys):
    from glm_experiments.compare import main

    uri, client, parent, _ = handmade_store
    out = tmp_path / "cmp"
    assert main(["--tracking-uri", uri, "--parent", parent, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "trainable %" in printed and "BLEU-4" in printed and "freeze" in printed
    assert_png(out / "loss_curves.png")
    assert_png(out / "final_metrics.png")
    report = (out / "report.md").read_text()
    assert "| run | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L | F1 | acc. |" in report
    assert "| freeze | **3.00** | 10.00 | 2.00 | 8.00 | 40.00 | 50.00 |" in report  # the best in bold
    assert "| run | train loss | eval loss | cut train | cut dev |\n|---|---:|---:|---:|---:|\n| freeze | 2.000 | 2.100 | 12 | 3 |" in report
    assert "Identical in every run: ROUGE-2, acc., eval loss" in report
    assert "| run | trainable % | RSS peak MiB | train s* | tokens/s* |" in report and "one timing per run" in report
    assert "0.10 -> 3.00" in report  # before / after
    assert "![training loss](loss_curves.png)" in report and "![final metrics](final_metrics.png)" in report
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table" in page  # MLflow renders it with the plots
    logged = {a.path for a in client.list_artifacts(parent, "comparison")}
    assert logged == {"comparison/loss_curves.png", "comparison/final_metrics.png", "comparison/report.md",
                      "comparison/report.html"}


def test_compare_tables_fit_100_columns(handmade_store):
    from rich.console import Console

    from glm_experiments.study.comparison import collect, short_run_label
    from glm_experiments.study.tables import print_table

    uri, _, parent, _ = handmade_store
    console = Console(width=100, record=True, color_system=None)
    print_table(collect(uri, parent=parent), console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "…" not in text  # no header or value cut
    for header in ("BLEU-4", "ROUGE-L", "train loss", "eval loss", "trainable %", "tokens/s*", "MLflow run name"):
        assert header in text
    assert "identical in every run: ROUGE-2, acc., eval loss" in text and "one timing per run" in text
    # the study in a few lines: who leads each score by how much, and the truncation counts that differ
    freeze, lora = (short_run_label(row["label"]) for row in collect(uri, parent=parent).rows)
    assert f"BLEU-4: {freeze} leads with 3.00, +1.00 over {lora}" in text
    assert f"ROUGE-L: {lora} leads with 9.00, +1.00 over {freeze}" in text
    assert f"cut train (samples truncated): {freeze} 12, {lora} 0" in text


def test_compare_experiment_reuses_one_run_per_study(handmade_store, tmp_path):
    """--experiment logs to the study's latest sweep parent; calling it again adds no run."""
    from glm_experiments.compare import main

    uri, client, parent, _ = handmade_store
    exp = client.get_experiment_by_name("method_comparison").experiment_id
    before = len(client.search_runs([exp]))
    for _ in range(2):
        assert main(["--tracking-uri", uri, "--experiment", "method_comparison", "--out", str(tmp_path / "c")]) == 0
    assert len(client.search_runs([exp])) == before
    assert any(a.path == "comparison/report.html" for a in client.list_artifacts(parent, "comparison"))


def test_compare_clear_errors(handmade_store, tmp_path, capsys):
    from glm_experiments.compare import main
    from glm_experiments.study.comparison import CompareError, compare_runs

    uri, _, parent, _ = handmade_store
    with pytest.raises(CompareError, match="no runs match"):
        compare_runs(tracking_uri=uri, parent=parent, filter_string="params.method.name = 'ptuning'")
    with pytest.raises(CompareError, match="no experiment named 'nope'.*method_comparison"):
        compare_runs(tracking_uri=uri, experiment="nope")
    with pytest.raises(CompareError, match="no run with id"):
        compare_runs(tracking_uri=uri, parent="0" * 32)
    assert main(["--tracking-uri", sqlite_uri(tmp_path / "missing.db"), "--experiment", "x"]) == 2
    assert "no MLflow database" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()


# ------------------------------------------------------------------ fast: the callback alone
def _hydra_cfg(overrides):
    from glm_experiments.compose import compose

    return compose(overrides, return_hydra_config=True)


def test_sweep_callback_lifecycle(handmade_store, tmp_path, monkeypatch):
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import open_dict

    from glm_experiments.tracking.mlflow_tracker import PARENT_RUN_ENV
    from glm_experiments.tracking.sweep import MlflowSweepCallback

    uri, client, _, _ = handmade_store
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    cfg = _hydra_cfg([f"tracking.tracking_uri={uri}", "tracking.experiment_name=callback_test",
                      f"hydra.sweep.dir={tmp_path}"])
    with open_dict(cfg):  # what a --multirun of method=lora,freeze composes
        cfg.hydra.sweeper.params = {"method": "lora,freeze"}
        cfg.hydra.job.num = 0
    callback = MlflowSweepCallback()
    callback.on_multirun_start(cfg)
    parent_id = os.environ[PARENT_RUN_ENV]
    parent = client.get_run(parent_id)
    assert parent.info.status == "RUNNING" and parent.info.run_name == "sweep: method=lora,freeze"
    assert parent.data.tags["sweep.dir"] == str(tmp_path.resolve()) and parent.data.tags["git.commit"]
    assert parent.data.tags["hydra.choices.method"] == "lora,freeze"  # every job's choice, not the first's
    assert f"--parent {parent_id}`" in parent.data.tags["mlflow.note.content"]
    ok = JobReturn(overrides=["method=lora"], status=JobStatus.COMPLETED, _return_value=4.5)
    bad = JobReturn(overrides=["method=freeze"], status=JobStatus.FAILED, _return_value=FileNotFoundError("gone.json"))
    callback.on_job_end(cfg, ok)
    with open_dict(cfg):
        cfg.hydra.job.num = 1
    callback.on_job_end(cfg, bad)
    callback._end_at_exit()  # what runs when BasicSweeper re-raises the failure (on_multirun_end is skipped)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FAILED" and parent.data.tags["sweep.failed_jobs"] == "1"
    assert parent.data.tags["job.1.error"] == "FileNotFoundError: gone.json"
    assert parent.data.tags["job.1.overrides"] == "method=freeze" and parent.data.tags["job.0.status"] == "FINISHED"
    assert parent.data.metrics["sweep/objective"] == 4.5 and parent.data.metrics["sweep/jobs_failed"] == 1
    assert PARENT_RUN_ENV not in os.environ
    callback.on_multirun_end(cfg)  # ending twice is harmless
    assert client.get_run(parent_id).info.status == "FAILED"


def test_sweep_callback_does_nothing_without_tracking(monkeypatch, tmp_path):
    from glm_experiments.tracking.mlflow_tracker import PARENT_RUN_ENV
    from glm_experiments.tracking.sweep import MlflowSweepCallback

    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    cfg = _hydra_cfg(["tracking=none", f"tracking.tracking_uri=sqlite:///{tmp_path}/never.db"])
    callback = MlflowSweepCallback()
    callback.on_multirun_start(cfg)
    callback.on_multirun_end(cfg)
    assert PARENT_RUN_ENV not in os.environ and callback.parent_run_id is None
    assert not (tmp_path / "never.db").exists()


# ------------------------------------------------------------------ fast: configs
@pytest.mark.parametrize("overrides, expected", [
    (["experiment=source_length_ablation"], {"data.max_source_length": 512, "data.max_target_length": 128}),
    (["experiment=source_length_ablation", "lengths=src1024_tgt256"],
     {"data.max_source_length": 1024, "data.max_target_length": 256, "method.name": "full"}),
    (["experiment=lora_rank_sweep", "method.r=16"], {"method.r": 16, "method.alpha": 32}),
    (["experiment=method_comparison", "method=ptuning"], {"method.name": "ptuning"}),
    # the memory-lean presets whose peaks bench/run.py --only memory_trace traces
    (["experiment=chatglm3_lora_lowmem"], {"model.name": "chatglm3", "method.name": "lora", "method.r": 8,
                                          "data.max_source_length": 256, "data.max_target_length": 512,
                                          "train.per_device_train_batch_size": 4, "train.gradient_checkpointing": True,
                                          "train.loss_chunk_size": 256}),
    (["experiment=chatglm3_ptuning_lowmem"], {"method.name": "ptuning", "method.pre_seq_len": 128, "train.loss_chunk_size": 256}),
    (["experiment=chatglm2_qlora_lowmem"], {"model.name": "chatglm2", "method.name": "qlora", "data.max_source_length": 512,
                                           "train.per_device_train_batch_size": 1, "train.gradient_checkpointing": True}),
])
def test_experiment_configs_compose(overrides, expected):
    from omegaconf import OmegaConf

    import glm_experiments.config.resolvers  # noqa: F401  (the CLI gets it through the sweep callback)

    cfg = compose(overrides)
    for key, value in expected.items():
        assert OmegaConf.select(cfg, key) == value, key
    assert cfg.tracking.experiment_name == overrides[0].split("=")[1]


def test_sweep_params_and_callback_registered():
    cfg = _hydra_cfg(["experiment=method_comparison"])
    assert cfg.hydra.sweeper.params.method == "freeze,lora,ptuning,prompt_tuning,full"
    assert cfg.hydra.callbacks.mlflow_sweep._target_ == "glm_experiments.tracking.sweep.MlflowSweepCallback"
    assert cfg.hydra.sweep.dir and cfg.hydra.run.dir  # the original keys are kept


# ------------------------------------------------------------------ slow: real sweeps through the CLI
TINY = ["train.max_steps=2", "train.logging_steps=1", "train.save_steps=0", "train.warmup_ratio=0",
        "train.per_device_train_batch_size=8", "eval.max_samples=2", "eval.max_new_tokens=4", "eval.batch_size=2",
        "data.max_train_samples=16", "tracking.log_adapter=false"]


def _small_data(tmp_path: Path) -> tuple[Path, Path]:
    """A few records of the demo set, so that the dev-set loss pass is short too."""
    src = ROOT / "data" / "adgen_demo"
    train, dev = tmp_path / "train.json", tmp_path / "dev.json"
    train.write_text("".join((src / "train.json").read_text(encoding="utf-8").splitlines(True)[:16]), encoding="utf-8")
    dev.write_text("".join((src / "dev.json").read_text(encoding="utf-8").splitlines(True)[:4]), encoding="utf-8")
    return train, dev


def _sweep(tmp_path: Path, args: list[str], timeout: int = 420) -> subprocess.CompletedProcess:
    env = checkout_env({**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"})
    env.pop("GLM_EXPERIMENTS_PARENT_RUN_ID", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "glm_experiments", "--multirun", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _runs(uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("glm_experiments.role") == "sweep_parent"]
    children = [r for r in runs if r.data.tags.get("glm_experiments.role") != "sweep_parent"]
    return client, parents, children


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sweep_2x2_parent_children_and_compare(tmp_path):
    train, dev = _small_data(tmp_path)
    uri = sqlite_uri(tmp_path / "mlflow.db")
    proc = _sweep(tmp_path, ["method=lora,freeze", "train.learning_rate=1e-3,2e-3", *TINY,
                             f"data.train_file={train}", f"data.dev_file={dev}", f"tracking.tracking_uri={uri}",
                             "tracking.experiment_name=sweep_test", f"hydra.sweep.dir={tmp_path / 'multirun'}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    client, parents, children = _runs(uri, "sweep_test")
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.dir"] == str((tmp_path / "multirun").resolve())
    assert "method=lora,freeze" in parent.data.tags["sweep.params"]
    assert "train.learning_rate=1e-3,2e-3" in parent.data.tags["sweep.params"]
    assert parent.data.tags.get("sweep.failed_jobs") == "0"
    assert parent.data.metrics["sweep/jobs_completed"] == 4 and parent.data.metrics["sweep/jobs_failed"] == 0
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    combos = {(c.data.params["method.name"], float(c.data.params["train.learning_rate"])) for c in children}
    assert combos == {("lora", 1e-3), ("lora", 2e-3), ("freeze", 1e-3), ("freeze", 2e-3)}
    assert all(c.data.params["train.max_steps"] == "2" for c in children)
    # names say what was swept: distinct run names and job folders
    names = {c.info.run_name for c in children}
    assert len(names) == 4 and all(n.startswith(("lr=0.001 · ", "lr=0.002 · ", "lr=1e-3 · ", "lr=2e-3 · "))
                                   and n.endswith((" · lora · tiny", " · freeze · tiny")) for n in names), names
    assert sorted(p.name.split("_", 1)[1].split("-")[0] for p in (tmp_path / "multirun").glob("[0-3]_*")) == [
        "freeze", "freeze", "lora", "lora"]
    assert f"--parent {parent.info.run_id}" in proc.stdout + proc.stderr  # the sweep prints the compare command

    from glm_experiments.compare import main
    from glm_experiments.study.comparison import compare_runs

    rows = compare_runs(tracking_uri=uri, parent=parent.info.run_id)
    assert len(rows) == 4
    assert {(r["method"], float(r["train.learning_rate"])) for r in rows} == combos
    for row in rows:
        for col in ("trainable %", "RSS peak MiB", "BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L", "eval loss", "train s*",
                    "tokens/s*", "train loss"):
            assert row[col] is not None, (col, row)
    out = tmp_path / "cmp"
    assert main(["--tracking-uri", uri, "--parent", parent.info.run_id, "--out", str(out)]) == 0
    assert_png(out / "loss_curves.png")
    assert_png(out / "final_metrics.png")
    report = (out / "report.md").read_text()
    assert "## Scores" in report and "| run | trainable % |" in report and "Before / after" in report
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")} >= {"comparison/report.md",
                                                                                         "comparison/verdicts.json"}
    # the paired verdicts, from the per-sample tables the runs logged: 3 settings against the first, 4 metrics
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert len(verdicts["rows"]) == 3 * 4 and {r["metric"] for r in verdicts["rows"]} == {
        "BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L"}
    assert all(r["n_samples"] >= 2 and r["n_seeds"] == 1 and r["baseline"] == verdicts["baseline"]
               for r in verdicts["rows"])
    assert report.index("## Verdicts") < report.index("## Scores")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sweep_with_a_failing_job_records_all(tmp_path):
    train, _ = _small_data(tmp_path)
    missing = tmp_path / "missing.json"
    uri = sqlite_uri(tmp_path / "mlflow.db")
    # no dev set: the job that runs only trains (its metrics are not what this test is about)
    proc = _sweep(tmp_path, [f"data.train_file={missing},{train}", *TINY, "data.dev_file=null",
                             f"tracking.tracking_uri={uri}",
                             "tracking.experiment_name=failing_sweep", f"hydra.sweep.dir={tmp_path / 'multirun'}"])
    assert proc.returncode != 0  # Hydra reports the failed job after running the others
    client, parents, children = _runs(uri, "failing_sweep")
    assert len(parents) == 1 and len(children) == 2, proc.stderr[-3000:]
    parent = parents[0]
    by_file = {c.data.params["data.train_file"]: c for c in children}
    assert by_file[str(train)].info.status == "FINISHED"
    failed = by_file[str(missing)]
    assert failed.info.status == "FAILED" and "missing.json" in failed.data.tags["error"]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["sweep.failed_jobs"] == "1" and parent.data.tags["job.0.status"] == "FAILED"
    assert "missing.json" in parent.data.tags["job.0.error"]
    assert parent.data.metrics["sweep/jobs_completed"] == 1 and parent.data.metrics["sweep/jobs_failed"] == 1
    # the finished job wrote its results; compare shows both, the failed one without metrics
    job_dir = next((tmp_path / "multirun").glob("1_*"))
    assert job_dir.name.startswith("1_steps"), job_dir  # named by what the job overrides (the file path is left out)
    assert json.loads((job_dir / "result.json").read_text())["run_id"]
    from glm_experiments.study.comparison import compare_runs

    rows = compare_runs(tracking_uri=uri, parent=parent.info.run_id)
    assert {r["status"] for r in rows} == {"FINISHED", "FAILED"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sweep_job_that_does_not_compose_is_recorded_on_the_parent(tmp_path):
    """Hydra stops the sweep at a value that fails to compose, before any callback sees the job: the parent
    used to end KILLED with no error."""
    uri = sqlite_uri(tmp_path / "mlflow.db")
    proc = _sweep(tmp_path, ["train.max_steps=abc,1", "tracking.experiment_name=bad_value",
                             f"tracking.tracking_uri={uri}", f"hydra.sweep.dir={tmp_path / 'multirun'}"])
    assert proc.returncode != 0 and "could not be converted to Integer" in proc.stderr
    _, parents, children = _runs(uri, "bad_value")
    assert len(parents) == 1 and not children
    parent = parents[0]
    assert parent.info.status == "FAILED"
    assert parent.data.tags["job.0.status"] == "FAILED" and parent.data.tags["sweep.failed_jobs"] == "1"
    assert parent.data.tags["job.0.overrides"].startswith("train.max_steps=abc")
    assert parent.data.tags["job.0.error"] == (
        "did not compose: ConfigCompositionException: Error merging override train.max_steps=abc "
        "(ValidationError: Value 'abc' of type 'str' could not be converted to Integer)")
    assert parent.data.tags["error"] == "job #0 " + parent.data.tags["job.0.error"]
    assert parent.data.metrics["sweep/jobs_failed"] == 1


def test_compare_names_runs_by_their_display_names_and_marks_smoke_runs(tmp_path):
    """Runs with a display name are labelled by it (the MLflow run name); debug=smoke runs get a line above the
    tables, in the terminal and in the report."""
    from mlflow import MlflowClient
    from rich.console import Console

    from glm_experiments.study.comparison import collect
    from glm_experiments.study.tables import print_table
    from glm_experiments.study.report import html_report, markdown_report

    uri = sqlite_uri(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("source_length_ablation", artifact_location=(tmp_path / "art").as_uri())
    for src, tgt, score in (("512", "128", 10.5), ("1024", "256", 12.0)):
        name = f"smoke · src={src} tgt={tgt} · full · tiny"
        run_id = _make_run(client, exp, None, {"data.max_source_length": src, "data.max_target_length": tgt,
                                               "method.name": "full", "model.name": "tiny", "train.max_steps": "10"},
                           {"eval/rouge-l": [(10, score)]}, name=name)
        client.set_tag(run_id, "glm_experiments.display_name", name)
        client.set_tag(run_id, "glm_experiments.smoke", "debug=smoke: 10 steps, a wiring check, not a result")
    comparison = collect(uri, experiment="source_length_ablation")
    assert [row["label"] for row in comparison.rows] == ["smoke · src=512 tgt=128 · full · tiny",
                                                         "smoke · src=1024 tgt=256 · full · tiny"]
    note = "smoke runs (10 steps): wiring check, not a result"
    assert comparison.smoke_note == note
    console = Console(width=100, record=True, color_system=None)
    print_table(comparison, console)
    text = console.export_text()
    assert text.index(note) < text.index("ROUGE-L") and "smoke · src=1024 tgt=256 · full · tiny" in text
    report = markdown_report(comparison, {})
    assert report.index(note) < report.index("## Scores")
    assert note in html_report(comparison, tmp_path, {})
    # without display names (older runs): the same form, made from the params that differ
    for run in comparison.runs:
        client.delete_tag(run.info.run_id, "glm_experiments.display_name")
    assert collect(uri, experiment="source_length_ablation").rows[1]["label"] == "smoke · src=1024 tgt=256 · full · tiny"


def test_report_lists_the_samples_two_runs_differ_most_on():
    from glm_experiments.study.samples import differing_samples, markdown_section

    def table(scores, cuts, predictions):
        columns = ["input", "source_tokens_cut", "reference", "prediction", "rouge-l", "prompt_seen"]
        return {"columns": columns, "data": [[f"q{i}", c, "ref", p, s, "..."] for i, (s, c, p) in
                                             enumerate(zip(scores, cuts, predictions))]}

    tables = {"short": table([50.0, 10.0, 30.0], [200, 0, 150], ["a", "b", "c"]),
              "long": table([52.0, 90.0, 60.0], [0, 0, 0], ["a", "B", "C"])}
    rows = [{"run_id": "short", "label": "src=512"}, {"run_id": "long", "label": "src=1024"}]
    diffs = differing_samples(None, rows, shown=2, load=lambda _, run_id, __: tables[run_id])
    assert diffs.metric == "rouge-l" and diffs.labels == ("src=1024", "src=512")  # the better run first
    assert [row["input"] for row in diffs.rows] == ["q1", "q2"]  # by the size of the difference
    assert (diffs.rows[0]["cut0"], diffs.rows[0]["cut1"], diffs.rows[0]["score1"]) == (0, 0, 10.0)
    text = "\n".join(markdown_section(diffs))
    assert "## Samples that differ most (rouge-l)" in text and "| q2 | ref | 0 | 150 | 60.0 | 30.0 | C | c |" in text
    assert differing_samples(None, rows[:1], load=lambda *_: tables["short"]) is None
