"""conf/experiment/reproduce/: every preset composes to its source's settings (as the CLI composes it, and as
``--cfg job`` prints it), names its source and published figure, and runs end to end on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers.common import CONF_DIR, ROOT, compose, run_cli

PRESET_DIR = Path(CONF_DIR) / "experiment" / "reproduce"

THUDM_PTUNING = {"method.name": "ptuning", "method.pre_seq_len": 128, "method.prefix_projection": False,
                 "model.quantization": "4bit", "data.name": "adgen", "data.prompt_column": "content",
                 "data.response_column": "summary", "data.max_source_length": 64, "train.learning_rate": 2e-2,
                 "train.per_device_train_batch_size": 1, "train.gradient_accumulation_steps": 16,
                 "train.max_steps": 3000, "train.num_train_epochs": None, "train.logging_steps": 10,
                 "train.save_steps": 1000, "train.lr_scheduler_type": "linear", "train.warmup_ratio": 0.0,
                 "eval.metric_convention": "thudm_ptuning", "eval.do_sample": True, "eval.top_p": 0.7,
                 "eval.temperature": 0.95, "eval.max_samples": None}
CHATGLM3_FINETUNE = {"model.name": "chatglm3", "model.quantization": None, "data.max_source_length": 256,
                     "data.max_target_length": 512, "train.learning_rate": 5e-5, "train.per_device_train_batch_size": 4,
                     "train.gradient_accumulation_steps": 1, "train.max_steps": 3000, "train.save_steps": 500,
                     "train.eval_steps": 500, "train.keep_best": False, "train.logging_steps": 10, "eval.max_new_tokens": 512,
                     "eval.batch_size": 16, "eval.do_sample": False, "eval.max_samples": 50,
                     "eval.metric_convention": "chatglm3_finetune"}
LIUCONGG = {"model.name": "chatglm", "data.name": "spo", "data.max_source_length": 1024, "data.max_target_length": 533,
            "train.num_train_epochs": 2.0, "train.per_device_train_batch_size": 1,
            "train.gradient_accumulation_steps": 4, "train.learning_rate": 1e-4, "train.warmup_ratio": 0.1,
            "train.weight_decay": 0.1, "train.gradient_checkpointing": True, "train.logging_steps": 10, "seed": 1234}
EXPECTED = {
    "chatglm6b_ptuning_v2": {**THUDM_PTUNING, "model.name": "chatglm", "data.max_target_length": 64,
                             "eval.max_new_tokens": 64},
    "chatglm2_ptuning_v2": {**THUDM_PTUNING, "model.name": "chatglm2", "data.max_target_length": 128,
                            "eval.max_new_tokens": 128},
    "chatglm3_finetune_lora": {**CHATGLM3_FINETUNE, "method.name": "lora", "method.r": 8, "method.alpha": 32,
                               "method.dropout": 0.1, "method.target_modules": ["q_proj", "k_proj", "v_proj"]},
    "chatglm3_finetune_ptuning_v2": {**CHATGLM3_FINETUNE, "method.name": "ptuning", "method.pre_seq_len": 128,
                                     "method.prefix_projection": False},
    "history_length_ablation": {"model.name": "chatglm", "method.name": "full", "data.name": "conversations",
                                "data.max_source_length": 512, "data.max_target_length": 128,
                                "train.per_device_train_batch_size": 2, "train.learning_rate": 1e-5,
                                "train.num_train_epochs": 5.0, "deepspeed.name": "zero2"},
    "liucongg_freeze": {**LIUCONGG, "method.name": "freeze", "method.num_last_layers": 4, "deepspeed.name": "zero2"},
    "liucongg_lora": {**LIUCONGG, "method.name": "lora", "method.r": 16, "method.alpha": 64, "method.dropout": 0.1,
                      "deepspeed.name": "zero2"},
    "liucongg_ptuning": {**LIUCONGG, "method.name": "ptuning", "method.pre_seq_len": 16, "method.prefix_projection": True,
                         "deepspeed.name": "zero2"},
    "liucongg_full": {**LIUCONGG, "method.name": "full", "deepspeed.name": "zero3_offload"},
}
PUBLISHED = {"chatglm6b_ptuning_v2": ["8.10", "24.97"], "chatglm2_ptuning_v2": ["6.7G"],
             "chatglm3_finetune_lora": ["14082MiB", "14,082 MiB"], "chatglm3_finetune_ptuning_v2": ["18426MiB", "18,426"],
             "history_length_ablation": ["0.9", "0.5", "1,043"], "liucongg_freeze": ["0.5675"],
             "liucongg_lora": ["0.5359"], "liucongg_ptuning": ["0.6283"], "liucongg_full": ["33 GB"]}


def _value(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return list(node) if hasattr(node, "__iter__") and not isinstance(node, (str, dict)) and node is not None \
        and not hasattr(node, "keys") else node


def test_every_preset_is_listed_here():
    assert sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_composes_to_its_sources_settings(name):
    cfg = compose([f"experiment=reproduce/{name}"])
    assert {k: _value(cfg, k) for k in EXPECTED[name]} == EXPECTED[name]
    header = (PRESET_DIR / f"{name}.yaml").read_text(encoding="utf-8").split("\ndefaults:")[0]
    assert "Published figure to compare against" in header and "seed 00" in header
    assert all(figure in header for figure in PUBLISHED[name]), PUBLISHED[name]
    assert cfg.tracking.experiment_name == f"reproduce_{name}" or name.startswith("liucongg")


def test_history_ablation_sweeps_both_arms_with_their_batch():
    cfg = compose(["experiment=reproduce/history_length_ablation", "lengths=src1024_tgt256_bs1"])
    assert (cfg.data.max_source_length, cfg.data.max_target_length, cfg.train.per_device_train_batch_size,
            cfg.eval.max_new_tokens) == (1024, 256, 1, 256)
    text = (PRESET_DIR / "history_length_ablation.yaml").read_text()
    assert "lengths: src512_tgt128_bs2,src1024_tgt256_bs1" in text


@pytest.mark.slow
def test_cfg_job_prints_the_same_values(tmp_path):
    for name, expected in EXPECTED.items():
        result = run_cli([f"experiment=reproduce/{name}", "--cfg", "job"], tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        printed = yaml.safe_load(result.stdout)
        got = {}
        for key in expected:
            node = printed
            for part in key.split("."):
                node = node[part]
            got[key] = node
        assert got == expected, name


# data each preset runs on here: the demo set of the same format (model=tiny, debug=smoke, no DeepSpeed on this CPU)
DEMO = {"adgen": "adgen_demo", "conversations": "conversations_demo", "spo": "spo_demo"}


@pytest.mark.slow
@pytest.mark.parametrize("data", sorted(DEMO))
def test_presets_run_end_to_end_on_the_tiny_model(data, tmp_path):
    from mlflow import MlflowClient

    names = [n for n, e in EXPECTED.items() if compose([f"experiment=reproduce/{n}"]).data.name == data]
    demo = ROOT / "data" / DEMO[data]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli(["--multirun", "experiment=" + ",".join(f"reproduce/{n}" for n in names), "debug=smoke",
                      "model=tiny", f"data={DEMO[data]}", f"data.train_file={demo / 'train.json'}",
                      f"data.dev_file={demo / 'dev.json'}", "deepspeed=none", "train.max_steps=4",
                      "eval.max_samples=4", "eval.max_new_tokens=8", "data.max_train_samples=32",
                      f"tracking.tracking_uri={uri}", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    client = MlflowClient(tracking_uri=uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.data.tags.get("glm_experiments.role") != "sweep_parent" and "method.name" in r.data.params]
    jobs = len(names) + (1 if data == "conversations" else 0)  # the history ablation is a 2-job sweep itself
    assert len(runs) == jobs and all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status)
                                                                                  for r in runs]
    for run in runs:
        convention = run.data.params["eval.metric_convention"]
        assert run.data.tags["metric_convention"].startswith(convention)
        assert run.data.metrics["eval/loss_samples"] <= 16
    if data == "adgen":  # the THUDM P-Tuning presets train on a real 4-bit base, here on the CPU
        quantized = [r for r in runs if r.data.params.get("model.quantization") == "4bit"]
        assert len(quantized) == 2
    result_files = list((tmp_path / "sweep").rglob("result.json"))
    assert len(result_files) == jobs and all(json.loads(f.read_text())["metrics_after"] for f in result_files)
