"""The blind A/B session behind the web page's Compare tab: layout, verdict records, resume, the tally and its
MLflow run, and the human-eval columns of ``compare``. No model and no browser (those are in test_web.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from glm_experiments.errors import UserError
from glm_experiments.study.human_eval import (
    ABSession,
    Contestant,
    Tally,
    default_session_dir,
    session_path,
    tally,
    wilson_interval,
)
from glm_experiments.study.human_eval_tracking import HumanEvalRun


def test_wilson_interval_matches_published_values():
    # Wilson score interval, z = 1.96 (Newcombe 1998, table I: 81/263 -> 0.2553-0.3662; 15/148 -> 0.0624-0.1605)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=5e-5)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=5e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=5e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_tally_leaves_ties_and_both_bad_out_of_the_win_rate():
    verdicts = [
        {"choice": c, "winner": w}
        for c, w in [("left", "a"), ("right", "a"), ("left", "b"), ("tie", None), ("both_bad", None), ("right", "a")]
    ]
    t = tally(verdicts)
    assert (t.wins_a, t.wins_b, t.ties, t.both_bad, t.n) == (3, 1, 1, 1, 6)
    metrics = t.metrics()
    assert metrics["win_rate_a"] == 0.75 and metrics["n"] == 6 and metrics["ties"] == 1 and metrics["both_bad"] == 1
    assert (metrics["ci_low"], metrics["ci_high"]) == pytest.approx(wilson_interval(3, 4))
    assert metrics["p_value"] == pytest.approx(0.625)  # the sign test: 3 of 4 decisive votes, two-sided
    only_ties = Tally(ties=2).metrics()  # nothing decided: no win rate, no interval, no test
    assert "win_rate_a" not in only_ties and "p_value" not in only_ties and only_ties["n"] == 2
    assert Tally(wins_a=6, wins_b=14, ties=2).summary("lora", "freeze") == (
        "22 verdicts: lora 6, freeze 14, ties 2, both bad 0; "
        "freeze preferred 14 of 20 decisive votes, 70 % [48, 85], p = 0.12, within noise")
    assert Tally(wins_a=18, wins_b=2).summary().endswith("a preferred 18 of 20 decisive votes, 90 % [70, 97], p < 0.001, better")


@pytest.fixture
def pair(tmp_path):
    data = tmp_path / "dev.json"
    data.write_text("".join(json.dumps({"content": f"q{i}", "summary": f"r{i}"}) + "\n" for i in range(6)))
    a = Contestant("runA", str(tmp_path / "sweep" / "0_lora"), "a" * 32)
    b = Contestant("runB", str(tmp_path / "sweep" / "1_lora"), "b" * 32)
    return a, b, data


def test_session_layout_records_and_resume(pair, tmp_path):
    a, b, data = pair
    assert default_session_dir(a, b) == tmp_path / "sweep" / "human_eval"  # beside the runs
    path = session_path(default_session_dir(a, b), a, b, data)
    assert path == session_path(default_session_dir(b, a), b, a, data)  # the same pair in either order
    session = ABSession.open(path, a, b, data, prompts=6, seed=7)
    assert not path.exists(), "opening alone writes nothing"
    layouts = [session.sides(p) for p in range(6)]
    assert set(layouts) == {("a", "b"), ("b", "a")}, "seed 7 puts each run on both sides"
    assert layouts == [ABSession.open(path, a, b, data, 6, seed=7).sides(p) for p in range(6)]

    chosen = ["left", "right", "tie", "both_bad"]
    for position, choice in enumerate(chosen):
        left, right = session.sides(position)
        row = session.record(
            position,
            choice,
            {"a": f"A{position}", "b": f"B{position}"},
            comment=f" c{position} ",
            prompt=f"q{position}",
            reference=f"r{position}",
        )
        expected = {"left": left, "right": right}.get(choice)
        assert row["winner"] == expected and row["left"] == left and row["right"] == right
        assert row["winner_run_id"] == ({"a": a.mlflow_run_id, "b": b.mlflow_run_id}[expected] if expected else None)
        assert row["left_run"] == {"a": "runA", "b": "runB"}[left] and row["comment"] == f"c{position}"
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [line["type"] for line in lines] == ["session"] + ["verdict"] * 4
    assert lines[0]["seed"] == 7 and lines[0]["run_a"]["run_dir"] == a.run_dir and lines[0]["prompts"] == 6
    with pytest.raises(UserError, match="prompt 2 already has a verdict"):
        session.record(1, "tie", {"a": "", "b": ""})

    # a crash mid-write leaves half a line: it is skipped, the next verdict goes on its own line
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"type": "verdict", "position": 4, "cho')
    resumed = ABSession.open(path, b, a, data, prompts=6)  # given in the other order: the file's order holds
    assert resumed.header["run_a"]["label"] == "runA" and resumed.next_position() == 4
    assert [resumed.sides(p) for p in range(6)] == layouts
    resumed.record(4, "left", {"a": "A4", "b": "B4"})
    rows = ABSession.read(path)
    assert sorted(rows.verdicts) == [0, 1, 2, 3, 4] and rows.next_position() == 5
    t = rows.tally()
    assert (t.n, t.ties, t.both_bad) == (5, 1, 1)


def test_session_refuses_other_runs_or_changed_data(pair, tmp_path):
    a, b, data = pair
    path = tmp_path / "s.jsonl"
    ABSession.open(path, a, b, data, 6, seed=1).record(0, "tie", {"a": "", "b": ""})
    other = Contestant("runC", str(tmp_path / "elsewhere"))
    with pytest.raises(UserError, match="this session judges"):
        ABSession.open(path, a, other, data, 6)
    data.write_text(data.read_text() + json.dumps({"content": "new", "summary": "x"}) + "\n")
    with pytest.raises(UserError, match="another version of"):
        ABSession.open(path, a, b, data, 6)


def test_mlflow_run_mirrors_the_session_and_compare_shows_it(pair, tmp_path):
    from glm_experiments.study.comparison import collect
    from glm_experiments.study.tables import print_table

    a, b, data = pair
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("study", artifact_location=(tmp_path / "mlartifacts").as_uri())
    ids = {}
    for side, rouge in (("a", 30.0), ("b", 20.0)):  # two finished training runs
        run = client.create_run(experiment, run_name=f"run-{side}")
        client.log_param(run.info.run_id, "method.name", "lora")
        client.log_param(run.info.run_id, "train.max_steps", {"a": "6", "b": "12"}[side])
        client.log_metric(run.info.run_id, "eval/rouge-l", rouge)
        client.set_terminated(run.info.run_id)
        ids[side] = run.info.run_id
    a.mlflow_run_id, b.mlflow_run_id = ids["a"], ids["b"]
    a.tracking_uri = b.tracking_uri = uri

    session = ABSession.open(tmp_path / "he.jsonl", a, b, data, prompts=4, seed=3)
    tracker = HumanEvalRun(session, uri)
    run_id = tracker.open()
    # a wins twice, b once, one tie
    for position, winner in enumerate(["a", "a", "b", None]):
        left, _ = session.sides(position)
        choice = "tie" if winner is None else ("left" if left == winner else "right")
        session.record(position, choice, {"a": "x", "b": "y"})
        tracker.sync()
    run = client.get_run(run_id)
    assert run.info.experiment_id == experiment, "beside the runs it judges"
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["glm_experiments.role"] == "human_eval"
    assert tags["human_eval.run_a"] == ids["a"] and tags["human_eval.run_b"] == ids["b"]
    assert tags["human_eval.progress"] == "4 of 4" and run.info.status == "FINISHED"
    low, high = wilson_interval(2, 3)
    assert metrics == pytest.approx(
        {
            "n": 4,
            "ties": 1,
            "both_bad": 0,
            "wins_a": 2,
            "wins_b": 1,
            "win_rate_a": 2 / 3,
            "ci_low": low,
            "ci_high": high,
            "p_value": 1.0,  # the sign test: 2 of 3 decisive votes
        }
    )
    assert [m.value for m in client.get_metric_history(run_id, "n")] == [1, 2, 3, 4]  # one point per verdict
    artifact = client.download_artifacts(run_id, f"human_eval/{session.path.name}", str(tmp_path / "dl"))
    assert Path(artifact).read_text(encoding="utf-8") == session.path.read_text(encoding="utf-8")
    # reopening finds the same run through the session file
    assert HumanEvalRun(ABSession.read(session.path), uri).open() == run_id

    comparison = collect(uri, experiment="study")
    assert {row["run_id"] for row in comparison.rows} == set(ids.values()), "the human_eval run is no training run"
    assert comparison.tables["human eval"] == ["human win %", "95% CI", "sign test", "W-L-tie-bad", "vs"]
    rows = {row["run_id"]: row for row in comparison.rows}
    assert rows[ids["a"]]["human win %"] == pytest.approx(66.7)
    assert rows[ids["b"]]["human win %"] == pytest.approx(33.3)
    assert rows[ids["a"]]["95% CI"] == f"{100 * low:.0f}–{100 * high:.0f}"
    assert rows[ids["b"]]["95% CI"] == f"{100 * (1 - high):.0f}–{100 * (1 - low):.0f}"
    assert rows[ids["a"]]["sign test"] == rows[ids["b"]]["sign test"] == "noise p=1.00"  # within noise
    assert rows[ids["a"]]["W-L-tie-bad"] == "2-1-1-0" and rows[ids["b"]]["W-L-tie-bad"] == "1-2-1-0"
    assert rows[ids["a"]]["vs"] == rows[ids["b"]]["label"]
    from rich.console import Console

    console = Console(width=100, record=True)
    print_table(comparison, console)
    text = console.export_text()
    assert "human eval" in text and "66.7" in text and "2-1-1-0" in text


def test_compare_without_human_eval_has_no_such_table(tmp_path):
    from glm_experiments.study.comparison import collect

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("plain")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "eval/rouge-l", 1.0)
    assert collect(uri, experiment="plain").tables["human eval"] == []


def test_run_store_finds_the_store_a_run_was_tracked_in(tmp_path):
    from omegaconf import OmegaConf

    from glm_experiments.study.human_eval import run_store

    run = tmp_path / "outputs" / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    cwd: {tmp_path}\n")
    (run / "result.json").write_text(json.dumps({"run_id": "c" * 32}))
    cfg = OmegaConf.create({"tracking": {"enabled": True, "tracking_uri": "sqlite:///mlflow.db"}})
    # the default, relative URI is relative to where the run was started
    assert run_store(run, cfg) == (f"sqlite:///{tmp_path / 'mlflow.db'}", "c" * 32)
    cfg.tracking.tracking_uri = "sqlite:////elsewhere/m.db"
    assert run_store(run, cfg) == ("sqlite:////elsewhere/m.db", "c" * 32)
    cfg.tracking.enabled = False
    assert run_store(run, cfg) == (None, "c" * 32)
