"""method.init_from takes a THUDM/PEFT adapter's own shape (LoRA r, alpha, target modules; P-Tuning v2 pre_seq_len and
projection) from its files unless the user set them; a mismatch is one line naming both values and the user's path."""

from __future__ import annotations

import json

import pytest

from tests.helpers.common import ROOT, compose, run_cli
from tests.migration.test_thudm_adapters import bases, lora_weights, peft06_config, write_peft_adapter, write_ptuning_main_checkpoint  # noqa: F401

from glm_experiments.errors import UserError
from glm_experiments.migration.thudm_adapters import adopt_adapter_shape


def _lora_adapter(base, tmp_path):
    """ChatGLM3 finetune_demo's LoRA: r 4, alpha 8, on query_key_value and dense_4h_to_h."""
    weights = lora_weights("chatglm3", base, ["self_attention.query_key_value", "mlp.dense_4h_to_h"], 4)
    return write_peft_adapter(tmp_path / "finetune_demo_lora",
                              peft06_config("chatglm3", 4, 8, ["query_key_value", "dense_4h_to_h"]), weights, "bin")


def _cfg(base, *overrides):
    return compose(["model=chatglm3", f"model.path={base}", *overrides])


def test_lora_shape_comes_from_the_adapter(bases, tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_EXPERIMENTS_CACHE", str(tmp_path / "cache"))
    adapter = _lora_adapter(bases["chatglm3"], tmp_path)
    cfg = _cfg(bases["chatglm3"], "method=lora", f"method.init_from={adapter}")
    assert (cfg.method.r, cfg.method.alpha, list(cfg.method.target_modules)) == (8, 32, [])  # the schema's
    taken = adopt_adapter_shape(cfg, overrides=[])
    assert taken == {"r": 4, "alpha": 8, "target_modules": ["down_proj", "k_proj", "q_proj", "v_proj"]}
    assert (cfg.method.r, cfg.method.alpha, sorted(cfg.method.target_modules)) == (4, 8, taken["target_modules"])
    # the same value set by the user is no conflict
    cfg = _cfg(bases["chatglm3"], "method=lora", f"method.init_from={adapter}", "method.r=4")
    assert adopt_adapter_shape(cfg, overrides=["method.r=4"]) == {"alpha": 8, "target_modules": taken["target_modules"]}


def test_a_user_setting_that_disagrees_is_one_line_naming_both_and_the_users_path(bases, tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_EXPERIMENTS_CACHE", str(tmp_path / "cache"))
    adapter = _lora_adapter(bases["chatglm3"], tmp_path)
    # set on the command line, even to the schema's default
    cfg = _cfg(bases["chatglm3"], "method=lora", f"method.init_from={adapter}", "method.r=8")
    with pytest.raises(UserError) as err:
        adopt_adapter_shape(cfg, overrides=["method=lora", "method.r=8"])
    assert str(err.value) == (f"method.init_from={adapter}: the adapter there has r=4 but the run sets method.r=8; "
                              "drop those settings to train the adapter as it is")
    # set by a preset (differs from the schema default) counts as set too
    cfg = _cfg(bases["chatglm3"], "method=lora", f"method.init_from={adapter}", "method.alpha=16")
    with pytest.raises(UserError, match=r"has alpha=8 but the run sets method.alpha=16"):
        adopt_adapter_shape(cfg, overrides=[])


@pytest.mark.parametrize("projection", [False, True])
def test_ptuning_shape_comes_from_a_ptuning_main_checkpoint(projection, bases, tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_EXPERIMENTS_CACHE", str(tmp_path / "cache"))
    adapter = write_ptuning_main_checkpoint(tmp_path / "checkpoint-3000", bases["chatglm3"], 6, projection)
    cfg = _cfg(bases["chatglm3"], "method=ptuning", f"method.init_from={adapter}")
    taken = adopt_adapter_shape(cfg, overrides=[])
    hidden = json.loads((bases["chatglm3"] / "config.json").read_text())["hidden_size"]
    assert taken == ({"pre_seq_len": 6, "prefix_projection": True, "prefix_hidden_size": hidden} if projection
                     else {"pre_seq_len": 6})
    cfg = _cfg(bases["chatglm3"], "method=ptuning", f"method.init_from={adapter}", "method.pre_seq_len=128")
    with pytest.raises(UserError, match=rf"method.init_from={adapter}: the adapter there has pre_seq_len=6"):
        adopt_adapter_shape(cfg, overrides=["method.pre_seq_len=128"])


@pytest.mark.slow
def test_cli_trains_a_thudm_lora_of_another_rank_and_refuses_a_conflict_once(bases, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("GLM_EXPERIMENTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    adapter = _lora_adapter(bases["chatglm3"], tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["method=lora", f"method.init_from={adapter}", "model=chatglm3", f"model.path={bases['chatglm3']}",
              "model.dtype=float32", "train.max_steps=1", "train.per_device_train_batch_size=4",
              "data.max_train_samples=8", "data.dev_file=null", "eval.before_training=false", f"tracking.tracking_uri={uri}"]
    ok = run_cli([*common, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    run_id = json.loads((tmp_path / "run" / "result.json").read_text())["run_id"]
    params = MlflowClient(tracking_uri=uri).get_run(run_id).data.params
    assert (params["method.r"], params["method.alpha"]) == ("4", "8")
    saved = (tmp_path / "run" / ".hydra" / "config.yaml").read_text()  # predict / merge rebuild the run from it
    assert "r: 4" in saved and "alpha: 8" in saved

    bad = run_cli([*common, "method.r=16", f"hydra.run.dir={tmp_path / 'bad'}"], tmp_path)
    assert bad.returncode == 2
    message = f"method.init_from={adapter}: the adapter there has r=4 but the run sets method.r=16"
    assert (bad.stdout + bad.stderr).count(message) == 1, bad.stderr[-3000:]
    assert str(tmp_path / "cache") not in bad.stderr
