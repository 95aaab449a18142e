"""``eval.at_lengths``: the trained model evaluated again at other source/target lengths (cross-evaluation)."""

from __future__ import annotations

import json

import pytest

from tests.helpers.common import TINY_SWEEP_JOB, compose, run_cli

LENGTHS = ["src512_tgt128", "src1024_tgt256"]


def test_unknown_lengths_option_is_one_line_before_training(tmp_path):
    from glm_experiments.errors import UserError
    from glm_experiments.recipe.train import preflight

    cfg = compose(["eval.at_lengths=[src512_tgt128,src2048]", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError) as err:
        preflight(cfg)
    assert str(err.value) == ("eval.at_lengths: 'src2048' is not a lengths option "
                              "(conf/lengths/ has src1024_tgt256, src1024_tgt256_bs1, src512_tgt128, src512_tgt128_bs2)")
    cfg = compose(["eval.at_lengths=[src1024_tgt256]", "model.tiny.max_position_embeddings=1040",
                   "data.max_source_length=512", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match=r"eval.at_lengths=src1024_tgt256: max_source_length 1024 \+ "
                                        r"eval.max_new_tokens 64 = 1088 exceeds the model's 1040 positions"):
        preflight(cfg)
    assert compose([]).eval.at_lengths == []  # off by default
    assert compose(["experiment=source_length_ablation"]).eval.at_lengths == LENGTHS
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_at_lengths_logs_metrics_and_a_table_per_option(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # history_demo: every dev source is 639-941 tokens, so 512 cuts each one and 1024 none; the run's own
    # data.max_source_length is 1024, so the evaluation at src1024_tgt256 repeats the plain one exactly
    proc = run_cli(["data=history_demo", "method=lora", "debug=smoke", *TINY_SWEEP_JOB, "train.max_steps=2",
                    f"eval.at_lengths=[{','.join(LENGTHS)}]", f"hydra.run.dir={tmp_path}/run",
                    f"tracking.tracking_uri={uri}"], tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("glm_experiments").experiment_id])
    metrics = run.data.metrics
    for name in LENGTHS:
        for metric in ("accuracy", "rouge-l", "bleu-4"):
            assert f"eval/{name}/{metric}" in metrics, (name, metric, sorted(metrics))
    assert metrics["data/src512_tgt128/dev_truncated"] == 2 and metrics["data/src1024_tgt256/dev_truncated"] == 0
    assert metrics["eval/src1024_tgt256/rouge-l"] == metrics["eval/rouge-l"]

    def table(path):
        local = client.download_artifacts(run.info.run_id, path, str(tmp_path / "dl"))
        return json.loads(open(local, encoding="utf-8").read())

    after = table("predictions/after.json")
    for name in LENGTHS:
        rows = table(f"predictions/{name}/after.json")
        assert rows["columns"] == after["columns"] and len(rows["data"]) == 2
        assert (tmp_path / "run" / "predictions" / name / "after.jsonl").exists()
    assert table("predictions/src1024_tgt256/after.json")["data"] == after["data"]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert "src512_tgt128/rouge-l" in result["metrics_after"]
    assert "rouge-l at src512_tgt128" in proc.stdout
