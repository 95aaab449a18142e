"""compare's paired comparison read from MLflow runs (glm_experiments.study.paired) on a hand-made store:
settings from the varied params, seeds pooled, per-sample tables matched by input, the baseline, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from glm_experiments.errors import UserError
from glm_experiments.study import paired
from glm_experiments.study.verdicts import BETTER, WITHIN_NOISE

SHORT = {"max_source_length": "src", "max_target_length": "tgt"}
N = 120


def label(key: str, value: str | None) -> str:
    leaf = key.rpartition(".")[2]
    return str(value) if leaf == "name" else f"{SHORT.get(leaf, leaf)}={value}"


def aliases(key: str) -> set[str]:
    group, _, leaf = key.rpartition(".")
    return {key, SHORT.get(leaf, leaf)} | ({group} if leaf == "name" else set())


def predictions(shift: dict[str, float], seed: int, inputs: list[str]) -> dict:
    rng = np.random.default_rng(seed)
    difficulty = np.linspace(10, 60, len(inputs))
    columns = {"input": inputs, "reference": ["r"] * len(inputs), "prediction": ["p"] * len(inputs)}
    for metric in ("bleu-4", "rouge-l"):
        columns[metric] = (difficulty + shift.get(metric, 0.0) + 5 * rng.standard_normal(len(inputs))).tolist()
    return columns


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("paired")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.create_experiment("source_length_ablation", artifact_location=(tmp / "art").as_uri())
    inputs = [f"prompt {i}" for i in range(N)]
    runs = []
    for src, shift in (("512", {}), ("1024", {"rouge-l": 6.0})):
        for seed in ("1", "2", "3"):
            run = client.create_run(exp, run_name=f"src{src}-s{seed}")
            rid = run.info.run_id
            for key, value in {"data.max_source_length": src, "seed": seed, "method.name": "lora"}.items():
                client.log_param(rid, key, value)
            for key in ("eval/bleu-4", "eval/rouge-l", "eval/loss"):
                client.log_metric(rid, key, 1.0, step=6)
            # the order of the samples differs per run: matching is by input
            table = predictions(shift, int(seed) + 10 * len(src), inputs)
            order = np.random.default_rng(int(seed)).permutation(N)
            client.log_table(rid, {k: [v[i] for i in order] for k, v in table.items()}, paired.PREDICTIONS_TABLE)
            client.set_terminated(rid, "FINISHED")
            runs.append(client.get_run(rid))
    # a failed run of a third setting without a predictions table
    failed = client.create_run(exp, run_name="src2048")
    client.log_param(failed.info.run_id, "data.max_source_length", "2048")
    client.log_param(failed.info.run_id, "seed", "1")
    client.set_terminated(failed.info.run_id, "FAILED")
    runs.append(client.get_run(failed.info.run_id))
    return client, runs


VARIED = ["data.max_source_length", "seed"]


def test_settings_pool_seeds_and_get_verdicts(store):
    client, runs = store
    result = paired.paired_comparison(client, runs, VARIED, label, aliases,
                                      metric_labels={"bleu-4": "BLEU-4", "rouge-l": "ROUGE-L"})
    assert list(result.settings) == ["src=512", "src=1024", "src=2048"]
    assert len(result.settings["src=512"]) == 3
    assert any("src=2048" in note and "no per-sample scores" in note for note in result.notes)
    table = result.table
    assert table.baseline == "src=512"
    by = {r.metric: r for r in table.rows}
    assert set(by) == {"BLEU-4", "ROUGE-L"}
    assert by["ROUGE-L"].verdict == BETTER and 4 < by["ROUGE-L"].delta < 8
    assert by["BLEU-4"].verdict == WITHIN_NOISE
    assert all(r.n_seeds == 3 and r.n_samples == N and r.setting == "src=1024" for r in table.rows)


def test_baseline_by_key_value(store):
    client, runs = store
    for spec in (["src=1024"], ["data.max_source_length=1024"]):
        result = paired.paired_comparison(client, runs, VARIED, label, aliases, baseline=spec)
        assert result.table.baseline == "src=1024"
        assert {r.setting for r in result.table.rows} == {"src=512"}
    with pytest.raises(UserError, match="not a param that varies"):
        paired.paired_comparison(client, runs, VARIED, label, aliases, baseline=["lr=1"])
    with pytest.raises(UserError, match="matches none"):
        paired.paired_comparison(client, runs, VARIED, label, aliases, baseline=["src=4096"])
    with pytest.raises(UserError, match="no per-sample scores"):
        paired.paired_comparison(client, runs, VARIED, label, aliases, baseline=["src=2048"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        paired.parse_baseline(["src"])


def fake_run(run_id: str, params: dict, metrics=("eval/bleu-4",)):
    from types import SimpleNamespace

    return SimpleNamespace(info=SimpleNamespace(run_id=run_id),
                           data=SimpleNamespace(params=params, metrics={m: 1.0 for m in metrics}))


def test_bad_input_one_line():
    runs = [fake_run("a" * 8, {"seed": "1", "data.max_source_length": "512"}, ("eval/bleu-4", "eval/rouge-l")),
            fake_run("b" * 8, {"seed": "1", "data.max_source_length": "1024"}, ("eval/bleu-4", "eval/rouge-l"))]
    tables = {"a" * 8: {"columns": ["input", "bleu-4", "rouge-l"], "data": [["x", 1.0, 2.0], ["y", 2.0, 3.0]]},
              "b" * 8: {"columns": ["input", "bleu-4"], "data": [["x", 1.5], ["z", 2.0]]}}
    load = lambda client, run_id: tables[run_id]
    with pytest.raises(UserError, match="reports eval/rouge-l but its predictions table has no per-sample") as caught:
        paired.paired_comparison(None, runs, VARIED, label, aliases, load=load)
    assert "\n" not in str(caught.value)
    tables["b" * 8]["columns"].append("rouge-l")
    for row in tables["b" * 8]["data"]:
        row.append(1.0)
    with pytest.raises(UserError, match="1 dev sample"):  # only "x" is shared
        paired.paired_comparison(None, runs, VARIED, label, aliases, load=load)


def test_different_dev_sets_give_no_verdicts_and_a_note():
    runs = [fake_run("a", {"data.name": "adgen_demo"}), fake_run("b", {"data.name": "spo_demo"})]
    result = paired.paired_comparison(None, runs, ["data.name"], label, aliases, load=lambda c, r: None)
    assert result.table is None and "data.name" in result.notes[0]


def test_repeated_inputs_are_matched_by_occurrence():
    table = {"columns": ["input", "reference", "bleu-4", "note"],
             "data": [["x", "r", 1.0, "a"], ["x", "r", 3.0, "b"], ["y", "r", 2.0, "c"]]}
    assert paired.keyed_scores(table, "run") == {"bleu-4": {"x": 1.0, "x\x001": 3.0, "y": 2.0}}


def test_description_puts_verdicts_first_and_replaces_earlier_ones():
    from glm_experiments.study.verdicts import verdict_table
    from tests.study.test_verdicts import scores_for

    result = paired.PairedComparison(verdict_table(scores_for(2, ["ROUGE-L"], 50, 1, {})), {})
    sweep_note = "Sweep parent: each job of this --multirun is a child run.\n\nCompare the children: `...`"
    first = paired.with_description(sweep_note, result)
    assert first.startswith(paired.VERDICTS_START) and "src=1024 vs src=512: ROUGE-L" in first
    assert first.rstrip().endswith(sweep_note.rstrip())
    again = paired.with_description(first, result)
    assert again == first  # replaced, not stacked
    assert paired.with_description(first, None).strip() == sweep_note.strip()  # verdicts gone: the old ones too
    assert paired.with_description(sweep_note, None) is None  # nothing to change
