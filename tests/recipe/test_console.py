"""What a run prints per logging step."""

from glm_experiments.recipe.console import StepLineCallback, step_line


def test_step_line_is_one_readable_line():
    logs = {"loss": 0.42519, "learning_rate": 0.00497, "grad_norm": 1.2134, "tokens_per_s": 14710.4, "epoch": 0.1}
    line = step_line(20, 300, logs, elapsed=10.0, steps_done=20)
    assert line == "step 20/300  loss 0.4252  lr 4.97e-03  grad 1.21  14,710 tok/s  ETA 0:02:20"
    assert "ETA" not in step_line(300, 300, logs, elapsed=10.0, steps_done=300)


def test_callback_prints_only_loss_logs_on_the_main_process():
    class State:
        global_step, max_steps, is_world_process_zero = 10, 20, True

    printed = []
    callback = StepLineCallback(printer=printed.append)
    callback.on_train_begin(None, State(), None)
    callback.on_log(None, State(), None, logs={"loss": 1.0})
    callback.on_log(None, State(), None, logs={"train_runtime": 3.0})  # the end-of-training summary dict
    State.is_world_process_zero = False
    callback.on_log(None, State(), None, logs={"loss": 1.0})
    assert len(printed) == 1 and printed[0].startswith("step 10/20  loss 1.0000")


def test_job_labels_name_what_was_varied():
    from glm_experiments.config.naming import job_label, override_parts

    overrides = ["experiment=source_length_ablation", "lengths=src512_tgt128", "method.r=16", "train.max_steps=30",
                 "data.train_file=/data/train.json", "tracking.tracking_uri=sqlite:///x.db", "hydra.sweep.dir=/tmp/s"]
    assert job_label(overrides) == "src512-tgt128-r16-steps30"
    assert override_parts(["method=lora", "method.r=16"], skip_groups=("method",)) == ["r16"]
    assert job_label(["tracking=none"], "lora_tiny") == "lora_tiny"


def test_display_names_put_smoke_then_the_swept_values_first():
    """One name per run (MLflow run name, web page label, compare label): smoke first (MLflow's runs table shows
    about 15 characters of a child run's name), then what the sweep varies, the method and the model."""
    from omegaconf import OmegaConf

    from glm_experiments.config.naming import SWEPT_KEYS_ENV, display_name, varied_values
    from glm_experiments.tracking.mlflow_tracker import run_name

    job = ["experiment=source_length_ablation", "debug=smoke", "lengths=src1024_tgt256", "train.max_steps=50",
           "tracking.tracking_uri=sqlite:///x.db"]
    cfg = OmegaConf.create({"tracking": {"run_name": None}, "method": {"name": "full"}, "model": {"name": "tiny"}})
    assert run_name(cfg, job, smoke=True, swept_keys=["lengths"]) == "smoke · src=1024 tgt=256 · full · tiny"
    assert run_name(cfg, job, smoke=True, swept_keys=["lengths"])[:15] == "smoke · src=102"  # what the runs table shows
    assert run_name(cfg, job, swept_keys=["lengths"])[:15] == "src=1024 tgt=25"
    # outside a sweep: every override that changes the experiment
    assert run_name(cfg, job, swept_keys=None) == "src=1024 tgt=256 steps=50 · full · tiny"
    assert varied_values(["method=lora", "method.r=16", "train.learning_rate=1e-3"], ["method", "method.r"]) == ["r=16"]
    assert display_name(["data=x"][:0], "lora", "tiny") == "lora · tiny"
    import os

    os.environ[SWEPT_KEYS_ENV] = "train.learning_rate"
    try:
        assert run_name(cfg, ["train.learning_rate=0.03", "data=conversations_demo"]) == "lr=0.03 · full · tiny"
    finally:
        del os.environ[SWEPT_KEYS_ENV]
    cfg.tracking.run_name = "mine"
    assert run_name(cfg, job) == "mine"


def test_loss_names_say_what_they_mean():
    from glm_experiments.recipe.trainer import TrackingCallback

    logged = []

    class Tracker:
        def log_metrics(self, metrics, step):
            logged.append(metrics)

    class State:
        global_step, is_world_process_zero = 10, True

    callback = TrackingCallback(Tracker(), None, 0)
    callback.on_log(None, State(), None, logs={"loss": 2.9, "learning_rate": 1e-3})
    callback.on_log(None, State(), None, logs={"train_loss": 4.9, "train_runtime": 3.0})
    assert logged[0]["train/loss"] == 2.9 and "train/train_loss" not in logged[1]
    assert logged[1]["train/loss_run_mean"] == 4.9
