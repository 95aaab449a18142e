"""No silent NaN, no screenful from Hydra (issue 30): NaN and +-inf for every float setting of the schema, every kind
of override Hydra cannot compose, ``+key`` for a key the schema lacks and settings that name something are refused
in one ``error: <override>: <reason>`` line with exit code 2 -- before anything trains."""

from __future__ import annotations

import dataclasses
import importlib.util
import typing

import pytest

from glm_experiments.config.hydra_checks import CompositionError
from glm_experiments.errors import UserError
from glm_experiments.recipe.train import preflight
from tests.helpers.common import compose, run_cli

HAS_OPTUNA_SWEEPER = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None


# ------------------------------------------------------------------------- NaN and inf, from the schema
def _float_fields(schema: type, prefix: str):
    from glm_experiments.config.schema import _schema_of

    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.name == "method":
            continue  # each method's own schema, below
        sub = _schema_of(hints[f.name])
        if sub is not None:
            yield from _float_fields(sub, f"{prefix}{f.name}.")
        elif float in (hints[f.name], *typing.get_args(hints[f.name])):
            yield f"{prefix}{f.name}"


def float_settings() -> list[tuple[str, str]]:
    """(method option, key) for every float field of the schema: the run config's and every method's own."""
    from glm_experiments.config.schema import Config
    from glm_experiments.methods import get_method, method_names

    settings = [("lora", key) for key in _float_fields(Config, "")]
    for name in method_names():
        settings += [(name, key) for key in _float_fields(get_method(name).schema, "method.")]
    return settings


FLOAT_SETTINGS = float_settings()
_composed: dict[str, object] = {}


def test_the_schema_has_float_settings_of_every_kind():
    keys = {key for _, key in FLOAT_SETTINGS}
    assert {"train.learning_rate", "train.weight_decay", "eval.temperature", "model.tiny.pretrain_lr",
            "method.dropout", "method.prefix_dropout"} <= keys, keys


