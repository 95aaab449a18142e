"""Typed schema for every config group.

Every default lives here, in the schema, and only here: an option file under ``conf/`` names its schema
node and says only what makes that option different (for a method: nothing but its name). Code reads the
composed config, or the schema's defaults (``methods/*: DEFAULTS``), never a literal of its own.

Each group option in ``conf/`` starts its defaults list with one of the schema nodes
registered here (``- /schema/method/lora@_here_`` style is avoided: each option simply
names ``base_<kind>``), so a mistyped key or a wrong type fails when Hydra composes the
config, before anything is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from omegaconf import MISSING, OmegaConf

import glm_experiments.config.resolvers  # noqa: F401  (${mul:...} in conf/, also when tests compose)
from glm_experiments.errors import UserError

from glm_experiments.config.ranges import AT_LEAST_1, POSITIVE, Range, one_of, ranged


# --------------------------------------------------------------------------- model
@dataclass
class TinyModelConfig:
    """Shape of the project's own CPU model and of its one-off pre-training run."""

    hidden_size: int = ranged(128, **AT_LEAST_1)
    num_hidden_layers: int = ranged(4, **AT_LEAST_1)
    num_attention_heads: int = ranged(4, **AT_LEAST_1)
    num_key_value_heads: int = ranged(2, **AT_LEAST_1)
    head_dim: int = ranged(32, **AT_LEAST_1)
    intermediate_size: int = ranged(344, **AT_LEAST_1)
    vocab_size: int = ranged(2000, **AT_LEAST_1)  # at most; char-level BPE pieces of <= 2 characters learned from the demo sets
    # RoPE: no weight depends on it. 2048 admits the `lengths` presets (1024 + 256) that data.max_source_length
    # + max_target_length are checked against
    max_position_embeddings: int = ranged(2048, **AT_LEAST_1)
    pretrain_steps: int = ranged(200, **AT_LEAST_1)
    pretrain_batch_size: int = ranged(16, **AT_LEAST_1)
    pretrain_lr: float = ranged(3e-3, **POSITIVE)
    pretrain_seq_len: int = ranged(96, **AT_LEAST_1)


@dataclass
class ModelConfig:
    name: str = MISSING
    # a folder of models/ (models/<family>/family.py): tiny | chatglm | chatglm2 | chatglm3 | glm4 | hf (a directory in transformers' format)
    family: str = MISSING
    path: Optional[str] = None
    # auto = bf16 where the hardware supports it, fp32 on CPU
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    # convert a THUDM checkpoint once into ~/.cache/glm_experiments/converted (sweeps reuse it)
    # instead of mapping it in memory on every run
    cache_conversion: bool = True
    # chat template (data/templates.py) used to tokenise; null = the family's own (Family.template)
    template: Optional[str] = None
    tiny: Optional[TinyModelConfig] = None
    # load the base quantized (bitsandbytes, models/quantization.py): null | 4bit (NF4/FP4) | 8bit (LLM.int8), for any
    # method that keeps the base frozen (the seeds' --quantization_bit 4); method=qlora implies 4bit. CUDA, or the
    # CPU with bitsandbytes >= 0.50
    quantization: Optional[str] = one_of(None, "4bit", "8bit")
    quant_type: str = one_of("nf4", "nf4", "fp4")  # 4bit only
    double_quant: bool = True  # 4bit only: quantize the per-block scales too
    quant_compute_dtype: str = one_of("bfloat16", "bfloat16", "float16", "float32")  # 4bit only


# -------------------------------------------------------------------------- method
@dataclass
class MethodConfig:
    name: str = MISSING


# ---------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    name: str = MISSING
    # adgen | conversations | instruction
    format: str = MISSING
    train_file: str = MISSING
    dev_file: Optional[str] = None
    test_file: Optional[str] = None
    prompt_column: str = "content"
    response_column: str = "summary"
    history_column: Optional[str] = None
    max_source_length: int = ranged(128, **AT_LEAST_1)
    max_target_length: int = ranged(128, **AT_LEAST_1)
    # raise | skip: what to do with a bad record (skips are counted and logged, never silent)
    on_error: str = "raise"
    max_train_samples: Optional[int] = ranged(None, **AT_LEAST_1)  # null = all
    # the eval-loss pass after training covers the dev file's first N samples; null = all (debug=smoke: a few)
    max_dev_samples: Optional[int] = ranged(None, **AT_LEAST_1)
    # metrics computed on generated predictions: bleu-4, rouge-1, rouge-2, rouge-l, triple_f1, accuracy
    metrics: list[str] = field(default_factory=lambda: ["bleu-4", "rouge-1", "rouge-2", "rouge-l"])


