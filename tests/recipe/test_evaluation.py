"""Batched generation gives the same predictions as one sample at a time; the forgetting probe."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from glm_experiments.config.schema import EvalConfig, TinyModelConfig
from glm_experiments.data.templates import get_template
from glm_experiments.models.tiny.build import ensure_tiny_checkpoint
from glm_experiments.recipe.evaluation import evaluate_generation, generate, load_eval_set
from tests.helpers.common import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_base():
    path = ensure_tiny_checkpoint(TinyModelConfig())
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_batch_size_does_not_change_predictions(tiny_base):
    model, tokenizer = tiny_base
    template = get_template("chatglm3")
    lines = (ROOT / "data" / "adgen_demo" / "dev.json").read_text(encoding="utf-8").splitlines()[:12]
    # prompts of different lengths, so batches really are left-padded
    prompts = [template.prompt(tokenizer, [{"role": "user", "content": json.loads(l)["content"][: 20 + 3 * i]}])
               for i, l in enumerate(lines)]
    assert len({len(p) for p in prompts}) > 3
    one = generate(model, tokenizer, template, prompts, EvalConfig(batch_size=1, max_new_tokens=24), show_progress=False)
    eight = generate(model, tokenizer, template, prompts, EvalConfig(batch_size=8, max_new_tokens=24), show_progress=False)
    assert one == eight
    assert any(p for p in one)  # the base model does say something


def test_forgetting_probe_set_from_another_format(tiny_base):
    model, tokenizer = tiny_base
    template = get_template("chatglm3")
    probe = load_eval_set(str(ROOT / "data" / "spo_demo" / "dev.json"), "instruction", tokenizer, template,
                          max_source_length=64, max_samples=4)
    assert len(probe.prompts) == 4 and all(len(p) <= 64 for p in probe.prompts)
    assert all("_" in ref for ref in probe.references)  # head_relation_tail lines
    means, rows = evaluate_generation(model, tokenizer, template, probe, EvalConfig(max_new_tokens=8), ["triple_f1"])
    assert 0.0 <= means["triple_f1"] <= 100.0 and len(rows) == 4