@pytest.mark.parametrize("method,key", FLOAT_SETTINGS, ids=[f"{m}:{k}" for m, k in FLOAT_SETTINGS])
def test_nan_and_inf_are_refused_for_every_float_setting(method, key):
    """Composed once per method option; each value parsed by Hydra's override grammar as the CLI parses it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from glm_experiments.config.schema import check_settings

    if method not in _composed:
        _composed[method] = compose([f"method={method}", "output_dir=/tmp/unused"])
    parser = OverridesParser.create()
    for text in ("nan", "inf", "-inf"):
        cfg = _composed[method].copy()
        OmegaConf.update(cfg, key, parser.parse_override(f"{key}={text}").value())
        with pytest.raises(UserError) as info:
            check_settings(cfg)
        message = str(info.value)
        assert message.startswith(f"{key}={text}: must be ") and "a finite number" in message, message
        assert "\n" not in message


def test_nan_message_is_the_range_message():
    with pytest.raises(UserError) as info:
        preflight(compose(["train.learning_rate=nan", "output_dir=/tmp/unused"]))
    assert str(info.value) == "train.learning_rate=nan: must be a finite number > 0"


# ---------------------------------------------------------------------------------- what Hydra refuses
GRAMMAR = "(override syntax: https://hydra.cc/docs/1.3/advanced/override_grammar/basic/)"
INT = "could not be converted to Integer"
NOT_COMPOSING = [
    (["train.max_steps=abc"], f"train.max_steps=abc: Value 'abc' of type 'str' {INT}"),
    (["train.max_steps=1e30"], f"train.max_steps=1e30: Value '1e+30' of type 'float' {INT}"),
    (["train.max_steps="], f"train.max_steps=: Value '' of type 'str' {INT}"),
    (["train.max_steps=inf"], f"train.max_steps=inf: Value 'inf' of type 'float' {INT}"),
    (["train.max_stepz=3"], "train.max_stepz=3: no such setting (did you mean train.max_steps?)"),
    (["nope=3"], "nope=3: no such setting (the config has model, method, data, deepspeed, launcher, tracking, train, "
                 "eval, seed, output_dir, resume, sanity_print, optimize_metric)"),
    (["method=ptuning", "method.r=4"], ("method.r=4: no such setting (method has name, pre_seq_len, "
                                       "prefix_projection, prefix_hidden_size, prefix_dropout, init_from)")),
    (["deepspeed.config.stage=2"], "deepspeed.config.stage=2: deepspeed.config is null in this config, so it has no "
                                   "keys to set; give deepspeed.config a value (or choose a config group option that "
                                   "has one)"),
    (["train.max_steps==3"], f"train.max_steps==3: extraneous input '=' {GRAMMAR}"),
    (["train.max_steps=[1,2"], f"train.max_steps=[1,2: no viable alternative at input '[1,2' {GRAMMAR}"),
    (["train.learning_rate=1e-3,,2e-3"], f"train.learning_rate=1e-3,,2e-3: extraneous input ',' {GRAMMAR}"),
    (["train.max_steps=range(1,"], f"train.max_steps=range(1,: no viable alternative at input 'range(1,' {GRAMMAR}"),
    (["train.max_steps=choice()"],
     f"train.max_steps=choice(): ValueError while evaluating 'choice()': empty choice is not legal {GRAMMAR}"),
    (["train.max_steps=1,2"], "train.max_steps=1,2: a list is written [a,b], a string with commas quoted ('a,b'), "
                              "and a sweep needs --multirun"),
    (["method=lorra"], "method=lorra: no such option (conf/method/ has dora, freeze, full, lora, prompt_tuning, "
                       "ptuning, qlora)"),
    (["~train.max_steps"], "~train.max_steps: TrainConfig (DictConfig) does not support deletion"),
    (["+train.max_steps=3"], "+train.max_steps=3: train.max_steps is already set (override it without +: "
                             "train.max_steps=3)"),
    (["deepspeed=zero2", "deepspeed.config.newkey=1"],  # a free dict, not a schema node: Hydra's hint
     "deepspeed.config.newkey=1: no such key (to add one: +deepspeed.config.newkey=1)"),
    (["hydra/launcher=joblib"], "hydra/launcher=joblib: needs hydra/launcher/joblib, a Hydra plugin that is not "
                                "installed (install the Hydra plugin that provides hydra/launcher/joblib)"),
]
if not HAS_OPTUNA_SWEEPER:
    NOT_COMPOSING.append((["hparams_search=optuna"], 'hparams_search=optuna: needs hydra/sweeper/optuna, a Hydra '
                                                     'plugin that is not installed (pip install -e ".[optuna]")'))


@pytest.mark.parametrize("overrides,message", NOT_COMPOSING, ids=[" ".join(o) for o, _ in NOT_COMPOSING])
def test_what_hydra_cannot_compose_is_one_line(overrides, message):
    with pytest.raises(CompositionError) as info:
        compose(overrides)
    assert str(info.value) == message
    assert info.value.__cause__ is not None  # Hydra's own error, for --debug


# (overrides, message): composes, refused by preflight before any weight loads
REFUSED_BEFORE_TRAINING = [
    (["+train.nope=3"], "+train.nope=3: no such setting (train has max_steps, num_train_epochs, per_device_train_batch_size, "
                        "gradient_accumulation_steps, learning_rate, lr_scheduler_type, warmup_ratio, weight_decay, "
                        "max_grad_norm, logging_steps, eval_steps, save_steps, save_total_limit, gradient_checkpointing, "
                        "group_by_length, packing, loss_chunk_size, dataloader_num_workers, precision, on_nonfinite, "
                        "early_stopping, keep_best)"),
    (["+train.max_stepz=3"], "+train.max_stepz=3: no such setting (did you mean train.max_steps?)"),
    (["+nope=3"], "+nope=3: no such setting (the config has model, method, data, deepspeed, launcher, tracking, "
                  "train, eval, seed, output_dir, resume, sanity_print, optimize_metric)"),
    (["train.learning_rate=${oops}"], "train.learning_rate=${oops}: interpolation key 'oops' not found"),
    (["data.train_file=${oops.x}"], "data.train_file=${oops.x}: interpolation key 'oops.x' not found"),
    (["data.metrics=[bleu-5]"], "data.metrics=[bleu-5]: unknown metric bleu-5 (known: accuracy, bleu-4, rouge-1, "
                                "rouge-2, rouge-l, triple_f1, triple_f1_micro)"),
    (["eval.forgetting_metrics=[rouge-l,f1]"], "eval.forgetting_metrics=[rouge-l,f1]: unknown metric f1 (known: "
                                               "accuracy, bleu-4, rouge-1, rouge-2, rouge-l, triple_f1, triple_f1_micro)"),
    (["eval.do_sample=true", "eval.temperature=nan"], "eval.temperature=nan: must be a finite number > 0"),
    (["train.weight_decay=nan"], "train.weight_decay=nan: must be a finite number >= 0"),
    (["train.max_grad_norm=inf"], "train.max_grad_norm=inf: must be 0 (no clipping) or a finite number > 0"),
    (["method=freeze", "method.num_last_layers=9"],
     "method.num_last_layers=9: must be in [1, 4] (the model's layers, model.tiny.num_hidden_layers)"),
    (["train.on_nonfinite=ignore"], "train.on_nonfinite=ignore: expected one of stop, skip_step, continue"),
    (["train.on_nonfinite=skip_step", "deepspeed=zero2"],
     "train.on_nonfinite=skip_step does not work with deepspeed=zero2 (the engine updates the weights inside "
     "backward, before the gradient norm is known): use stop or continue"),
]


@pytest.mark.parametrize("overrides,message", REFUSED_BEFORE_TRAINING,
                         ids=[" ".join(o) for o, _ in REFUSED_BEFORE_TRAINING])
def test_refused_before_training(overrides, message, tmp_path):
    with pytest.raises(UserError) as info:
        preflight(compose([*overrides, f"output_dir={tmp_path / 'out'}"]))
    assert str(info.value) == message


def test_fp16_mixed_precision_on_a_cpu_is_refused(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as info:
        preflight(compose(["train.precision=float16", f"output_dir={tmp_path / 'out'}"]))
    assert str(info.value).startswith("train.precision=float16: fp16 mixed precision needs a CUDA GPU")


def test_float16_weights_on_a_cpu_warn_in_one_line(monkeypatch, caplog):
    import torch

    from glm_experiments.models.loading import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING"):
        assert resolve_dtype("float16") is torch.float16
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert record.getMessage().startswith("model.dtype=float16 on a CPU: half-precision matmuls have no fast CPU kernels")
    assert "bfloat16" in record.getMessage() and "35 min" in record.getMessage() and "\n" not in record.getMessage()


# ------------------------------------------------------------------------------------ the real CLI
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_one_line_exit_2(tmp_path):
    """A few real command lines (each costs seconds): Hydra's errors, a NaN setting, a sweep whose jobs fail,
    and --debug's traceback."""
    cases = [
        (["train.max_steps=abc"], f"error: train.max_steps=abc: Value 'abc' of type 'str' {INT}"),
        (["train.max_steps==3"], f"error: train.max_steps==3: extraneous input '=' {GRAMMAR}"),
        (["train.learning_rate=nan", f"hydra.run.dir={tmp_path / 'nan'}"],
         "error: train.learning_rate=nan: must be a finite number > 0"),
        # every job of the sweep fails its preflight; the first one's line is the sweep's
        (["--multirun", "train.learning_rate=nan,inf", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
         "error: train.learning_rate=nan: must be a finite number > 0"),
    ]
    for args, line in cases:
        proc = run_cli([*args, "tracking=none"], tmp_path)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert proc.stderr.strip().splitlines()[-1] == line, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
    debug = run_cli(["--debug", "train.max_steps=abc", "tracking=none"], tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigCompositionException" in debug.stderr
