"""Typed schema for every config group.

Each group option in ``conf/`` starts its defaults list with one of the schema nodes
registered here (``- /schema/method/lora@_here_`` style is avoided: each option simply
names ``base_<kind>``), so a mistyped key or a wrong type fails when Hydra composes the
config, before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

import glm_experiments.resolvers  # noqa: F401  (${mul:...} in conf/, also when tests compose)


# --------------------------------------------------------------------------- model
@dataclass
class TinyModelConfig:
    """Shape of the project's own CPU model and of its one-off pre-training run."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 344
    vocab_size: int = 2000  # at most; char-level BPE pieces of <= 2 characters learned from the demo sets
    max_position_embeddings: int = 512
    pretrain_steps: int = 200
    pretrain_batch_size: int = 16
    pretrain_lr: float = 3e-3
    pretrain_seq_len: int = 96


@dataclass
class ModelConfig:
    name: str = MISSING
    # tiny | chatglm | chatglm2 | chatglm3 | glm4 | hf (a directory already in native HF format)
    family: str = MISSING
    path: Optional[str] = None
    # auto = bf16 where the hardware supports it, fp32 on CPU
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    # convert a THUDM checkpoint once into ~/.cache/glm_experiments/converted (sweeps reuse it)
    # instead of mapping it in memory on every run
    cache_conversion: bool = True
    # chat template family used to tokenise (defaults to the model family's own)
    template: Optional[str] = None
    tiny: Optional[TinyModelConfig] = None


# -------------------------------------------------------------------------- method
@dataclass
class MethodConfig:
    name: str = MISSING


@dataclass
class FreezeMethodConfig(MethodConfig):
    # train the last N transformer layers ...
    num_last_layers: int = 2
    # ... or, if given, exactly the parameters whose name contains one of these
    trainable_patterns: list[str] = field(default_factory=list)


@dataclass
class LoraMethodConfig(MethodConfig):
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # ["all-linear"] or module names; empty = the family's default
    target_modules: list[str] = field(default_factory=list)
    bias: str = "none"
    # start from this adapter (ours, or a THUDM/PEFT one: converted on the fly) instead of a fresh LoRA
    init_from: Optional[str] = None


@dataclass
class QloraMethodConfig(LoraMethodConfig):
    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"


@dataclass
class PtuningMethodConfig(MethodConfig):
    pre_seq_len: int = 16
    prefix_projection: bool = False
    prefix_hidden_size: int = 512
    prefix_dropout: float = 0.1
    # start from this prefix encoder (ours, ptuning/main.py's, or PEFT PREFIX_TUNING: converted on the fly)
    init_from: Optional[str] = None


@dataclass
class PromptTuningMethodConfig(MethodConfig):
    num_virtual_tokens: int = 16
    # text whose embeddings initialise the soft prompt; empty = random
    init_text: str = ""


@dataclass
class FullMethodConfig(MethodConfig):
    pass


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
    max_source_length: int = 128
    max_target_length: int = 128
    # raise | skip: what to do with a bad record (skips are counted and logged, never silent)
    on_error: str = "raise"
    max_train_samples: Optional[int] = None
    # metrics computed on generated predictions: bleu-4, rouge-1, rouge-2, rouge-l, triple_f1, accuracy
    metrics: list[str] = field(default_factory=lambda: ["bleu-4", "rouge-1", "rouge-2", "rouge-l"])


# --------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    max_steps: int = 300
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-3
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    # generation-based evaluation every N steps (0 = only before and after training)
    eval_steps: int = 0
    save_steps: int = 100
    save_total_limit: int = 2
    gradient_checkpointing: bool = False
    group_by_length: bool = True
    # concatenate each batch into one row, positions restarting per sample, no cross-sample attention
    # (transformers' DataCollatorWithFlattening); lora / qlora / freeze / full only. Pays off with
    # flash-attention varlen kernels on a GPU; on CPU/SDPA the block-diagonal mask is dense and slower
    packing: bool = False
    # 0: transformers' loss over the full batch x seq x vocab logits; N > 0: cross-entropy over the
    # supervised positions only, N tokens' logits at a time, recomputed in backward (glm_experiments/losses.py)
    loss_chunk_size: int = 0
    dataloader_num_workers: int = 0
    # auto | float32 | bfloat16 | float16 (mixed precision of the Trainer)
    precision: str = "auto"


@dataclass
class EvalConfig:
    before_training: bool = True
    max_samples: Optional[int] = 64
    batch_size: int = 16
    max_new_tokens: int = 64
    do_sample: bool = False
    num_beams: int = 1
    temperature: float = 0.95
    top_p: float = 0.7
    # forgetting probe: a general-ability set generated on before and after fine-tuning (change logged)
    forgetting_file: Optional[str] = None
    forgetting_format: str = "instruction"
    forgetting_metrics: list[str] = field(default_factory=lambda: ["rouge-l"])


# ------------------------------------------------------------------------ tracking
@dataclass
class TrackingConfig:
    enabled: bool = True
    # default: SQLite store in the project root, artifacts beside it
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: Optional[str] = None
    experiment_name: str = "glm_experiments"
    run_name: Optional[str] = None
    log_adapter: bool = True


@dataclass
class DeepSpeedConfig:
    name: str = "none"
    # the DeepSpeed JSON, as YAML; "auto" values are filled from the training arguments
    config: Optional[dict[str, Any]] = None


@dataclass
class LauncherConfig:
    """How many processes train (glm_experiments/launcher.py): 1 process on 1 node without DeepSpeed runs
    in-process; anything else composes once and starts torchrun workers."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    # 0 = a free port on one node, 29500 across nodes
    master_port: int = 0


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
    seed: int = 42
    # run products; set to Hydra's job dir by conf/train.yaml
    output_dir: str = MISSING
    # null | auto | <step>: continue from the output dir's last (or given) checkpoint
    resume: Optional[str] = None
    # print the first tokenised sample (token, id, label) before training
    sanity_print: bool = False
    # the eval metric the run returns to a sweeper (hparams_search=optuna maximises it)
    optimize_metric: str = "rouge-l"


METHOD_SCHEMAS = {
    "freeze": FreezeMethodConfig,
    "lora": LoraMethodConfig,
    "qlora": QloraMethodConfig,
    "ptuning": PtuningMethodConfig,
    "prompt_tuning": PromptTuningMethodConfig,
    "full": FullMethodConfig,
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="tracking", name="base_tracking", node=TrackingConfig)
    cs.store(group="deepspeed", name="base_deepspeed", node=DeepSpeedConfig)
    for name, schema in METHOD_SCHEMAS.items():
        cs.store(group="method", name=f"base_{name}", node=schema)


register_configs()
