"""The training loop's pieces: transformers' Trainer with our additions and its arguments from the config (the MLflow
callback and memory figures: callbacks.py). train.py puts them together."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from glm_experiments.constants import IGNORE_INDEX
from glm_experiments.models.checked_files import load_safetensors
from glm_experiments.errors import UserError
from glm_experiments.recipe.callbacks import TrackingCallback  # noqa: F401  (tests and bench import it from here)
from glm_experiments.recipe.losses import chunked_loss

TRAINABLE_FILE = "trainable.safetensors"
log = logging.getLogger(__name__)


class NonFiniteTraining(UserError):
    """The training loss or gradient norm turned NaN or inf (``train.on_nonfinite=stop``): the run stops at that
    step, before its update and its checkpoint. ``tags``: what the MLflow run records of it."""

    def __init__(self, message: str, tags: dict[str, str]):
        super().__init__(message)
        self.tags = tags


# ---------------------------------------------------------------------------- trainer
class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped order, drawn from ``seed + epoch`` instead of the global RNG.

    transformers' own sampler permutes with the global torch RNG at the start of each epoch, whose state
    then depends on everything run before (dropout, model init): a resumed run skipped the right number
    of batches of a *different* order, and its losses left the uninterrupted run's after the checkpoint.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:  # called by Trainer / accelerate before every epoch
        self.epoch = int(epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class GlmTrainer(Trainer):
    """transformers' Trainer plus: non-pad tokens/s, checkpoints holding only the trainable tensors, and the
    chunked cross-entropy of ``train.loss_chunk_size``.

    A checkpoint of an adapter method never contains the frozen base (the seeds' P-Tuning runs wrote
    12 GB per checkpoint); resuming loads those tensors back bit-exactly, with the optimizer, scheduler,
    RNG and data position that Trainer saves beside them.
    """

    def __init__(self, *args, method_cfg=None, loss_chunk_size: int = 0, on_nonfinite: str = "stop", **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        # transformers refuses a quantized base that is not a PEFT model ("purely quantized"); ours may train a
        # prefix encoder, soft prompt or full-precision layers on it (models/quantization.py): let it pass when
        # something trains, for the duration of that check
        lift = (model is not None and getattr(model, "is_quantized", False) and not getattr(model, "_hf_peft_config_loaded", False)
                and any(p.requires_grad for p in model.parameters()))
        if lift:
            model._hf_peft_config_loaded = True
        try:
            super().__init__(*args, **kwargs)
        finally:
            if lift:
                model._hf_peft_config_loaded = False
        self.method_cfg = method_cfg
        self.loss_chunk_size = loss_chunk_size
        self.on_nonfinite = on_nonfinite
        self.tokens_seen = 0
        self.skipped_steps = 0  # train.on_nonfinite=skip_step: updates left out
        self._window_tokens = 0
        self._window_supervised = 0  # label tokens of the batches since the last log
        self._window_start = time.perf_counter()
        self._step_loss = None  # this optimizer step's loss, summed over its micro-batches
        self._last_finite: tuple[int, float] | None = None  # (step, loss) of the last step with finite loss and gradients
        self._warned: set[str] = set()

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")  # a packed batch has no padding and no mask
        tokens = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        self.tokens_seen += tokens
        self._window_tokens += tokens
        labels = inputs.get("labels")
        if labels is not None:
            self._window_supervised += int((labels != IGNORE_INDEX).sum())
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_loss = loss.detach() if self._step_loss is None else self._step_loss + loss.detach()
        return loss

    # ------------------------------------------------------------------ non-finite loss or gradients
    def _get_grad_norm(self, model, grad_norm=None):
        """transformers computes every step's gradient norm here, right before the optimizer steps: the place
        to stop (or skip) a step whose loss or gradients are NaN/inf, before its update and its checkpoint."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._check_step(grad_norm)
        return grad_norm

    def _check_step(self, grad_norm) -> None:
        step = self.state.global_step + 1
        loss = float(self._step_loss) if self._step_loss is not None else 0.0
        self._step_loss = None
        norm = float(grad_norm) if grad_norm is not None else None
        # fp16 mixed precision: an inf gradient is the loss scaler's business (it skips the step and scales down)
        norm_bad = norm is not None and not math.isfinite(norm) and getattr(self.accelerator, "scaler", None) is None
        if math.isfinite(loss) and not norm_bad:
            self._last_finite = (step, loss)
            return
        if self._last_finite is None:  # a resumed run: the last loss its checkpoint logged
            logged = [h for h in self.state.log_history if isinstance(h.get("loss"), float) and math.isfinite(h["loss"])]
            self._last_finite = (logged[-1]["step"], logged[-1]["loss"]) if logged else None
        what = (f"gradient norm {norm} (loss {loss:.4g})" if math.isfinite(loss) else
                f"loss {loss}" + (f" and gradient norm {norm}" if norm_bad else ""))
        last = (f"last finite step {self._last_finite[0]}: loss {self._last_finite[1]:.4f}" if self._last_finite
                else "no finite step before it")
        if self.on_nonfinite == "continue":
            self._warn_once("nonfinite", f"step {step}: training {what} ({last}); going on (train.on_nonfinite=continue)")
            return
        if self.on_nonfinite == "skip_step":
            self.optimizer.zero_grad(set_to_none=True)  # the optimizer leaves parameters without a gradient alone
            self.skipped_steps += 1
            log.warning("step %d: training %s (%s): this batch's update skipped (train.on_nonfinite=skip_step; "
                        "%d skipped so far)", step, what, last, self.skipped_steps)
            return
        aside = self._set_aside_checkpoint(step - 1)
        checkpoint = last_complete_checkpoint(Path(self.args.output_dir))
        lr = f"a lower train.learning_rate (now {self.args.learning_rate:g})"
        then = (f"continue from {checkpoint.name} with resume=auto and {lr}" if checkpoint else
                f"no earlier checkpoint: start again with {lr}")
        raise NonFiniteTraining(
            f"step {step}: training {what} ({last}); stopped before this step's update and checkpoint"
            f"{f' ({aside} set aside: its weights give this step the same)' if aside else ''}: {then}, or skip such "
            "batches with train.on_nonfinite=skip_step",
            tags={"failure": "nonfinite_training", "nonfinite.step": str(step), "nonfinite.what": what,
                  "nonfinite.last_finite_loss": f"{self._last_finite[1]:.6g}" if self._last_finite else "none",
                  "nonfinite.last_checkpoint": checkpoint.name if checkpoint else "none"})

    def _set_aside_checkpoint(self, step: int) -> str | None:
        """The checkpoint of the step just before the non-finite one holds the very weights (and RNG and data
        position) that produced it: resuming from it would repeat the same step, whatever the learning rate. It is
        renamed ``checkpoint-<step>.nonfinite`` (kept for inspection; resume=auto skips it)."""
        path = Path(self.args.output_dir) / f"checkpoint-{step}"
        if not self.args.should_save or not path.is_dir():
            return None
        aside, n = path.with_name(f"{path.name}.nonfinite"), 1
        while aside.exists():  # set aside before, by an earlier try
            n += 1
            aside = path.with_name(f"{path.name}.nonfinite{n}")
        path.rename(aside)
        return path.name

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("%s", message)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.loss_chunk_size:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with chunked_loss(self.accelerator.unwrap_model(model), self.loss_chunk_size):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            now = time.perf_counter()
            logs["tokens_per_s"] = self._window_tokens / max(now - self._window_start, 1e-9)
            logs["tokens_seen"] = self.tokens_seen
            if logs["loss"] == 0 and self._window_supervised:
                self._warn_once("zero_loss", (
                    f"step {self.state.global_step}: training loss is exactly 0 while the batches hold "
                    f"{self._window_supervised:,} supervised tokens: likely every label masked by truncation "
                    "(data.max_source_length / max_target_length) or a half-precision underflow "
                    "(model.dtype / train.precision float16: use bfloat16)"))
            if self.skipped_steps:
                logs["skipped_steps"] = self.skipped_steps
            self._window_tokens, self._window_supervised, self._window_start = 0, 0, now
        super().log(logs, *args, **kwargs)

    _staging: Path | None = None

    def _get_output_dir(self, trial) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """transformers' checkpoint, written into ``.staging-checkpoint-<step>/`` and renamed into place when
        complete (an interrupted save never leaves a damaged newest checkpoint); a checkpoint of that step
        already there (a damaged one resume=auto fell back from) is replaced only then."""
        import os
        import shutil

        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging = run_dir / f".staging-{name}"
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged, final = run_dir / f".staging-{name}" / name, run_dir / name
            self._point_at_best(run_dir, staged)
            replaced = run_dir / f".replaced-{name}"
            if final.exists():
                os.rename(final, replaced)
            os.rename(staged, final)
            shutil.rmtree(replaced, ignore_errors=True)
            shutil.rmtree(run_dir / f".staging-{name}", ignore_errors=True)
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _point_at_best(self, run_dir: Path, staged: Path) -> None:
        """transformers set ``best_model_checkpoint`` to the staging path when this step is the best (train.keep_best):
        the final one instead, in the staged trainer_state.json too (resume=auto reads it; rotation spares it)."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if not self.state.best_global_step:
            return
        best = f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
        kept = best == staged.name or (run_dir / best).is_dir()
        self.state.best_model_checkpoint = str(run_dir / best) if kept else None
        self.state.save_to_json(str(staged / "trainer_state.json"))

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:  # Trainer calls this on every rank
            return
        output_dir = Path(output_dir or self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        # DeepSpeed passes the gathered weights (under ZeRO-3 the model's own tensors are empty partitions)
        tensors = state_dict if state_dict else dict(self.model.named_parameters())
        trainable = {n: tensors[n].detach().cpu().contiguous() for n in names}
        broken = [n for n, t in trainable.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if broken and self.on_nonfinite != "continue":  # a checkpoint that resume=auto would pick, holding NaN
            if not any(output_dir.iterdir()):
                output_dir.rmdir()
            raise NonFiniteTraining(
                f"step {self.state.global_step}: trainable weights turned non-finite ({broken[0]}"
                f"{f' and {len(broken) - 1} more' if len(broken) > 1 else ''}); checkpoint not saved: continue from "
                "the last one with resume=auto and a lower train.learning_rate",
                tags={"failure": "nonfinite_training", "nonfinite.step": str(self.state.global_step),
                      "nonfinite.what": "weights"})
        save_file(trainable, str(output_dir / TRAINABLE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.model
        path = Path(resume_from_checkpoint) / TRAINABLE_FILE
        if not path.exists():
            raise UserError(f"cannot resume: {path} not found")
        saved = load_safetensors(path)  # checked: a damaged file is one line naming it
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(saved) != expected:
            missing, extra = sorted(expected - set(saved))[:5], sorted(set(saved) - expected)[:5]
            raise UserError(f"cannot resume from {path}: trainable tensors differ (missing {missing}, unexpected {extra}); "
                            "was it written with another method or model?")
        params = dict(model.named_parameters())
        wrong = [f"{n} {list(t.shape)} (the model's: {list(params[n].shape)})" for n, t in saved.items()
                 if tuple(t.shape) != tuple(params[n].shape)]
        if wrong:
            raise UserError(f"cannot resume from {path}: tensor shapes differ ({'; '.join(wrong[:2])}"
                            f"{f'; {len(wrong) - 2} more' if len(wrong) > 2 else ''}); was it written with other "
                            "method settings (method.r, pre_seq_len, ...)?")
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Trainer restores the scheduler's base learning rate from the checkpoint, so ``resume=auto
        train.learning_rate=<lower>`` (what a stopped, diverging run is told to do) would silently go on at the
        old one: the restored schedule is rescaled to train.learning_rate, at the same point of the schedule."""
        super()._load_optimizer_and_scheduler(checkpoint)
        scheduler = self.lr_scheduler
        if checkpoint is None or not getattr(scheduler, "base_lrs", None) or self.is_deepspeed_enabled:
            return
        saved = scheduler.base_lrs[0]
        if not saved or math.isclose(saved, self.args.learning_rate, rel_tol=1e-12):
            return
        ratio = self.args.learning_rate / saved
        scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        log.warning("resume: train.learning_rate=%g replaces the checkpoint's %g (the schedule goes on from step %d)",
                    self.args.learning_rate, saved, self.state.global_step)

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:  # make the order a function of (seed, epoch): resumable
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            sampler = EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
        return sampler