# --------------------------------------------------------------------------- train
@dataclass
class EarlyStoppingConfig:
    """``train.early_stopping``: training ends (FINISHED) once ``patience`` evaluations in a row (every
    train.eval_steps) brought no improvement larger than ``min_delta`` (recipe/best_checkpoint.py). Always a node
    (OmegaConf cannot set ``train.early_stopping.patience=3`` into a null one): patience null = off."""

    # a metric of data.metrics, or loss (the dev loss, then computed at every evaluation); null = optimize_metric.
    # Also the metric train.keep_best picks the best evaluation by
    metric: Optional[str] = None
    # max | min; null = min for loss, max for the others
    mode: Optional[str] = one_of(None, "max", "min")
    # evaluations in a row without such an improvement that end training; null = no early stopping
    patience: Optional[int] = ranged(None, **AT_LEAST_1)
    min_delta: float = ranged(0.0, min=0)


@dataclass
class TrainConfig:
    # training length in optimizer steps ...
    max_steps: int = ranged(300, **AT_LEAST_1)
    # ... or, when set, in passes over the training data (max_steps is then ignored; the seeds' num_train_epochs)
    num_train_epochs: Optional[float] = ranged(None, **POSITIVE)
    per_device_train_batch_size: int = ranged(16, **AT_LEAST_1)
    gradient_accumulation_steps: int = ranged(1, **AT_LEAST_1)
    learning_rate: float = ranged(5e-3, **POSITIVE)
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = ranged(0.05, min=0, max=1)
    weight_decay: float = ranged(0.0, min=0)
    max_grad_norm: float = ranged(1.0, min=0, min_open=True, off=(0, "no clipping"))
    logging_steps: int = ranged(10, **AT_LEAST_1)
    # generation-based evaluation every N steps (0 = only before and after training)
    eval_steps: int = ranged(0, min=1, off=(0, "only before and after training"))
    save_steps: int = ranged(100, min=1, off=(0, "no checkpoints"))
    save_total_limit: int = ranged(2, min=1, off=(0, "keep all"))
    gradient_checkpointing: bool = False
    group_by_length: bool = True
    # concatenate each batch into one row, positions restarting per sample, no cross-sample attention
    # (transformers' DataCollatorWithFlattening); lora / qlora / freeze / full only. Pays off with
    # flash-attention varlen kernels on a GPU; on CPU/SDPA the block-diagonal mask is dense and slower
    packing: bool = False
    # 0: transformers' loss over the full batch x seq x vocab logits; N > 0: cross-entropy over the
    # supervised positions only, N tokens' logits at a time, recomputed in backward (glm_experiments/recipe/losses.py)
    loss_chunk_size: int = ranged(0, min=1, off=(0, "off"))
    dataloader_num_workers: int = ranged(0, min=0)
    # auto | float32 | bfloat16 | float16 (mixed precision of the Trainer)
    precision: str = one_of("auto", "auto", "float32", "bfloat16", "float16")
    # a training loss or gradient norm that turns NaN/inf: stop (the run ends FAILED at that step, its checkpoint
    # not saved, the last good one kept for resume=auto) | skip_step (that batch's update left out, counted as
    # train/skipped_steps) | continue (train on, as transformers does)
    on_nonfinite: str = one_of("stop", "stop", "skip_step", "continue")
    # off until train.early_stopping.patience is set
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # the best evaluation's step (by early_stopping.metric, else optimize_metric) is checkpointed, protected from
    # save_total_limit, and its weights are the run's adapter/ (the last step's: adapter_last/); null = on when
    # eval_steps > 0
    keep_best: Optional[bool] = None


@dataclass
class EvalConfig:
    before_training: bool = True
    max_samples: Optional[int] = ranged(64, **AT_LEAST_1)  # null = all
    batch_size: int = ranged(16, **AT_LEAST_1)
    max_new_tokens: int = ranged(64, **AT_LEAST_1)
    do_sample: bool = False
    num_beams: int = ranged(1, **AT_LEAST_1)
    temperature: float = ranged(0.95, **POSITIVE)
    top_p: float = ranged(0.7, min=0, max=1, min_open=True)
    # forgetting probe: a general-ability set generated on before and after fine-tuning (change logged)
    forgetting_file: Optional[str] = None
    forgetting_format: str = "instruction"
    forgetting_metrics: list[str] = field(default_factory=lambda: ["rouge-l"])
    # how BLEU-4 and ROUGE are computed (glm_experiments/metrics/text.py): thudm_ptuning = ChatGLM-6B/2
    # ptuning/main.py (BLEU on characters, x100); chatglm3_finetune = ChatGLM3 finetune_hf.py (BLEU on jieba
    # words, not x100; ROUGE rounded to 4 places). Runs of different conventions are not comparable
    metric_convention: str = one_of("thudm_ptuning", "thudm_ptuning", "chatglm3_finetune")
    # cross-evaluation: after training, evaluate again at each of these `lengths` options (conf/lengths/<name>.yaml:
    # its max_source_length cuts the prompts; replies get eval.max_new_tokens as always): eval/<name>/<metric> and
    # predictions/<name>/after.json. Empty = only the run's own lengths (config/lengths.py checks the names)
    at_lengths: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------ tracking
