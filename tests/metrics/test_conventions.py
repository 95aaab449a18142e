"""eval.metric_convention: the ChatGLM3 finetune_demo convention against an independent re-implementation of
finetune_hf.py's compute_metrics, and compare's refusal to mix conventions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers.common import ROOT
from glm_experiments.metrics import compute_metrics, definitions

METRICS = ["bleu-4", "rouge-1", "rouge-2", "rouge-l"]


def finetune_hf_compute_metrics(pred_texts: list[str], label_texts: list[str]) -> dict[str, float]:
    """THUDM/ChatGLM3 finetune_demo/finetune_hf.py ``compute_metrics`` (repository HEAD 732294f), line for line,
    with ``tokenizer.decode(ids)`` replaced by the decoded texts themselves."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    metrics_dct = {'rouge-1': [], 'rouge-2': [], 'rouge-l': [], 'bleu-4': []}
    for pred_txt, label_txt in zip(pred_texts, label_texts):
        pred_txt = pred_txt.strip()
        label_txt = label_txt.strip()
        pred_tokens = list(jieba.cut(pred_txt))
        label_tokens = list(jieba.cut(label_txt))
        rouge = Rouge()
        scores = rouge.get_scores(' '.join(pred_tokens), ' '.join(label_tokens))
        for k, v in scores[0].items():
            metrics_dct[k].append(round(v['f'] * 100, 4))
        metrics_dct['bleu-4'].append(
            sentence_bleu(
                [label_tokens],
                pred_tokens,
                smoothing_function=SmoothingFunction().method3,
            )
        )
    return {k: np.mean(v) for k, v in metrics_dct.items()}


def _pairs() -> tuple[list[str], list[str]]:
    """AdvertiseGen-style references (the demo dev set) and predictions a fine-tuned model would write: partly
    copied phrases, reordered clauses, a shorter and a longer one, surrounding whitespace, a few hand-written."""
    rows = [json.loads(line) for line in (ROOT / "data/adgen_demo/dev.json").read_text(encoding="utf-8").splitlines()]
    refs = [r["summary"] for r in rows[:40]]
    preds = []
    for i, ref in enumerate(refs):
        clauses = [c for c in ref.replace("。", "，").split("，") if c]
        if i % 4 == 0:
            preds.append("，".join(reversed(clauses)) + "。")
        elif i % 4 == 1:
            preds.append("  " + "，".join(clauses[: max(1, len(clauses) // 2)]) + "。\n")
        elif i % 4 == 2:
            preds.append("，".join(clauses[1:] + ["穿着舒适又显气质", "是日常出行的好选择"]) + "。")
        else:
            preds.append(rows[(i + 7) % len(rows)]["summary"])  # another sample's reply: low overlap
    preds += ["这款连衣裙采用柔软的雪纺面料，飘逸灵动，v领设计修饰脸型。", "简约的白色衬衫，百搭又清爽。", "宽松版型"]
    refs += ["这款连衣裙选用雪纺面料，轻盈飘逸，精致的v领设计显脸小，尽显女性的温柔气质。",
             "这件衬衫采用白色设计，简约大方，搭配牛仔裤就很好看。", "这款卫衣采用宽松的版型设计，慵懒随性，舒适自在。"]
    return preds, refs


def test_chatglm3_finetune_equals_finetune_hf():
    preds, refs = _pairs()
    expected = finetune_hf_compute_metrics(preds, refs)
    means, per_sample = compute_metrics(preds, refs, METRICS, convention="chatglm3_finetune")
    assert len(per_sample) == len(preds) == 43
    for name in METRICS:
        assert abs(means[name] - float(expected[name])) <= 1e-6, (name, means[name], expected[name])
    # what sets the two conventions apart: BLEU on words as a fraction, not on characters x100
    assert 0 < means["bleu-4"] < 1
    thudm, _ = compute_metrics(preds, refs, METRICS)
    assert thudm["bleu-4"] > 1 and thudm["bleu-4"] != pytest.approx(100 * means["bleu-4"], rel=1e-3)
    # ROUGE rounded to 4 places per sample
    assert all(s["rouge-l"] == round(s["rouge-l"], 4) for s in per_sample)


def test_convention_definitions_and_unknown_convention():
    from glm_experiments.errors import UserError

    assert "characters" in definitions()["bleu-4"] and "x100" in definitions()["bleu-4"]
    assert "jieba words" in definitions("chatglm3_finetune")["bleu-4"]
    assert "NOT x100" in definitions("chatglm3_finetune")["bleu-4"]
    with pytest.raises(UserError, match="eval.metric_convention=sacrebleu: expected one of thudm_ptuning, "
                                        "chatglm3_finetune"):
        compute_metrics(["a"], ["a"], ["bleu-4"], convention="sacrebleu")
    # an empty prediction scores 0 under both (finetune_hf.py itself would crash in rouge_chinese)
    _, per_sample = compute_metrics(["  ", "好看"], ["好看的裙子", "好看"], METRICS, convention="chatglm3_finetune")
    assert per_sample[0] == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def test_compare_refuses_mixed_conventions(tmp_path, capsys):
    from mlflow import MlflowClient

    from glm_experiments.compare import main
    from glm_experiments.study.comparison import CompareError, compare_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("mixed", artifact_location=(tmp_path / "mlartifacts").as_uri())
    for convention in ("chatglm3_finetune", None):  # None: a run logged before the setting existed (the default)
        run = client.create_run(exp)
        client.log_param(run.info.run_id, "method.name", "lora")
        if convention:
            client.log_param(run.info.run_id, "eval.metric_convention", convention)
        client.log_metric(run.info.run_id, "eval/bleu-4", 0.08 if convention else 8.1, step=6)
        client.set_terminated(run.info.run_id, "FINISHED")
    with pytest.raises(CompareError, match="different eval.metric_convention .*chatglm3_finetune.*thudm_ptuning"):
        compare_runs(tracking_uri=uri, experiment="mixed")
    assert main(["--tracking-uri", uri, "--experiment", "mixed", "--out", str(tmp_path / "c")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not comparable" in errors[0]
    # one convention selected: compared
    rows = compare_runs(tracking_uri=uri, experiment="mixed",
                        filter_string="params.eval.metric_convention = 'chatglm3_finetune'")
    assert len(rows) == 1
