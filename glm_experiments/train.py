"""One run: build the pieces the config names, evaluate, train, evaluate, save, log."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import resource
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from transformers import (
    SchedulerType,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_pt_utils import (
    LengthGroupedSampler,
    get_length_grouped_indices,
)

from glm_experiments.config import check_settings
from glm_experiments.console import quiet_trainer
from glm_experiments.data.dataset import eval_prompts, load_split, make_collator
from glm_experiments.data.formats import load_samples, resolve_data_path
from glm_experiments.distributed import (
    barrier,
    gather_to_main,
    gathered,
    is_main,
    local_main_first,
    zero3_partitioned,
)
from glm_experiments.errors import UserError
from glm_experiments.evaluation import (
    EvalSet,
    evaluate_generation,
    generation_kwargs,
    load_eval_set,
    write_predictions,
)
from glm_experiments.hydra_checks import check_creatable
from glm_experiments.interrupts import sigterm_as_interrupt
from glm_experiments.losses import chunked_loss
from glm_experiments.methods import get_method, trainable_summary
from glm_experiments.metrics import DEFINITIONS
from glm_experiments.models import thudm_adapters
from glm_experiments.models.loading import (
    check_lengths,
    load_model_and_tokenizer,
    template_for,
)
from glm_experiments.run_dirs import resolve_resume
from glm_experiments.run_result import RunResult, hydra_tags
from glm_experiments.tracking.mlflow_tracker import (
    Tracker,
    flatten_config,
    git_commit,
    run_name,
)

log = logging.getLogger(__name__)

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
                name = key.removeprefix("eval_")
                metrics[("eval/" if key.startswith("eval_") else "train/") + name] = value
        metrics.update(peak_memory_mib())
        self.tracker.log_metrics(metrics, step=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.eval_steps and state.global_step % self.eval_steps == 0 and state.global_step < state.max_steps:
            self.evaluate_fn(state.global_step)


# ------------------------------------------------------------------------------- run
def check_train_options(cfg: DictConfig) -> None:
    t = cfg.train
    if t.packing and not get_method(cfg.method.name).packable:
        # virtual tokens / prefix keys would be shared by all samples of the packed row
        raise UserError(f"train.packing=true does not work with method={cfg.method.name} "
                        "(its virtual tokens would be shared by every sample packed into a row)")
    try:
        SchedulerType(t.lr_scheduler_type)
    except ValueError:
        raise UserError(f"train.lr_scheduler_type={t.lr_scheduler_type}: expected one of "
                        f"{', '.join(s.value for s in SchedulerType)}") from None
    stage = ((cfg.deepspeed.config or {}).get("zero_optimization") or {}).get("stage")
    if t.loss_chunk_size and stage == 3:
        raise UserError("train.loss_chunk_size does not work under ZeRO-3 (the output head's weight is partitioned "
                        "outside its forward); use deepspeed=zero2 or train.loss_chunk_size=0")


def preflight(cfg: DictConfig) -> None:
    """Every check that needs no weights, so that a mistake costs seconds, not a model load: the settings'
    ranges (config.py), option combinations, lengths vs the model's positions (its config.json only), the
    method's hardware, DeepSpeed installed. The Hydra process runs it before torchrun starts; run() again."""
    check_settings(cfg)
    check_creatable("output_dir", cfg.output_dir)
    check_train_options(cfg)
    check_lengths(cfg)
    template_for(cfg.model)
    get_method(cfg.method.name).check_available()
    if cfg.deepspeed.config and importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"deepspeed={cfg.deepspeed.name} needs the deepspeed package, which is not installed "
                        "(pip install -e '.[deepspeed]'), or use deepspeed=none")


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


def run(cfg: DictConfig) -> RunResult:
    preflight(cfg)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = run_dir / "checkpoints"
    reset_peak_memory()
    set_seed(cfg.seed)
    resume_from = resolve_resume(cfg.resume, checkpoint_dir)
    method = get_method(cfg.method.name)

    tags, overrides = hydra_tags()
    tracker = Tracker(cfg.tracking, active=is_main())  # one MLflow run, created by rank 0
    commit = git_commit()
    tracker.start(run_name(cfg, overrides), {**tags, **({"git.commit": commit} if commit else {})}, run_dir=run_dir,
                  resumed_from=resume_from)
    result = RunResult(run_dir=run_dir, run_id=tracker.run_id)
    try:
        with sigterm_as_interrupt():  # ends KILLED below, not RUNNING forever
            _run(cfg, run_dir, checkpoint_dir, resume_from, method, tracker, result)
    except BaseException as exc:
        tracker.set_tags({"error": f"{type(exc).__name__}: {exc}"})
        tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")
    return result



