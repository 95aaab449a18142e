"""Train to the best checkpoint (issue 28): ``train.early_stopping`` ends a run (FINISHED) once its evaluations stop
improving, ``train.keep_best`` makes the run's adapter/ the best evaluation's step (the last step's in adapter_last/),
both survive resume=auto, and an evaluation writes its predictions batch by batch."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from tests.helpers.common import compose, run_cli, signal_after_checkpoint

SMALL = ["train.logging_steps=1", "train.warmup_ratio=0", "train.per_device_train_batch_size=4",
         "data.max_train_samples=16", "data.max_dev_samples=8", "eval.before_training=false", "eval.max_samples=2",
         "eval.max_new_tokens=4", "eval.batch_size=2"]
# nothing can improve: train.learning_rate=0 is refused (schema: > 0), and 1e-12 moves no weight beyond rounding
FROZEN = "train.learning_rate=1e-12"


def _run(tmp_path, overrides: list[str], name: str = "run"):
    """An in-process run (as train.run is called by the CLI), its config saved where predict looks for it."""
    from glm_experiments.recipe.train import run

    cfg = compose([*SMALL, *overrides, f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                   "tracking.experiment_name=best", f"output_dir={tmp_path / name}"])
    (tmp_path / name / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, tmp_path / name / ".hydra" / "config.yaml")
    return run(cfg)


def _mlflow_run(uri: str, experiment: str = "best"):
    """The experiment's latest run (a killed run's resume opens a new one)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              order_by=["attributes.start_time DESC"])[0]


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------ decisions
def _callback(**settings):
    from glm_experiments.recipe.best_checkpoint import BestCheckpointCallback

    state = SimpleNamespace(best_metric=None, best_global_step=0, stateful_callbacks={}, max_steps=100)
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    return BestCheckpointCallback(**{"metric": "rouge-l", "mode": "max", **settings}), state, control


def test_patience_counts_evaluations_without_an_improvement_above_min_delta():
    callback, state, control = _callback(patience=2, min_delta=1.0)
    for step, value in ((2, 10.0), (4, 10.5), (6, 9.0)):
        control.should_save = False
        callback.observe(state, control, step, {"rouge-l": value})
    # 10.5 is the best (any gain) and saved, but not an improvement above min_delta: two in a row stop training
    assert (state.best_metric, state.best_global_step, callback.bad_evaluations) == (10.5, 4, 2)
    assert control.should_training_stop and callback.stopped_at == 6
    control.should_training_stop = False
    callback.observe(state, control, 100, {"rouge-l": 1.0})  # the last step: training ends there anyway
    assert not control.should_training_stop and callback.stopped_at == 6
    assert callback.reason == "rouge-l not improved by more than 1 in 2 evaluation(s) (best 10.5000)"


def test_loss_is_minimised_and_the_counter_comes_back_from_the_checkpoint_state():
    callback, state, control = _callback(metric="loss", mode="min", patience=3)
    state.stateful_callbacks = {"BestCheckpointCallback": {"attributes": {"bad_evaluations": 2}}}
    state.best_metric, state.best_global_step = 0.5, 4  # as trainer_state.json gives them back
    callback.on_train_begin(None, state, control)
    assert callback.bad_evaluations == 2
    callback.observe(state, control, 8, {"loss": 0.4})
    assert (state.best_global_step, callback.bad_evaluations, control.should_save) == (8, 0, True)
    callback.observe(state, control, 10, {"loss": math.nan})  # not a figure: no decision
    assert callback.bad_evaluations == 0 and not control.should_training_stop


@pytest.mark.parametrize("overrides, message", [
    (["train.early_stopping.patience=2"],
     "train.early_stopping.patience=2 needs train.eval_steps > 0: the evaluations during training it watches"),
    (["train.eval_steps=2", "train.early_stopping.patience=2", "train.early_stopping.metric=bleu"],
     ("train.early_stopping.metric=bleu: not computed by this run (data.metrics: bleu-4, rouge-1, rouge-2, rouge-l; "
      "or loss); train.early_stopping.patience=2 watches it")),
    (["train.eval_steps=2", "train.keep_best=true", "data.dev_file=null"],
     "train.keep_best=true needs data.dev_file: the evaluations it watches are on the dev set"),
])
def test_settings_that_cannot_work_are_one_line(overrides, message):
    from glm_experiments.errors import UserError
    from glm_experiments.recipe.best_checkpoint import best_settings

    with pytest.raises(UserError) as info:
        best_settings(compose(overrides))
    assert str(info.value) == message


