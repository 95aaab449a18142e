"""Metric functions against hand-computed values."""

import math

import pytest

from glm_experiments.metrics import compute_metrics
from glm_experiments.metrics.text import bleu4, parse_triples, rouge


def test_bleu4_hand_computed():
    # 8 reference chars, prediction shares the first 4: p1=4/8, p2=3/7, p3=2/6, p4=1/5, no brevity penalty
    expected = 100 * (4 / 8 * 3 / 7 * 2 / 6 * 1 / 5) ** 0.25
    assert bleu4("春夏秋冬甲乙丙丁", "春夏秋冬东南西北") == pytest.approx(expected, rel=1e-9)
    assert bleu4("春夏秋冬东南西北", "春夏秋冬东南西北") == pytest.approx(100.0)


def test_rouge_on_jieba_words():
    # jieba: 我 / 爱 / 北京 vs 我 / 爱 / 上海: 2 of 3 unigrams, 1 of 2 bigrams shared
    scores = rouge("我爱北京", "我爱上海")
    assert scores["rouge-1"] == pytest.approx(200 / 3, abs=1e-3)
    assert scores["rouge-2"] == pytest.approx(50.0, abs=1e-3)
    assert scores["rouge-l"] == pytest.approx(200 / 3, abs=1e-3)


def test_empty_prediction_scores_zero():
    means, per_sample = compute_metrics(["", "我爱北京"], ["我爱北京", "我爱北京"], ["bleu-4", "rouge-1", "rouge-l"])
    assert per_sample[0] == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-l": 0.0}
    assert per_sample[1]["rouge-1"] == pytest.approx(100.0, abs=1e-3)
    assert means["rouge-1"] == pytest.approx(50.0, abs=1e-3)


def test_triple_f1_sample_and_micro():
    assert parse_triples("a_b_c\nbad line\nx_y\nd_e_f\n_e_f") == {("a", "b", "c"), ("d", "e", "f")}
    preds = ["马云_创始人_阿里巴巴\n杭州_总部_阿里巴巴", "张三_出生地_北京"]
    refs = ["马云_创始人_阿里巴巴", "张三_出生地_上海\n张三_毕业院校_清华"]
    means, per_sample = compute_metrics(preds, refs, ["triple_f1"])
    # sample 1: P=1/2, R=1 -> F1=2/3; sample 2: no overlap -> 0
    assert per_sample[0]["triple_f1"] == pytest.approx(200 / 3)
    assert per_sample[1]["triple_f1"] == 0.0
    assert means["triple_f1"] == pytest.approx(100 / 3)
    # micro: tp=1, predicted 3, reference 3 -> P=R=1/3
    assert means["triple_f1_micro"] == pytest.approx(100 / 3)


def test_accuracy_and_unknown_metric():
    means, _ = compute_metrics(["正面", " 负面 "], ["正面", "正面"], ["accuracy"])
    assert means["accuracy"] == 50.0
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(["a"], ["a"], ["bleu-5"])
    assert math.isclose(compute_metrics(["x"], ["x"], ["accuracy"])[0]["accuracy"], 100.0)
