"""The training loop's pieces: transformers' Trainer with our additions, its arguments from the config, the
MLflow callback, and the memory figures every run reports. train.py puts them together."""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from glm_experiments.errors import UserError
from glm_experiments.recipe.losses import chunked_loss
from glm_experiments.tracking.mlflow_tracker import Tracker

TRAINABLE_FILE = "trainable.safetensors"


# ----------------------------------------------------------------------------- memory
def peak_memory_mib() -> dict[str, float]:
    """Peak figures, not means: CPU RSS high-water mark, and CUDA max allocated/reserved where there is a GPU."""
    out = {"perf/peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["perf/cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["perf/cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return out


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

    def __init__(self, *args, method_cfg=None, loss_chunk_size: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.method_cfg = method_cfg
        self.loss_chunk_size = loss_chunk_size
        self.tokens_seen = 0
        self._window_tokens = 0
        self._window_start = time.perf_counter()

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")  # a packed batch has no padding and no mask
        tokens = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        self.tokens_seen += tokens
        self._window_tokens += tokens
        return super().training_step(model, inputs, num_items_in_batch)

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
            self._window_tokens, self._window_start = 0, now
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:  # Trainer calls this on every rank
            return
        output_dir = Path(output_dir or self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        # DeepSpeed passes the gathered weights (under ZeRO-3 the model's own tensors are empty partitions)
        tensors = state_dict if state_dict else dict(self.model.named_parameters())
        trainable = {n: tensors[n].detach().cpu().contiguous() for n in names}
        save_file(trainable, str(output_dir / TRAINABLE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.model
        path = Path(resume_from_checkpoint) / TRAINABLE_FILE
        if not path.exists():
            raise UserError(f"cannot resume: {path} not found")
        saved = load_file(str(path))
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(saved) != expected:
            missing, extra = sorted(expected - set(saved))[:5], sorted(set(saved) - expected)[:5]
            raise UserError(f"cannot resume from {path}: trainable tensors differ (missing {missing}, unexpected {extra}); "
                            "was it written with another method or model?")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:  # make the order a function of (seed, epoch): resumable
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            sampler = EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
        return sampler


# one name per meaning: the Trainer's "loss" is the mean over the last logging window (train.logging_steps steps),
# its end-of-training "train_loss" the mean over the whole run (a different, higher number while the loss falls)
LOSS_NAMES = {"loss": "train/loss", "train_loss": "train/loss_run_mean"}


class TrackingCallback(TrainerCallback):
    """Trainer logs -> MLflow (train/*), plus generation-based evaluation every eval_steps."""

    def __init__(self, tracker: Tracker, evaluate_fn, eval_steps: int):
        self.tracker, self.evaluate_fn, self.eval_steps = tracker, evaluate_fn, eval_steps

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

    def on_step_end(self, args, state, control, **kwargs):
        if self.eval_steps and state.global_step % self.eval_steps == 0 and state.global_step < state.max_steps:
            self.evaluate_fn(state.global_step)


# ---------------------------------------------------------------------------- arguments
def training_arguments(cfg: DictConfig, checkpoint_dir: Path) -> TrainingArguments:
    t = cfg.train
    precision = t.precision
    if precision == "auto":
        precision = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    deepspeed = OmegaConf.to_container(cfg.deepspeed.config, resolve=True) if cfg.deepspeed.config else None
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=math.ceil(t.warmup_ratio * t.max_steps),
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


def reset_peak_memory() -> None:
    """Sweep jobs share one process: without a reset each job would report the peak of all before it."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: "5" resets the RSS high-water mark that ru_maxrss reports
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
