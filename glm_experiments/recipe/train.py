"""One run, as a recipe read top to bottom: ``preflight`` (every check that needs no weights), ``setup`` (data
files, model, method, tokenised data), an ``Evaluator`` (generation metrics before, during and after training),
``train`` (transformers' Trainer, trainer.py), ``evaluate_after`` and ``save_and_log``. ``run`` ties them to one
MLflow run that ends FINISHED, FAILED or KILLED."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from transformers import Trainer, set_seed

from glm_experiments.config.hydra_checks import check_creatable
from glm_experiments.config.lengths import at_lengths
from glm_experiments.config.schema import check_settings
from glm_experiments.data.dataset import load_split, make_collator, tokenized_cache_dir
from glm_experiments.data.formats import load_samples, resolve_data_path
from glm_experiments.distributed import barrier, gather_to_main, gathered, is_main, local_main_first, zero3_partitioned
from glm_experiments.errors import UserError
from glm_experiments.methods import Method, get_method, trainable_summary
from glm_experiments.methods.quantized_base import check as check_quantization
from glm_experiments.methods.quantized_base import quantization_config
from glm_experiments.metrics import CONVENTION_SOURCES
from glm_experiments.metrics import definitions as metric_definitions
from glm_experiments.migration import thudm_adapters
from glm_experiments.models.loading import check_lengths, load_model_and_tokenizer, max_positions, template_for
from glm_experiments.recipe.console import quiet_library_bars, quiet_trainer
from glm_experiments.recipe.best_checkpoint import (
    ADAPTER_LAST,
    LOSS,
    BestCheckpointCallback,
    best_settings,
    best_step_to_restore,
    saved_step_record,
    write_saved_step,
)
from glm_experiments.recipe.callbacks import peak_memory_mib, reset_peak_memory
from glm_experiments.recipe.evaluation import EvalSet, Evaluator, eval_sets_at, generation_kwargs
from glm_experiments.recipe.interrupts import STOP, sigterm_as_interrupt, stop_at_step_callback
from glm_experiments.recipe.run_dirs import resolve_resume
from glm_experiments.recipe.run_result import RESULT_FILE, RunResult, hydra_tags
from glm_experiments.recipe.trainer import (  # noqa: F401  (GlmTrainer, TRAINABLE_FILE: imported from here by tests and bench)
    TRAINABLE_FILE,
    GlmTrainer,
    TrackingCallback,
    training_arguments,
)
from glm_experiments.tracking.mlflow_tracker import DISPLAY_NAME_TAG, SMOKE_TAG, Tracker, flatten_config, git_commit, run_name
from glm_experiments.tracking.store import check_store

from glm_experiments.recipe.checks import check_device_precision, check_named_settings, check_train_options

log = logging.getLogger(__name__)


def preflight(cfg: DictConfig) -> None:
    """Every check that needs no weights, so that a mistake costs seconds, not a model load: the settings'
    ranges (config.py), option combinations, lengths vs the model's positions (its config.json only), the
    method's hardware, DeepSpeed installed. The Hydra process runs it before torchrun starts; run() again."""
    check_settings(cfg)
    if cfg.tracking.enabled:  # an unusable store said in seconds, not after MLflow's retries
        check_store(cfg.tracking.tracking_uri)
    check_creatable("output_dir", cfg.output_dir)
    check_train_options(cfg)
    check_lengths(cfg)
    check_named_settings(cfg)
    check_device_precision(cfg)
    best_settings(cfg)  # train.early_stopping / keep_best: what they watch is evaluated
    limit, where = max_positions(cfg.model)
    virtual = cfg.method.num_virtual_tokens if cfg.method.name == "prompt_tuning" else 0
    for name, lengths in at_lengths(cfg).items():  # eval.at_lengths: names known, prompt + reply fit the positions
        if (total := lengths["max_source_length"] + cfg.eval.max_new_tokens + virtual) > limit:
            raise UserError(f"eval.at_lengths={name}: max_source_length {lengths['max_source_length']} + "
                            f"eval.max_new_tokens {cfg.eval.max_new_tokens}" + (f" + {virtual} virtual tokens" if virtual
                            else "") + f" = {total} exceeds the model's {limit} positions ({where})")
    template_for(cfg.model)
    check_quantization(cfg)  # a quantized base: the method allows it, bitsandbytes runs here
    if cfg.deepspeed.config and importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"deepspeed={cfg.deepspeed.name} needs the deepspeed package, which is not installed "
                        "(pip install -e '.[deepspeed]'), or use deepspeed=none")