def _run(cfg, run_dir, checkpoint_dir, resume_from, method, tracker: Tracker, result: RunResult) -> None:
    params = flatten_config(cfg)
    # where the run writes is not a setting: a tag, so MLflow's compare view does not list it as a difference
    tracker.set_tags({"output_dir": params.pop("output_dir")})
    tracker.log_params(params)
    tracker.set_tags({f"metric_definition.{m}": DEFINITIONS[m] for m in cfg.data.metrics if m in DEFINITIONS})

    # ---- data files read and validated before any weight loads (a 6B model takes minutes)
    start = time.perf_counter()
    train_loaded = load_samples(cfg.data.train_file, cfg.data, setting="data.train_file")
    dev_loaded = load_samples(cfg.data.dev_file, cfg.data, setting="data.dev_file") if cfg.data.dev_file else None
    if cfg.eval.forgetting_file:
        resolve_data_path(cfg.eval.forgetting_file, "eval.forgetting_file")  # read later, on rank 0 only

    # ---- model + method
    quantization = method.quantization_config(cfg.method)
    model, tokenizer = load_model_and_tokenizer(cfg.model, quantization_config=quantization)
    template = template_for(cfg.model)
    # what generate() is really called with (stop ids included), beside the eval.* params
    tracker.set_tags({"eval.generation_kwargs": json.dumps(generation_kwargs(cfg.eval, tokenizer, template))})
    if thudm_adapters.init_from_dir(cfg.method):  # method.init_from: start from an existing (THUDM/PEFT) adapter
        model = thudm_adapters.init_method_from(model, cfg.method, cfg.model.family)
    else:
        model = method.apply(model, cfg.method, tokenizer=tokenizer)  # prompt tuning initialises from text
    result.trainable = trainable_summary(model)
    tracker.log_metrics({"model/trainable_params": result.trainable["trainable"],
                         "model/total_params": result.trainable["total"],
                         "model/trainable_pct": result.trainable["pct"]}, step=0)
    log.info("method=%s: %s of %s parameters trainable (%.4f%%)", cfg.method.name,
             f"{result.trainable['trainable']:,}", f"{result.trainable['total']:,}", result.trainable["pct"])

    # ---- data
    cache_dir = _data_cache_dir()
    with local_main_first():
        train_set, _, train_stats = load_split(cfg.data.train_file, tokenizer, template, cfg.data, cache_dir, train_loaded)
    if cfg.data.max_train_samples:
        train_set = train_set.select(range(min(cfg.data.max_train_samples, len(train_set))))
    dev_set = eval_set = None
    data_metrics = {"data/train_records": train_stats.records, "data/train_skipped": train_stats.skipped,
                    "data/train_truncated": train_stats.truncated, "data/train_tokens": train_stats.tokens,
                    "data/train_tokens_dropped": train_stats.tokens_dropped}
    if cfg.data.dev_file:
        with local_main_first():
            dev_set, dev_samples, dev_stats = load_split(cfg.data.dev_file, tokenizer, template, cfg.data, cache_dir,
                                                         dev_loaded)
        data_metrics.update({"data/dev_records": dev_stats.records, "data/dev_skipped": dev_stats.skipped,
                             "data/dev_truncated": dev_stats.truncated})
        limit = cfg.eval.max_samples or len(dev_samples)
        eval_set = EvalSet(*eval_prompts(dev_samples[:limit], tokenizer, template, cfg.data))
    tracker.log_metrics(data_metrics, step=0)
    if thudm_adapters.init_from_dir(cfg.method) and not resume_from:  # the loss the run starts from (the adapter's, not a fresh one's)
        thudm_adapters.log_starting_loss(model, train_set, make_collator(cfg.train, tokenizer.pad_token_id), tracker)
    if cfg.sanity_print:
        _print_sample(train_set[0], tokenizer)
    result.train_metrics["startup_seconds"] = time.perf_counter() - start

    # ---- generation-based evaluation (before, during, after)
    predictions_dir = run_dir / "predictions"

    def evaluate(step: int, tag: str | None = None) -> dict:
        # rank 0 generates alone, except under ZeRO-3 where every forward needs all ranks (generate syncs them)
        if eval_set is None or not (is_main() or zero3_partitioned(model)):
            return {}
        means, rows = evaluate_generation(model, tokenizer, template, eval_set, cfg.eval, list(cfg.data.metrics))
        if not is_main():
            return means
        name = tag or f"step{step}"
        write_predictions(rows, predictions_dir / f"{name}.jsonl")
        tracker.log_table(rows, f"predictions/{name}.json")
        tracker.log_metrics({f"eval/{k}": v for k, v in means.items()}, step=step)
        log.info("eval @ step %d: %s", step, ", ".join(f"{k} {v:.2f}" for k, v in means.items() if k in cfg.data.metrics))
        return means

    forgetting_set = None
    # rank 0 alone (under ZeRO-3 generation needs every rank: not supported); not measurable after a resume
    if cfg.eval.forgetting_file and is_main() and not zero3_partitioned(model) and not resume_from:
        forgetting_set = load_eval_set(cfg.eval.forgetting_file, cfg.eval.forgetting_format, tokenizer, template,
                                       cfg.data.max_source_length, cfg.eval.max_samples)

    def probe_forgetting() -> dict:
        if forgetting_set is None:
            return {}
        means, _ = evaluate_generation(model, tokenizer, template, forgetting_set, cfg.eval, list(cfg.eval.forgetting_metrics))
        return {m: means[m] for m in cfg.eval.forgetting_metrics}

    forgetting_before = probe_forgetting()
    if cfg.eval.before_training and not resume_from:
        result.metrics_before = evaluate(0, "before")

    # ---- train
    trainer = GlmTrainer(
        model=model,
        args=training_arguments(cfg, checkpoint_dir),
        train_dataset=train_set,
        data_collator=make_collator(cfg.train, tokenizer.pad_token_id),
        callbacks=[TrackingCallback(tracker, evaluate, cfg.train.eval_steps)],
        method_cfg=cfg.method,
        loss_chunk_size=cfg.train.loss_chunk_size,
    )
    quiet_trainer(trainer)
    train_start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.perf_counter() - train_start
    # every rank's tokens and peak memory, on rank 0 (one entry in-process)
    per_rank = gather_to_main((trainer.tokens_seen, peak_memory_mib())) or []
    rank_memory = {f"{k}_rank{r}": v for r, (_, mem) in enumerate(per_rank) for k, v in mem.items()} if len(per_rank) > 1 else {}
    result.train_metrics.update(
        train_loss=output.training_loss,
        train_seconds=train_seconds,
        tokens_per_s=sum(n for n, _ in per_rank) / train_seconds,
        final_loss=next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), float("nan")),
    )
    final_step = trainer.state.global_step
    tracker.log_metrics({"perf/train_seconds": train_seconds, "perf/tokens_per_s": result.train_metrics["tokens_per_s"],
                         "perf/startup_seconds": result.train_metrics["startup_seconds"], **peak_memory_mib(),
                         **rank_memory}, step=final_step)

    # ---- evaluate + save
    if dev_set is not None:
        loss = trainer.evaluate(dev_set)["eval_loss"]
        tracker.log_metrics({"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50))}, step=final_step)
        result.metrics_after["loss"] = loss
    result.metrics_after.update(evaluate(final_step, "after"))
    for name, after in probe_forgetting().items():
        # negative change = the general ability the fine-tuning cost
        change = {f"forgetting/{name}_before": forgetting_before[name], f"forgetting/{name}_after": after,
                  f"forgetting/{name}_change": after - forgetting_before[name]}
        tracker.log_metrics(change, step=final_step)
        result.metrics_after.update({k.replace("/", "_"): v for k, v in change.items()})
    adapter_dir = run_dir / "adapter"
    save_method(method, model, adapter_dir, cfg.method, trainer)
    if not is_main():
        return
    tokenizer.save_pretrained(adapter_dir)
    result_file = result.write()
    tracker.log_artifacts(run_dir / ".hydra", "hydra")
    tracker.log_artifacts(predictions_dir, "predictions_jsonl")
    tracker.log_artifact(result_file)
    if cfg.tracking.log_adapter:
        tracker.log_artifacts(adapter_dir, "adapter")


def save_method(method, model, out_dir: Path, method_cfg, trainer: Trainer) -> None:
    """``method.save`` on rank 0. Under ZeRO-3 each rank holds a slice of every weight, so the weights are
    gathered first (collective: every rank calls this): the trainable ones for adapter methods, the whole
    model, layer by layer into rank 0's CPU memory, for full fine-tuning."""
    if not zero3_partitioned(model):
        if is_main():
            method.save(model, out_dir, method_cfg)
        return
    if method.saves_whole_model:
        state_dict = trainer.accelerator.get_state_dict(trainer.deepspeed)  # needs stage3_gather_16bit_weights_on_model_save
        if is_main():
            from glm_experiments.methods.base import write_method_json

            model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
            write_method_json(out_dir, method_cfg.name, {})
    else:
        with gathered([p for p in model.parameters() if p.requires_grad]):
            if is_main():
                method.save(model, out_dir, method_cfg)
    barrier()


def _data_cache_dir() -> Path:
    from glm_experiments.constants import cache_root

    return cache_root() / "tokenized"


def _print_sample(sample: dict, tokenizer) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("position", "token", "id", "label", title="first training sample")
    for i, (tok_id, label) in enumerate(zip(sample["input_ids"], sample["labels"])):
        table.add_row(str(i), repr(tokenizer.decode([tok_id])), str(tok_id), str(label))
    Console().print(table)
