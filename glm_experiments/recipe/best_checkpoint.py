"""Train to the best checkpoint: ``train.keep_best`` (the best evaluation's step is checkpointed, kept from
save_total_limit's rotation, and its weights become the run's adapter/) and ``train.early_stopping`` (training ends
once ``patience`` evaluations in a row brought no improvement larger than ``min_delta``).

Why not transformers' EarlyStoppingCallback: it reads ``metric_for_best_model`` from the metrics of
``Trainer.evaluate`` (on_evaluate), and asks for ``load_best_model_at_end``. Here the generation metrics (BLEU,
ROUGE) are computed outside the Trainer's evaluation loop (trainer.TrackingCallback.on_step_end -> train.Evaluator);
routing them through ``evaluate`` would make eval_strategy=steps demand save_steps be a multiple of eval_steps, and
``load_best_model_at_end`` loads model.safetensors / adapter_model.* files, while our checkpoints hold
trainable.safetensors. What is used of transformers: ``TrainerState.best_metric`` / ``best_global_step`` /
``best_model_checkpoint`` (saved in trainer_state.json; the last one protected from rotation),
``control.should_save`` / ``should_training_stop``, and ``ExportableState`` for the patience counter, which
trainer_state.json keeps under ``stateful_callbacks`` (read back in on_train_begin: a resumed run goes on counting).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from glm_experiments.errors import UserError

LOSS = "loss"  # the dev loss (Trainer.evaluate), computed at every evaluation when it is the tracked metric
ADAPTER_LAST = "adapter_last"  # run_dir/adapter_last: the last step's weights, where adapter/ holds an earlier best
SAVED_STEP_FILE = "saved_step.json"  # in adapter/: which step's weights it holds, and why
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BestSettings:
    metric: str
    mode: str  # max | min
    keep_best: bool
    patience: int | None  # None: no early stopping
    min_delta: float


def best_settings(cfg) -> BestSettings | None:
    """What the run tracks, defaults resolved (None: neither early stopping nor keep_best). Raises the one-line
    error of a setting that cannot work; run by preflight."""
    t, stopping = cfg.train, cfg.train.early_stopping
    keep = t.keep_best if t.keep_best is not None else t.eval_steps > 0
    if not keep and stopping.patience is None:
        return None
    asked = f"train.early_stopping.patience={stopping.patience}" if stopping.patience else "train.keep_best=true"
    implicit = t.keep_best is None and stopping.patience is None  # only keep_best's default (eval_steps > 0)
    if not t.eval_steps:
        raise UserError(f"{asked} needs train.eval_steps > 0: the evaluations during training it watches")
    if not cfg.data.dev_file:
        if implicit:  # no evaluation to keep the best of
            return None
        raise UserError(f"{asked} needs data.dev_file: the evaluations it watches are on the dev set")
    metric = stopping.metric or cfg.optimize_metric
    if metric != LOSS and metric not in cfg.data.metrics:
        key = "train.early_stopping.metric" if stopping.metric else "optimize_metric"
        if implicit:  # the last step's adapter, said once
            log.warning("%s=%s is not in data.metrics (%s): no best evaluation to keep, the adapter is the last step's",
                        key, metric, ", ".join(cfg.data.metrics))
            return None
        raise UserError(f"{key}={metric}: not computed by this run (data.metrics: {', '.join(cfg.data.metrics)}; "
                        f"or loss); {asked} watches it")
    mode = stopping.mode or ("min" if metric == LOSS else "max")
    return BestSettings(metric, mode, bool(keep), stopping.patience, float(stopping.min_delta))


class BestCheckpointCallback(TrainerCallback, ExportableState):
    """Fed each evaluation's means by TrackingCallback (``observe``); decides on the Trainer's control flags."""

    def __init__(self, metric: str, mode: str, keep_best: bool = True, patience: int | None = None,
                 min_delta: float = 0.0):
        self.settings = BestSettings(metric, mode, keep_best, patience, min_delta)
        self.bad_evaluations = 0  # evaluations in a row without an improvement > min_delta
        self.stopped_at: int | None = None
        self.reason = ""

    def state(self) -> dict:  # saved into every checkpoint's trainer_state.json
        return {"args": asdict(self.settings), "attributes": {"bad_evaluations": self.bad_evaluations}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__)
        if isinstance(saved, dict):  # a resumed run: the counter its checkpoint had
            self.bad_evaluations = int(saved.get("attributes", {}).get("bad_evaluations", 0))
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())  # a checkpoint from before keep_best

    def gain(self, value: float, best: float | None) -> float:
        """How much better ``value`` is than ``best`` (inf for the first evaluation)."""
        if best is None:
            return math.inf
        return value - best if self.settings.mode == "max" else best - value

    def observe(self, state, control, step: int, means: dict) -> None:
        s = self.settings
        value = means.get(s.metric)
        if value is None or not math.isfinite(value):
            return
        gain = self.gain(float(value), state.best_metric)
        if gain > 0:  # any improvement is the new best; only one > min_delta resets the patience
            state.best_metric = float(value)
            if s.keep_best:
                state.best_global_step = step
                control.should_save = True  # its checkpoint, whatever train.save_steps
        self.bad_evaluations = 0 if gain > s.min_delta else self.bad_evaluations + 1
        # at the last step training ends anyway: not an early stop
        if s.patience is not None and self.bad_evaluations >= s.patience and step < state.max_steps:
            control.should_training_stop = True
            self.stopped_at = step
            self.reason = (f"{s.metric} not improved by more than {s.min_delta:g} in {self.bad_evaluations} "
                           f"evaluation(s) (best {state.best_metric:.4f})")
            log.info("early stopping at step %d: %s", step, self.reason)


# ---------------------------------------------------------------------------- after training
def best_step_to_restore(state, callback: BestCheckpointCallback | None) -> Path | None:
    """The checkpoint whose weights the run's adapter should hold, or None to keep the model's (the last step's)."""
    if callback is None or not callback.settings.keep_best or not state.best_global_step:
        return None
    if state.best_global_step == state.global_step:
        return None
    path = Path(state.best_model_checkpoint or "")
    if not state.best_model_checkpoint or not path.is_dir():
        log.warning("keep_best: the checkpoint of the best step %d is gone (%s): the adapter is the last step's",
                    state.best_global_step, state.best_model_checkpoint)
        return None
    return path


def saved_step_record(state, callback: BestCheckpointCallback | None, model_step: int) -> dict:
    """What adapter/saved_step.json says: the step of these weights, the run's last step, and the best's metric."""
    record = {"step": model_step, "last_step": state.global_step}
    if callback is not None and callback.settings.keep_best and state.best_global_step == model_step:
        record.update(best_metric=callback.settings.metric, best_value=state.best_metric)
    if model_step != state.global_step:
        record["last_step_adapter"] = ADAPTER_LAST
    return record


def write_saved_step(adapter_dir: Path, record: dict) -> None:
    (Path(adapter_dir) / SAVED_STEP_FILE).write_text(json.dumps(record, indent=2) + "\n")


def saved_step_line(adapter_dir: Path) -> str | None:
    """"adapter of step N (best rouge-l 31.20; the last step M's: adapter_last/)" for predict, merge, chat, web
    and compare; None for an adapter saved without the record (an older run)."""
    try:
        record = json.loads((Path(adapter_dir) / SAVED_STEP_FILE).read_text())
    except (OSError, ValueError):
        return None
    what = [f"best {record['best_metric']} {record['best_value']:.4g}"] if "best_metric" in record else []
    if record.get("last_step_adapter"):
        what.append(f"the last step {record['last_step']}'s: {record['last_step_adapter']}/")
    return f"adapter of step {record['step']}" + (f" ({'; '.join(what)})" if what else "")