# ------------------------------------------------------------------------------- the run
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
    smoke = tags.get("hydra.choices.debug") == "smoke"
    name = run_name(cfg, overrides, smoke=smoke)
    tags = {**tags, DISPLAY_NAME_TAG: name, **({SMOKE_TAG: f"debug=smoke: {cfg.train.max_steps} steps, a wiring check, "
                                                           "not a result"} if smoke else {})}
    # a finished run trained on to a larger train.max_steps (run_dirs.check_resume allowed it) stays one MLflow run
    continue_run = RunResult.read(run_dir).run_id if resume_from and (run_dir / RESULT_FILE).is_file() else None
    tracker.start(name, {**tags, **({"git.commit": commit} if commit else {})}, run_dir=run_dir,
                  resumed_from=resume_from, continue_run=continue_run)
    result = RunResult(run_dir=run_dir, run_id=tracker.run_id, name=name)
    try:
        with sigterm_as_interrupt():  # ends KILLED below, not RUNNING forever
            pieces = setup(cfg, method, tracker, result, resume_from)
            evaluator = Evaluator(cfg, pieces, tracker, run_dir / "predictions", resume_from)
            forgetting_before = evaluator.forgetting()
            if cfg.eval.before_training and not resume_from:
                result.metrics_before = evaluator(0, "before")
            trainer = train(cfg, pieces, evaluator, tracker, result, checkpoint_dir, resume_from)
            result.saved_step = restore_best(cfg, method, pieces, trainer, tracker)
            evaluate_after(cfg, pieces, trainer, evaluator, forgetting_before, tracker, result)
            log_best(cfg, tracker, result)
            save_and_log(cfg, method, pieces, trainer, evaluator.predictions_dir, tracker, result)
    except BaseException as exc:
        tracker.set_tags({"error": f"{type(exc).__name__}: {exc}", **getattr(exc, "tags", {})})
        tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")
    return result


@dataclass
class Pieces:
    """What ``setup`` builds: the model with its method applied, the tokenizer and template, the data."""

    model: Any
    tokenizer: Any
    template: Any
    train_set: Any
    dev_set: Any  # tokenised dev rows (eval loss), or None without a dev file
    eval_set: EvalSet | None  # dev prompts and references for generation metrics
    # eval.at_lengths: lengths option -> (the dev prompts cut at its max_source_length, how many it cut)
    eval_sets_at: dict[str, tuple[EvalSet, int]] = field(default_factory=dict)


def setup(cfg: DictConfig, method: Method, tracker: Tracker, result: RunResult, resume_from: str | None) -> Pieces:
    # method.init_from: the adapter's own shape (r, alpha, targets / pre_seq_len, projection), before params are logged
    taken = thudm_adapters.adopt_adapter_shape(cfg, hydra_tags()[1])
    if taken and is_main():  # the run's saved config is what predict / merge / chat rebuild it from
        _record_in_saved_config(Path(cfg.output_dir), {f"method.{k}": v for k, v in taken.items()})
    params = flatten_config(cfg)
    # where the run writes is not a setting: a tag, so MLflow's compare view does not list it as a difference
    tracker.set_tags({"output_dir": params.pop("output_dir")})
    tracker.log_params(params)
    convention = cfg.eval.metric_convention
    defined = metric_definitions(convention)
    tracker.set_tags({"metric_convention": f"{convention}: {CONVENTION_SOURCES[convention]}",
                      **{f"metric_definition.{m}": defined[m] for m in cfg.data.metrics if m in defined}})

    # ---- data files read and validated before any weight loads (a 6B model takes minutes)
    start = time.perf_counter()
    train_loaded = load_samples(cfg.data.train_file, cfg.data, setting="data.train_file")
    dev_loaded = load_samples(cfg.data.dev_file, cfg.data, setting="data.dev_file") if cfg.data.dev_file else None
    if cfg.eval.forgetting_file:
        resolve_data_path(cfg.eval.forgetting_file, "eval.forgetting_file")  # read later, on rank 0 only

    # ---- model + method
    quiet_library_bars()  # the console shows one line per step (console.py)
    quantization = quantization_config(cfg)  # model.quantization, or the method's own (qlora: 4bit)
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

    # ---- tokenised data
    cache_dir = tokenized_cache_dir()
    with local_main_first():
        train_set, _, train_stats = load_split(cfg.data.train_file, tokenizer, template, cfg.data, cache_dir, train_loaded)
    if cfg.data.max_train_samples:
        train_set = train_set.select(range(min(cfg.data.max_train_samples, len(train_set))))
    dev_set = eval_set = None
    sets_at: dict[str, tuple[EvalSet, int]] = {}
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
        eval_set = EvalSet.of(dev_samples[:limit], tokenizer, template, cfg.data)
        sets_at = eval_sets_at(dev_samples[:limit], tokenizer, template, cfg.data, at_lengths(cfg))
        data_metrics.update({f"data/{name}/dev_truncated": cut for name, (_, cut) in sets_at.items()})
    tracker.log_metrics(data_metrics, step=0)
    if thudm_adapters.init_from_dir(cfg.method) and not resume_from:  # the loss the run starts from (the adapter's, not a fresh one's)
        thudm_adapters.log_starting_loss(model, train_set, make_collator(cfg.train, tokenizer.pad_token_id), tracker)
    if cfg.sanity_print:
        _print_sample(train_set[0], tokenizer)
    result.train_metrics["startup_seconds"] = time.perf_counter() - start
    return Pieces(model, tokenizer, template, train_set, dev_set, eval_set, sets_at)