def test_defaults():
    from glm_experiments.recipe.best_checkpoint import BestSettings, best_settings

    assert best_settings(compose([])) is None  # eval_steps 0: nothing to watch
    assert best_settings(compose(["train.eval_steps=5", "data.dev_file=null"])) is None  # no evaluation: not asked for
    assert best_settings(compose(["train.eval_steps=5", "data=spo_demo"])) is None  # optimize_metric rouge-l not computed
    assert best_settings(compose(["train.eval_steps=5"])) == BestSettings("rouge-l", "max", True, None, 0.0)
    assert best_settings(compose(["train.eval_steps=5", "train.early_stopping.metric=loss",
                                  "train.early_stopping.patience=2"])) == BestSettings("loss", "min", True, 2, 0.0)


# ------------------------------------------------------------------------------ predictions as they come
class _FakeModel:
    """Generates one token per prompt; the second batch is interrupted (Ctrl-C, a kill's KeyboardInterrupt)."""

    training = False

    def __init__(self):
        import torch

        self.calls, self.weight = 0, torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self.weight])

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def generate(self, input_ids, attention_mask, **kwargs):
        import torch

        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return torch.cat([input_ids, torch.full((len(input_ids), 1), 7)], dim=1)


def test_an_interrupted_evaluation_keeps_the_complete_lines_of_its_finished_batches(tmp_path):
    from glm_experiments.recipe.evaluation import EvalSet, evaluate_generation

    tokenizer = SimpleNamespace(pad_token_id=0, decode=lambda ids, skip_special_tokens=True: "reply")
    template = SimpleNamespace(stop_ids=lambda tok: [2], clean_response=lambda text: text)
    eval_set = EvalSet(prompts=[[5, 6], [5], [5, 6, 7], [5, 6, 7, 8]], inputs=["a", "b", "c", "d"],
                       references=["reply", "x", "reply", "y"])
    settings = SimpleNamespace(max_new_tokens=1, do_sample=False, num_beams=1, batch_size=2)
    path = tmp_path / "step4.jsonl"
    with pytest.raises(KeyboardInterrupt):
        evaluate_generation(_FakeModel(), tokenizer, template, eval_set, settings, ["rouge-l"], show_progress=False,
                            stream_to=path)
    assert path.read_text(encoding="utf-8").endswith("\n")
    rows = _jsonl(path)  # every line complete JSON: the first batch, the two shortest prompts
    assert [r["input"] for r in rows] == ["b", "a"]
    assert [r["prediction"] for r in rows] == ["reply", "reply"] and rows[1]["rouge-l"] == 100.0

    model = _FakeModel()
    model.calls = 2  # no interruption: the file is rewritten in the dev set's order
    means, _ = evaluate_generation(model, tokenizer, template, eval_set, settings, ["rouge-l"], show_progress=False,
                                   stream_to=path)
    assert [r["input"] for r in _jsonl(path)] == ["a", "b", "c", "d"] and means["rouge-l"] == pytest.approx(50.0)


# ------------------------------------------------------------------------------ runs
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nothing_improving_stops_at_the_second_evaluation(tmp_path):
    result = _run(tmp_path, ["train.max_steps=8", "train.eval_steps=2", "train.save_steps=0", FROZEN,
                             "train.early_stopping.patience=1"])
    run = _mlflow_run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.info.status == "FINISHED"
    assert run.data.tags["early_stopping.stopped_at"] == "4"
    assert run.data.tags["early_stopping.reason"].startswith("rouge-l not improved by more than 0 in 1 evaluation(s)")
    assert result.train_metrics["global_step"] == 4
    assert sorted(p.name for p in (tmp_path / "run" / "predictions").iterdir()) == ["after.jsonl", "step2.jsonl",
                                                                                     "step4.jsonl"]
    # nothing improved after step 2: its adapter is the run's
    assert result.saved_step["step"] == 2 and run.data.tags["best.step"] == "2"


