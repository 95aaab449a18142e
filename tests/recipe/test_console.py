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
