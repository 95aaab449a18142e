"""The Trainer callback that logs to MLflow and runs the generation evaluation every train.eval_steps (feeding
best_checkpoint.py's decisions), and the memory figures every run reports."""

from __future__ import annotations

import resource
from pathlib import Path

import torch
from transformers import TrainerCallback

from glm_experiments.distributed import broadcast_from_main
from glm_experiments.tracking.mlflow_tracker import Tracker


# ----------------------------------------------------------------------------- memory
def peak_memory_mib() -> dict[str, float]:
    """Peak figures, not means: CPU RSS high-water mark, and CUDA max allocated/reserved where there is a GPU."""
    out = {"perf/peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["perf/cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["perf/cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return out


def reset_peak_memory() -> None:
    """Sweep jobs share one process: without a reset each job would report the peak of all before it."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: "5" resets the RSS high-water mark that ru_maxrss reports
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# ---------------------------------------------------------------------------- tracking
# one name per meaning: the Trainer's "loss" is the mean over the last logging window (train.logging_steps steps),
# its end-of-training "train_loss" the mean over the whole run (a different, higher number while the loss falls)
LOSS_NAMES = {"loss": "train/loss", "train_loss": "train/loss_run_mean"}


class TrackingCallback(TrainerCallback):
    """Trainer logs -> MLflow (train/*), plus generation-based evaluation every eval_steps.

    ``best`` (best_checkpoint.BestCheckpointCallback, train.keep_best / early_stopping) gets every evaluation's
    means, the last step's too (a candidate for the best: the "after" evaluation reuses it); ``loss_fn``, when the
    tracked metric is the dev loss, computes it at each evaluation (collective: every rank calls it)."""

    def __init__(self, tracker: Tracker, evaluate_fn, eval_steps: int, best=None, loss_fn=None):
        self.tracker, self.evaluate_fn, self.eval_steps = tracker, evaluate_fn, eval_steps
        self.best, self.loss_fn = best, loss_fn

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        metrics = {}
        for key, value in logs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                name = LOSS_NAMES.get(key) or ("eval/" if key.startswith("eval_") else "train/") + key.removeprefix("eval_")
                metrics[name] = value
        metrics.update(peak_memory_mib())
        self.tracker.log_metrics(metrics, step=state.global_step)

    def evaluates_at(self, state) -> bool:
        if not self.eval_steps:
            return False
        if state.global_step >= state.max_steps:  # the "after" evaluation's step: here only to compare it
            return self.best is not None
        return state.global_step % self.eval_steps == 0

    def on_step_end(self, args, state, control, **kwargs):
        if not self.evaluates_at(state):
            return
        means = dict(self.evaluate_fn(state.global_step) or {})
        if self.loss_fn is not None:
            means["loss"] = self.loss_fn()
        if self.best is not None:  # every rank decides alike: on rank 0's figures (it generates alone)
            self.best.observe(state, control, state.global_step, broadcast_from_main(means))
            if state.best_global_step == state.global_step and hasattr(self.evaluate_fn, "pin"):
                self.evaluate_fn.pin(state.global_step)  # its predictions serve as the "after" evaluation