# rouge-l as the evaluations are made to report it: a peak at step 4, then lower
PEAKED = {2: 10.0, 4: 30.0, 6: 20.0, 8: 5.0, 10: 1.0}


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """A real LoRA run whose rouge-l is scripted per evaluation step (PEAKED): patience 2 stops it at step 8."""
    from glm_experiments.recipe import evaluation

    real_call, real_generation = evaluation.Evaluator.__call__, evaluation.evaluate_generation
    now = {}

    def call(self, step, tag=None):
        now["step"] = step
        return real_call(self, step, tag)

    def generation(*args, **kwargs):
        means, rows = real_generation(*args, **kwargs)
        return {**means, "rouge-l": PEAKED[now["step"]]}, rows

    tmp = tmp_path_factory.mktemp("peaked")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation.Evaluator, "__call__", call)
        patch.setattr(evaluation, "evaluate_generation", generation)
        result = _run(tmp, ["train.max_steps=10", "train.eval_steps=2", "train.save_steps=2",
                            "train.save_total_limit=1", "train.learning_rate=3e-2", "train.early_stopping.patience=2"])
    return tmp, result


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_peak_steps_adapter_is_saved(peaked):
    from safetensors.torch import load_file

    tmp, result = peaked
    run_dir = tmp / "run"
    run = _mlflow_run(f"sqlite:///{tmp / 'mlflow.db'}")
    assert run.info.status == "FINISHED" and run.data.tags["early_stopping.stopped_at"] == "8"
    assert run.data.tags["best.step"] == "4" and run.data.metrics["best/rouge-l"] == 30.0
    assert run.data.tags["after.step"] == "4"  # the "after" evaluation is of the kept step's model
    # the sweeper's objective (__main__ returns metrics_after[optimize_metric]) is the best, not the last (5)
    assert result.metrics_after["rouge-l"] == 30.0
    assert result.saved_step == {"step": 4, "last_step": 8, "best_metric": "rouge-l", "best_value": 30.0,
                                 "last_step_adapter": "adapter_last"}
    # save_total_limit=1: rotation spared the best (checkpoint-6 and -8 came after it), and transformers keeps only
    # the best at the end of training (the last step's weights are in adapter_last/)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-4"]
    best = load_file(run_dir / "checkpoints" / "checkpoint-4" / "trainable.safetensors")
    adapter = {k: v for f in (run_dir / "adapter").glob("*.safetensors") for k, v in load_file(f).items()}
    last = {k: v for f in (run_dir / "adapter_last").glob("*.safetensors") for k, v in load_file(f).items()}
    lora_b = min(k for k in best if "lora_B" in k)
    saved_b = next(v for k, v in adapter.items() if "lora_B" in k and k.split("lora_B")[0] in lora_b)
    assert saved_b.equal(best[lora_b].to(saved_b.dtype))
    assert not saved_b.equal(next(v for k, v in last.items() if "lora_B" in k and k.split("lora_B")[0] in lora_b))
    # the "after" evaluation is step 4's
    after = _jsonl(run_dir / "predictions" / "after.jsonl")
    assert after == _jsonl(run_dir / "predictions" / "step4.jsonl")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_reloaded_adapter_predicts_what_its_step_logged(peaked, capsys):
    from glm_experiments.data.formats import load_samples, resolve_data_path
    from glm_experiments.inference.run_loading import load_run
    from glm_experiments.recipe.evaluation import EvalSet, generate

    tmp, _ = peaked
    loaded = load_run(tmp / "run", device="cpu")
    assert "run: adapter of step 4 (best rouge-l 30; the last step 8's: adapter_last/)" in capsys.readouterr().err
    cfg = loaded.cfg
    samples, _ = load_samples(resolve_data_path(cfg.data.dev_file), cfg.data)
    eval_set = EvalSet.of(samples[: cfg.eval.max_samples], loaded.tokenizer, loaded.template, cfg.data)
    replies = generate(loaded.model, loaded.tokenizer, loaded.template, eval_set.prompts, cfg.eval, show_progress=False)
    logged = [r["prediction"] for r in _jsonl(tmp / "run" / "predictions" / "step4.jsonl")]
    assert replies == logged
    assert logged != [r["prediction"] for r in _jsonl(tmp / "run" / "predictions" / "step8.jsonl")]  # not the last's


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_run_killed_in_the_middle_keeps_its_best_and_its_patience_counter(tmp_path):
    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["method=lora", *SMALL, "train.max_steps=8", "train.eval_steps=1", "train.save_steps=1", FROZEN,
            "train.early_stopping.patience=3", "train.early_stopping.min_delta=0.5", f"tracking.tracking_uri={uri}",
            "tracking.experiment_name=killed", f"hydra.run.dir={run_dir}"]
    code, _ = signal_after_checkpoint(args, run_dir, tmp_path, step=3)
    assert code != 0
    for path in (run_dir / "predictions").glob("*.jsonl"):  # SIGKILL, maybe mid-evaluation: only complete lines
        text = path.read_text(encoding="utf-8")
        assert not text or text.endswith("\n"), path
        assert all(json.loads(line)["prediction"] is not None for line in text.splitlines())
    state = json.loads((run_dir / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["best_global_step"] == 1 and state["best_model_checkpoint"] == str(run_dir / "checkpoints" / "checkpoint-1")
    assert state["stateful_callbacks"]["BestCheckpointCallback"]["attributes"] == {"bad_evaluations": 2}

    resumed = run_cli([*args, "resume=auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # a third evaluation without improvement (step 4) stops it: the counter went on from 2; step 1 is still the best
    result = json.loads((run_dir / "result.json").read_text())
    assert result["train"]["global_step"] == 4
    assert result["saved_step"]["step"] == 1 and result["saved_step"]["last_step"] == 4
    assert json.loads((run_dir / "adapter" / "saved_step.json").read_text())["step"] == 1
    run = _mlflow_run(uri, "killed")
    assert run.data.tags["early_stopping.stopped_at"] == "4" and run.data.tags["best.step"] == "1"
    assert "after (step 1 of 4, best rouge-l)" in resumed.stdout


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_each_job_of_a_sweep_stops_on_its_own(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = ["--multirun", "method=lora", *SMALL, "tracking=none", "train.max_steps=4", "train.eval_steps=1",
            "train.save_steps=0", FROZEN, "train.early_stopping.patience=1,2", f"hydra.sweep.dir={sweep_dir}"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [job for job in sweep_dir.iterdir() if (job / "result.json").is_file()]
    results = {OmegaConf.load(job / ".hydra" / "config.yaml").train.early_stopping.patience:
               json.loads((job / "result.json").read_text()) for job in jobs}
    # patience 1: the second evaluation (step 2) stops it; patience 2: the third (step 3); step 1 the best of both
    assert {p: r["train"]["global_step"] for p, r in results.items()} == {1: 2, 2: 3}
    assert all(r["saved_step"]["step"] == 1 for r in results.values())
    # the sweep resumed: an early-stopped job is finished (no checkpoint of its last step to go on from is needed)
    again = run_cli([*args, "resume=auto"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    for step in (2, 3):
        assert f"run already finished at step {step} (train.early_stopping): " in again.stdout, again.stdout[-3000:]


def test_adapter_last_is_not_silently_taken_for_adapter(tmp_path):
    from glm_experiments.errors import UserError
    from glm_experiments.inference.run_loading import find_run_dir

    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("{}\n")
    for name in ("adapter", "adapter_last"):
        (run_dir / name).mkdir()
        (run_dir / name / "method.json").write_text('{"method": "lora"}')
    assert find_run_dir(run_dir / "adapter") == run_dir.resolve()
    with pytest.raises(UserError) as info:
        find_run_dir(run_dir / "adapter_last")
    assert str(info.value) == (f"{run_dir / 'adapter_last'}: the commands load {run_dir / 'adapter'} (the best "
                               "evaluation's step); to use adapter_last/ give it the name adapter (swap the two "
                               "directories)")