def last_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest ``checkpoint-<step>`` with its trainer_state.json (written last), as resume=auto picks it."""
    complete = [p for p in checkpoint_dir.glob("checkpoint-*") if p.name[11:].isdigit()
                and (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name[11:]), default=None)


# ---------------------------------------------------------------------------- arguments
def training_arguments(cfg: DictConfig, checkpoint_dir: Path) -> TrainingArguments:
    t = cfg.train
    precision = t.precision
    if precision == "auto":
        precision = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    deepspeed = OmegaConf.to_container(cfg.deepspeed.config, resolve=True) if cfg.deepspeed.config else None
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        # train.num_train_epochs, when set, decides the length (transformers: max_steps -1 = use the epochs)
        max_steps=-1 if t.get("num_train_epochs") else t.max_steps,
        num_train_epochs=t.get("num_train_epochs") or 3.0,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        # with epochs the step count is known only to the Trainer: a float in [0, 1) is a ratio of it there
        warmup_steps=(min(t.warmup_ratio, 0.999999) if t.get("num_train_epochs") else math.ceil(t.warmup_ratio * t.max_steps)),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        eval_strategy="no",
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5's name (the old one warns)
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        dataloader_num_workers=t.dataloader_num_workers,
        bf16=precision == "bfloat16",
        fp16=precision == "float16",
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,  # console.py prints one line per logging step instead
        save_only_model=False,
        deepspeed=deepspeed,
        # on a CPU-only machine accelerate sees the torchrun ranks (gloo) only with use_cpu, DeepSpeed included
        use_cpu=not torch.cuda.is_available(),
    )