def train(cfg: DictConfig, pieces: Pieces, evaluator: Evaluator, tracker: Tracker, result: RunResult,
          checkpoint_dir: Path, resume_from: str | None) -> GlmTrainer:
    settings = best_settings(cfg)  # train.keep_best / early_stopping: None when neither is on
    best = BestCheckpointCallback(**asdict(settings)) if settings else None
    tracking = TrackingCallback(tracker, evaluator, cfg.train.eval_steps, best=best)
    trainer = GlmTrainer(
        model=pieces.model,
        args=training_arguments(cfg, checkpoint_dir),
        train_dataset=pieces.train_set,
        data_collator=make_collator(cfg.train, pieces.tokenizer.pad_token_id),
        callbacks=[tracking, stop_at_step_callback(), *([best] if best else [])],
        method_cfg=cfg.method,
        loss_chunk_size=cfg.train.loss_chunk_size,
        on_nonfinite=cfg.train.on_nonfinite,
    )
    if settings and settings.metric == LOSS:  # the dev loss at every evaluation, as the run's end computes it
        tracking.loss_fn = lambda: dev_loss(cfg, pieces, trainer)[0]
    quiet_trainer(trainer)
    train_start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume_from)
    STOP.raise_if_stopped()  # a signal stopped training at a step's end, checkpointed (hydra/launcher=slurm jobs)
    train_seconds = time.perf_counter() - train_start
    # every rank's tokens and peak memory, on rank 0 (one entry in-process)
    per_rank = gather_to_main((trainer.tokens_seen, peak_memory_mib())) or []
    rank_memory = {f"{k}_rank{r}": v for r, (_, mem) in enumerate(per_rank) for k, v in mem.items()} if len(per_rank) > 1 else {}
    result.train_metrics.update(  # the loss names as in MLflow (trainer.py: LOSS_NAMES)
        loss=next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), float("nan")),
        loss_run_mean=output.training_loss,
        train_seconds=train_seconds,
        tokens_per_s=sum(n for n, _ in per_rank) / train_seconds,
        global_step=trainer.state.global_step,  # where a finished run ended (resume=auto of it: run_dirs.check_resume)
    )
    if best is not None and best.stopped_at is not None:  # a resume=auto of it has nothing to do (run_dirs.py)
        result.train_metrics["early_stopped_at"] = best.stopped_at
    if trainer.skipped_steps:  # train.on_nonfinite=skip_step
        result.train_metrics["skipped_steps"] = trainer.skipped_steps
    tracker.log_metrics({"perf/train_seconds": train_seconds, "perf/tokens_per_s": result.train_metrics["tokens_per_s"],
                         "perf/startup_seconds": result.train_metrics["startup_seconds"], **peak_memory_mib(),
                         **rank_memory}, step=trainer.state.global_step)
    return trainer


def dev_loss(cfg: DictConfig, pieces: Pieces, trainer: GlmTrainer) -> tuple[float, int]:
    """The model's loss on the dev set's first data.max_dev_samples samples (collective: every rank calls it)."""
    dev_set = pieces.dev_set
    if cfg.data.max_dev_samples and cfg.data.max_dev_samples < len(dev_set):
        dev_set = dev_set.select(range(cfg.data.max_dev_samples))
    return trainer.evaluate(dev_set)["eval_loss"], len(dev_set)