@dataclass
class TrackingConfig:
    enabled: bool = True
    # default: SQLite store in the project root, artifacts beside it
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: Optional[str] = None
    experiment_name: str = "glm_experiments"
    # one line shown as the MLflow experiment's description (tag mlflow.note.content); conf/experiment/*.yaml set it
    description: Optional[str] = None
    run_name: Optional[str] = None
    log_adapter: bool = True


@dataclass
class DeepSpeedConfig:
    name: str = "none"
    # the DeepSpeed JSON, as YAML; "auto" values are filled from the training arguments
    config: Optional[dict[str, Any]] = None


@dataclass
class LauncherConfig:
    """How many processes train (glm_experiments/scale/launcher.py): 1 process on 1 node without DeepSpeed runs
    in-process; anything else composes once and starts torchrun workers."""

    nproc_per_node: int = ranged(1, **AT_LEAST_1)
    nnodes: int = ranged(1, **AT_LEAST_1)
    node_rank: int = ranged(0, min=0)
    master_addr: str = "127.0.0.1"
    # 0 = a free port on one node, 29500 across nodes
    master_port: int = ranged(0, min=1, max=65535, off=(0, "a free port"))


# ------------------------------------------------------------------- hydra/launcher
# How the jobs of a --multirun run (glm_experiments/scale/submitit_pool.py, docs/scaling.md): hydra-submitit-launcher's
# schemas, with this project's keys and defaults. Read by the launcher in the launching process.
@dataclass
class ParallelLauncherConf(LocalQueueConf):
    """``hydra/launcher=parallel``: each job its own process on this machine (submitit's local executor). The
    plugin's keys keep their meaning per job: ``gpus_per_node`` = the GPUs of each job (its CUDA_VISIBLE_DEVICES;
    null = the job's launcher.nproc_per_node, one per torchrun process), ``cpus_per_task`` = its torch threads
    (OMP_NUM_THREADS; null = the cores split evenly between the jobs at a time)."""

    _target_: str = "hydra_plugins.glm_experiments_launchers.launchers.ParallelLauncher"
    # jobs at a time; null = one per gpus_per_node visible GPUs, or 1 on a machine without GPUs
    max_parallel: Optional[int] = None
    # submitit ends a local job at this limit (the plugin's 60 min would cut a real fine-tuning run): a week
    timeout_min: int = 7 * 24 * 60


@dataclass
class SlurmLauncherConf(SlurmQueueConf):
    """``hydra/launcher=slurm``: each job a task of one sbatch job array. The keys a user sets: partition,
    account, gpus_per_node, cpus_per_task, mem_gb, timeout_min, array_parallelism, setup, additional_parameters."""

    _target_: str = "hydra_plugins.glm_experiments_launchers.launchers.SlurmSweepLauncher"
    # GPUs of each job; null = the job's launcher.nproc_per_node (one per torchrun process), 0 = none (CPU
    # partitions). torchrun, not srun, starts a job's processes: every job is one task (the plugin's tasks_per_node 1)
    gpus_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = 8  # SLURM's default of 1 core starves tokenisation and data loading
    timeout_min: int = 24 * 60  # the plugin's 60 min would cut a real fine-tuning run
    name: str = "glm_experiments"  # the job name squeue shows (the plugin's is the module's: __main__)
    # a job whose time limit comes (USR2 signal_delay_s before it) checkpoints and requeues itself this often at
    # most (the plugin's 0 would end it); preemptions and `scontrol requeue` do not count (docs/scaling.md)
    max_num_timeout: int = 3


# -------------------------------------------------------------------------- root
@dataclass
class Config:
    model: ModelConfig = MISSING
    method: Any = MISSING
    data: DataConfig = MISSING
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = ranged(42, min=0, max=2**32 - 1)  # numpy's seed range
    # run products; set to Hydra's job dir by conf/train.yaml
    output_dir: str = MISSING
    # null | auto | <step>: continue from the output dir's last (or given) checkpoint
    resume: Optional[str] = None
    # print the first tokenised sample (token, id, label) before training
    sanity_print: bool = False
    # the eval metric the run returns to a sweeper (hparams_search=optuna maximises it)
    optimize_metric: str = "rouge-l"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="tracking", name="base_tracking", node=TrackingConfig)
    cs.store(group="deepspeed", name="base_deepspeed", node=DeepSpeedConfig)
    cs.store(group="hydra/launcher", name="base_parallel", node=ParallelLauncherConf, provider="glm_experiments")
    cs.store(group="hydra/launcher", name="base_slurm", node=SlurmLauncherConf, provider="glm_experiments")
    # each method stores its own schema (method/base_<name>) when its module registers it (methods/record.py):
    # whoever composes imports glm_experiments.methods first (__main__.py, compose.py)


