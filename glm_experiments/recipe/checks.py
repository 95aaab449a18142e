"""Settings checked before anything loads that only the recipe knows how to judge: trainer options, precision on
this device, names (metrics, layers) that must exist."""

from __future__ import annotations

from omegaconf import DictConfig
from transformers import SchedulerType

from glm_experiments.errors import UserError
from glm_experiments.methods import get_method
from glm_experiments.metrics import DEFINITIONS
from glm_experiments.models.loading import num_layers


# ------------------------------------------------------------------------------- preflight
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
    if t.on_nonfinite == "skip_step" and cfg.deepspeed.config:
        raise UserError(f"train.on_nonfinite=skip_step does not work with deepspeed={cfg.deepspeed.name} (the engine "
                        "updates the weights inside backward, before the gradient norm is known): use stop or continue")
    if t.loss_chunk_size and stage == 3:
        raise UserError("train.loss_chunk_size does not work under ZeRO-3 (the output head's weight is partitioned "
                        "outside its forward); use deepspeed=zero2 or train.loss_chunk_size=0")


def check_device_precision(cfg: DictConfig) -> None:
    """fp16 mixed precision cannot work on a CPU: refused here (float16 *weights* on a CPU work but crawl:
    models/loading.py: resolve_dtype warns in one line)."""
    import torch

    if cfg.train.precision == "float16" and not torch.cuda.is_available():
        raise UserError("train.precision=float16: fp16 mixed precision needs a CUDA GPU (its gradient scaler and "
                        "half-precision kernels are GPU-only); on a CPU use train.precision=bfloat16 or float32 (auto)")


def check_named_settings(cfg: DictConfig) -> None:
    """Settings that name something (metrics, the model's layers) name what exists: refused here, not after
    the training they would otherwise end (an unknown metric used to fail at the evaluation after it)."""
    for key, names in (("data.metrics", cfg.data.metrics), ("eval.forgetting_metrics", cfg.eval.forgetting_metrics)):
        unknown = [str(m) for m in names if m not in DEFINITIONS]
        if unknown:
            raise UserError(f"{key}=[{','.join(map(str, names))}]: unknown metric {', '.join(unknown)} "
                            f"(known: {', '.join(sorted(DEFINITIONS))})")
    n_last = cfg.method.get("num_last_layers") if not cfg.method.get("trainable_patterns") else None
    layers = num_layers(cfg.model) if n_last is not None else None
    if layers is not None and n_last > layers[0]:
        raise UserError(f"method.num_last_layers={n_last}: must be in [1, {layers[0]}] (the model's layers, {layers[1]})")