def restore_best(cfg: DictConfig, method: Method, pieces: Pieces, trainer: GlmTrainer, tracker: Tracker) -> dict:
    """train.keep_best: the best evaluation's weights back into the model when they are not the last step's (those
    saved first as run_dir/adapter_last); early stopping's tags. Returns adapter/saved_step.json's record."""
    state = trainer.state
    best = next((c for c in trainer.callback_handler.callbacks if isinstance(c, BestCheckpointCallback)), None)
    if best is not None and best.stopped_at is not None:
        tracker.set_tags({"early_stopping.stopped_at": str(best.stopped_at), "early_stopping.reason": best.reason})
    checkpoint = best_step_to_restore(state, best)
    if checkpoint is not None and zero3_partitioned(pieces.model):
        log.warning("keep_best: under ZeRO-3 the adapter is the last step's; the best step's weights are in %s", checkpoint)
        checkpoint = None
    if checkpoint is not None:
        save_method(method, pieces.model, Path(cfg.output_dir) / ADAPTER_LAST, cfg.method, trainer)
        trainer._load_from_checkpoint(str(checkpoint))  # the trainable tensors, bit-exact (trainer.py)
        log.info("keep_best: the model is step %d's again (best %s %.4f); the last step %d's weights are in %s/",
                 state.best_global_step, best.settings.metric, state.best_metric, state.global_step, ADAPTER_LAST)
    return saved_step_record(state, best, state.best_global_step if checkpoint is not None else state.global_step)


def log_best(cfg: DictConfig, tracker: Tracker, result: RunResult) -> None:
    """MLflow ``best.step`` and ``best/<metric>``: the kept evaluation's figures (its "after" evaluation's)."""
    record = result.saved_step
    if "best_metric" not in record:
        return
    names = [*cfg.data.metrics, LOSS]
    figures = {f"best/{k}": v for k, v in result.metrics_after.items() if k in names}
    figures[f"best/{record['best_metric']}"] = record["best_value"]
    tracker.set_tags({"best.step": str(record["step"])})
    tracker.log_metrics(figures, step=record["step"])


def evaluate_after(cfg: DictConfig, pieces: Pieces, trainer: GlmTrainer, evaluator: Evaluator, forgetting_before: dict,
                   tracker: Tracker, result: RunResult) -> None:
    final_step = result.saved_step["step"]  # the step of the model's weights (train.keep_best: the best's)
    tracker.set_tags({"after.step": str(final_step)})
    if pieces.dev_set is not None:
        loss, samples = dev_loss(cfg, pieces, trainer)
        # the loss is over these samples (data.max_dev_samples bounds them), not necessarily the whole dev file
        tracker.log_metrics({"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50)),
                             "eval/loss_samples": samples}, step=final_step)
        result.metrics_after.update(loss=loss, loss_samples=samples)
    result.metrics_after.update(evaluator(final_step, "after"))
    for name, means in evaluator.at_lengths(final_step).items():
        result.metrics_after.update({f"{name}/{k}": v for k, v in means.items()})
    for name, after in evaluator.forgetting().items():
        # negative change = the general ability the fine-tuning cost
        change = {f"forgetting/{name}_before": forgetting_before[name], f"forgetting/{name}_after": after,
                  f"forgetting/{name}_change": after - forgetting_before[name]}
        tracker.log_metrics(change, step=final_step)
        result.metrics_after.update({k.replace("/", "_"): v for k, v in change.items()})


def save_and_log(cfg: DictConfig, method: Method, pieces: Pieces, trainer: GlmTrainer, predictions_dir: Path,
                 tracker: Tracker, result: RunResult) -> None:
    run_dir = Path(cfg.output_dir)
    adapter_dir = run_dir / "adapter"
    save_method(method, pieces.model, adapter_dir, cfg.method, trainer)
    if not is_main():
        return
    pieces.tokenizer.save_pretrained(adapter_dir)
    write_saved_step(adapter_dir, result.saved_step)  # predict, merge, chat, web, compare say which step it is
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
            from glm_experiments.methods.artifacts import write_method_json

            model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
            write_method_json(out_dir, method_cfg.name, {})
    else:
        with gathered([p for p in model.parameters() if p.requires_grad]):
            if is_main():
                method.save(model, out_dir, method_cfg)
    barrier()


def _record_in_saved_config(run_dir: Path, values: dict) -> None:
    """Settings the run took from elsewhere (method.init_from's adapter) written into its .hydra/config.yaml."""
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return
    saved = OmegaConf.load(path)
    for key, value in values.items():
        OmegaConf.update(saved, key, value, force_add=True)
    OmegaConf.save(saved, path)


def _print_sample(sample: dict, tokenizer) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("position", "token", "id", "label", title="first training sample")
    for i, (tok_id, label) in enumerate(zip(sample["input_ids"], sample["labels"])):
        table.add_row(str(i), repr(tokenizer.decode([tok_id])), str(tok_id), str(label))
    Console().print(table)