def _schema_of(hint) -> type | None:
    """The dataclass behind a field's type (``Optional[TinyModelConfig]`` -> TinyModelConfig)."""
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _scalar_type(hint) -> type | None:
    """int, float, str or bool behind a field's type (``Optional[float]`` -> float), else None."""
    for candidate in (hint, *typing.get_args(hint)):
        if candidate in (int, float, str, bool):
            return candidate
    return None


def _check_node(node, schema: type, prefix: str) -> None:
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    for extra in (k for k in node.keys() if k not in names):  # added with +key=value: Hydra lets it in
        close = difflib.get_close_matches(str(extra), names, n=1)
        hint = f"did you mean {prefix}{close[0]}?" if close else f"{prefix.rstrip('.') or 'the config'} has {', '.join(names)}"
        raise UserError(f"+{prefix}{extra}={_raw(node, extra)}: no such setting ({hint})")
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        rule, choices = f.metadata.get("range"), f.metadata.get("choices")
        if f.name == "method" and schema is Config:
            sub = _schema_of(OmegaConf.get_type(node.method))  # the method's own dataclass, typed at composition
        else:
            sub = _schema_of(hints[f.name])
        kind = _scalar_type(hints[f.name])
        if rule is None and kind is float:
            rule = Range()  # a float without a declared range: any finite number
        if sub is None and rule is None and choices is None:
            continue  # e.g. output_dir: not resolved here (${hydra:...} outside Hydra)
        value = node.get(f.name)
        if value is None:
            continue
        if sub is not None:
            _check_node(value, sub, f"{key}.")
        elif rule is not None and not rule.allows(value):
            raise rule.error(key, value, kind)
        elif choices is not None and value not in choices:
            raise UserError(f"{key}={value}: expected one of {', '.join(map(str, choices))}")


def _raw(node, key) -> str:
    """The value of ``node.key`` as written (``${oops}``), unresolved."""
    try:
        return str(node._get_node(key)._value())
    except Exception:  # noqa: BLE001 - only for a message
        return "..."


def _check_resolvable(cfg) -> None:
    """Every interpolation resolves (``train.learning_rate=${oops}`` would otherwise fail where it is first read).
    ``output_dir`` (``${hydra:...}``) resolves only inside a Hydra run: left to the run."""
    from omegaconf.errors import InterpolationResolutionError

    for key in cfg.keys():
        if key == "output_dir":
            continue
        try:
            value = OmegaConf.select(cfg, str(key), throw_on_missing=False)  # a root scalar resolves here
            if OmegaConf.is_config(value):
                OmegaConf.to_container(value, resolve=True)
        except InterpolationResolutionError as exc:
            full_key = exc.full_key or str(key)
            parent, _, leaf = full_key.rpartition(".")
            raw = _raw(OmegaConf.select(cfg, parent) if parent else cfg, leaf)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"{full_key}={raw}: {reason[:1].lower()}{reason[1:]}") from None


def check_tracking_uri(tracking_cfg) -> None:
    """An empty URI would silently become MLflow's default (./mlruns or $MLFLOW_TRACKING_URI of the moment)."""
    if tracking_cfg.get("enabled", True) and not str(tracking_cfg.get("tracking_uri") or "").strip():
        raise UserError("tracking.tracking_uri is empty: tracking=server takes the server's address from "
                        "MLFLOW_TRACKING_URI (export MLFLOW_TRACKING_URI=http://<host>:5000) or "
                        "tracking.tracking_uri=http://<host>:5000")


def check_settings(cfg) -> None:
    """Every setting against the range its schema field declares, plus the rules that tie settings together.
    Cheap (no file is read): called before torchrun starts and before anything loads."""
    _check_resolvable(cfg)
    _check_node(cfg, Config, "")
    check_tracking_uri(cfg.tracking)
    tiny = cfg.model.get("tiny")
    if tiny is not None and tiny.num_attention_heads % tiny.num_key_value_heads:
        raise UserError(f"model.tiny.num_attention_heads={tiny.num_attention_heads} must be a multiple of "
                        f"model.tiny.num_key_value_heads={tiny.num_key_value_heads}")


register_configs()
