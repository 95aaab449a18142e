"""The composed config: defaults, typed schema, clear composition errors (also through the CLI)."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from glm_experiments.config.hydra_checks import CompositionError
from tests.helpers.common import compose, run_cli


def test_default_composition():
    cfg = compose(["output_dir=/tmp/x"])
    assert cfg.model.name == "tiny" and cfg.model.family == "tiny"
    assert cfg.method.name == "lora" and cfg.method.r == 8
    assert cfg.data.name == "adgen_demo" and cfg.data.format == "adgen"
    assert cfg.tracking.tracking_uri == "sqlite:///mlflow.db"
    assert cfg.deepspeed.name == "none"


@pytest.mark.parametrize("method,key", [("freeze", "num_last_layers"), ("ptuning", "pre_seq_len"),
                                        ("prompt_tuning", "num_virtual_tokens"), ("qlora", "r"), ("full", "name")])
def test_every_method_composes(method, key):
    cfg = compose([f"method={method}"])
    assert cfg.method.name == method and key in cfg.method


def test_method_defaults_have_one_owner_the_schema():
    """conf/method/*.yaml name their schema and nothing else; what composes is the schema's defaults."""
    import dataclasses
    from pathlib import Path

    import yaml

    from glm_experiments.methods import get_method, method_names

    for name in method_names():
        option = yaml.safe_load((Path(__file__).parents[2] / "conf" / "method" / f"{name}.yaml").read_text())
        assert set(option) == {"defaults", "name"} and option["name"] == name, name
        composed = compose([f"method={name}"]).method
        schema = get_method(name).schema
        for f in dataclasses.fields(schema):
            if f.name != "name":
                want = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                assert composed[f.name] == want, (name, f.name)


def test_mistyped_key_fails_at_compose_time():
    with pytest.raises(CompositionError) as info:
        compose(["train.max_stepz=3"])
    assert str(info.value) == "train.max_stepz=3: no such setting (did you mean train.max_steps?)"
    assert isinstance(info.value.__cause__, ConfigCompositionException)  # Hydra's, for --debug


def test_wrong_type_fails_at_compose_time():
    with pytest.raises(CompositionError) as info:
        compose(["train.max_steps=many"])
    assert str(info.value) == "train.max_steps=many: Value 'many' of type 'str' could not be converted to Integer"
    assert isinstance(info.value.__cause__.__cause__, ValidationError)


def test_method_keys_are_checked_per_method():
    # lora has r; ptuning has none: the schema of the chosen option decides
    with pytest.raises(CompositionError, match=r"^method.r=4: no such setting"):
        compose(["method=ptuning", "method.r=4"])


@pytest.mark.slow
def test_cli_reports_bad_input_in_one_clear_message(tmp_path):
    unknown = run_cli(["method=lorax"], tmp_path)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().endswith("error: method=lorax: no such option (conf/method/ has dora, freeze, full, "
                                           "lora, prompt_tuning, ptuning, qlora)")
    assert "Traceback" not in unknown.stderr

    typo = run_cli(["train.learning_rat=1e-3"], tmp_path)
    assert typo.returncode != 0 and "learning_rat" in typo.stderr and "Traceback" not in typo.stderr

    missing = run_cli(["data.train_file=nowhere/train.json", "tracking=none", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert missing.returncode == 1 or missing.returncode == 2
    assert "error: data file not found: nowhere/train.json" in missing.stderr
    assert "Traceback" not in missing.stderr
