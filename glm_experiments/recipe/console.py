"""What a training run prints: one readable line per logging step instead of the Trainer's raw dicts."""

from __future__ import annotations

import time

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def step_line(step: int, max_steps: int, logs: dict, elapsed: float, steps_done: int) -> str:
    """e.g. ``step 20/300  loss 2.3417  lr 4.97e-03  grad 1.21  14,710 tok/s  ETA 0:01:20``."""
    parts = [f"step {step}/{max_steps}"]
    if "loss" in logs:
        parts.append(f"loss {logs['loss']:.4f}")
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if "grad_norm" in logs:
        parts.append(f"grad {logs['grad_norm']:.3g}")
    if "tokens_per_s" in logs:
        parts.append(f"{logs['tokens_per_s']:,.0f} tok/s")
    if steps_done > 0 and max_steps > step:
        parts.append(f"ETA {_duration(elapsed / steps_done * (max_steps - step))}")
    return "  ".join(parts)


class StepLineCallback(TrainerCallback):
    """Replaces transformers' PrinterCallback / ProgressCallback (a dict per log, a bar without a label)."""

    def __init__(self, printer=print):
        self.printer = printer
        self.start_time, self.start_step = 0.0, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time, self.start_step = time.perf_counter(), state.global_step  # a resumed run starts later

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            elapsed = time.perf_counter() - self.start_time
            self.printer(step_line(state.global_step, state.max_steps, logs, elapsed, state.global_step - self.start_step))


def quiet_trainer(trainer) -> None:
    """Swap the Trainer's own console output for one line per logging step."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(StepLineCallback())


def quiet_library_bars() -> None:
    """transformers' own bars ("Loading weights 47/47", "Writing model shards 1/1") and datasets' ("Saving the
    dataset") say nothing in a run that prints one line per step; huggingface_hub's are off too."""
    import datasets
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()
    datasets.disable_progress_bars()
