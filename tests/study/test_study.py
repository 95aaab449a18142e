"""What a new user meets first: ``--help``, the ``debug=smoke`` preset, experiment descriptions in MLflow, and
the history_demo set that makes ``experiment=source_length_ablation`` show an effect."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers.common import CONF_DIR, ROOT, compose, run_cli


# ------------------------------------------------------------------------------------ --help
def test_help_shows_examples_and_only_real_options(tmp_path):
    result = run_cli(["--help"], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "== Examples ==" in text and "python -m glm_experiments --multirun experiment=source_length_ablation" in text
    assert "debug=smoke" in text and "python -m glm_experiments.compare --experiment" in text
    assert "base_" not in text  # the schema nodes (base_model, base_data, ...) are no options
    assert "is powered by Hydra" not in text
    for group in sorted(p for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name != "hydra"):
        assert f"  {group.name}:" in text, group.name
        for option in group.glob("*.yaml"):
            assert option.stem in text, (group.name, option.stem)
    assert "tiny (default)" in text and "lora (default)" in text
    assert not list(tmp_path.iterdir()) or all(p.name != "outputs" for p in tmp_path.iterdir())  # nothing ran


# ------------------------------------------------------------------------------- debug=smoke
def test_debug_smoke_shortens_any_study():
    full = compose(["experiment=source_length_ablation"])
    smoke = compose(["experiment=source_length_ablation", "debug=smoke"])
    assert smoke.train.max_steps <= 10 < full.train.max_steps
    assert smoke.eval.max_samples <= 8 and smoke.eval.max_new_tokens <= 16 and not smoke.eval.before_training
    assert 0 < smoke.train.save_steps <= smoke.train.max_steps
    # only the lengths of a run change, not what the study compares
    assert (smoke.data.name, smoke.data.max_source_length, smoke.method.name) == ("history_demo", 512, "full")
    assert compose(["debug=smoke"]).train.max_steps == smoke.train.max_steps  # with the default run too
    assert compose([]).train.max_steps != smoke.train.max_steps  # and off by default


# --------------------------------------------------------------------- experiment descriptions
@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")))
def test_every_experiment_has_a_one_line_description(name):
    description = compose([f"experiment={name}"]).tracking.description
    assert description and "\n" not in description and len(description) <= 200, name


def test_description_becomes_the_experiment_note(tmp_path):
    from mlflow import MlflowClient
    from omegaconf import OmegaConf

    from glm_experiments.tracking.store import open_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = OmegaConf.create({"tracking_uri": uri, "experiment_name": "study", "description": "first words"})
    _, experiment_id = open_experiment(cfg)  # created with it
    note = lambda: MlflowClient(tracking_uri=uri).get_experiment(experiment_id).tags.get("mlflow.note.content")  # noqa: E731
    assert note() == "first words"
    cfg.description = "changed"
    assert open_experiment(cfg)[1] == experiment_id and note() == "changed"  # opened: updated
    cfg.description = None
    assert open_experiment(cfg)[1] == experiment_id and note() == "changed"  # none given: left alone
    _, other = open_experiment(OmegaConf.create({"tracking_uri": uri, "experiment_name": "plain"}))
    tags = MlflowClient(tracking_uri=uri).get_experiment(other).tags
    assert "mlflow.note.content" not in tags
    # MLflow 3's UI picks the training-runs view for experiments of this kind
    assert tags["mlflow.experimentKind"] == "custom_model_development"


# ------------------------------------------------------------------------------ history_demo
def test_history_demo_needs_the_first_turn_and_512_cuts_it(tiny_tokenizer):
    """Every conversation's last answer repeats facts said only in its first turn; max_source_length 512 cuts
    that turn away in every sample, 1024 cuts nothing (the ablation's whole point)."""
    from glm_experiments.data.templates import ChatGLM3Template, truncate

    template = ChatGLM3Template()
    for split in ("train", "dev"):
        path = ROOT / "data" / "history_demo" / f"{split}.json"
        assert path.stat().st_size < 500_000
        for line in path.read_text(encoding="utf-8").splitlines():
            messages = json.loads(line)["conversations"]
            kind, colour, material = re.search(r"类型#(.+?)\*颜色#(.+?)\*材质#([^，。]+)", messages[1]["content"]).groups()
            assert messages[-1]["content"] == f"那件是{colour}的{material}{kind}。"
            later = "".join(m["content"] for m in messages[3:-1])
            assert colour not in later and material not in later  # said in the first turn only
            encoded = template.encode(tiny_tokenizer, messages)
            assert 600 < encoded.source_len <= 1024
            for length, cut_expected in ((512, True), (1024, False)):
                ids, _, cut = truncate(encoded, length, 128)
                prompt = tiny_tokenizer.decode(ids).rsplit("<|assistant|>", 1)[0]  # without the answer
                assert cut == cut_expected and (colour in prompt) != cut_expected, (length, prompt[:80])
