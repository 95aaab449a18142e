"""Peak training memory of a ChatGLM3-6B-shaped model (all 28 layers), traced without running it.

The model is built under ``FakeTensorMode``: every tensor has a shape, dtype and device but no data, so
a 12 GB model and a full training step cost seconds and no RAM. A ``TorchDispatchMode`` sees every
tensor the step creates (weights, adapter, activations kept for backward, logits, gradients, optimizer
states, temporaries) and keeps a running sum of live storage bytes; its maximum is the peak. That is
what a GPU run asks of PyTorch's caching allocator (``torch.cuda.max_memory_allocated`` measures the
same thing). Not included: the CUDA context (~0.5 GiB), cuBLAS/flash-attention workspaces, allocator
rounding and fragmentation, and kernels that differ between CPU and CUDA (attention here is the CPU
SDPA kernel under bf16 autocast). Checked against reality on CPU (``trace-check`` in bench/traced_peaks.py):
for the same fp32 steps the fake trace, the count on real tensors and the process's peak RSS agree within 1 %.
Hand-written because ``torch.distributed._tools.MemTracker`` assumes every parameter is trained (it hooks
each one's gradient), which a frozen base is not.

The step is what GlmTrainer runs at ``precision=bfloat16``: bf16 weights, bf16 autocast, the method's
adapter in its own dtype, AdamW over the trainable parameters, two steps (optimizer states exist from
the first ``step()`` on).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB = 2**20


class LiveBytes(TorchDispatchMode):
    """Running sum of the bytes of every tensor storage alive, and its maximum."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if (
                    key not in self._seen
                ):  # a view of a storage already counted adds nothing
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


@contextlib.contextmanager
def _fake_world():
    """FakeTensorMode, plus ``Module.to`` as a no-op: PEFT moves each adapter to its base layer's device with
    ``.to()``, which under fake tensors must swap parameters and fails; everything is on the (fake) CPU anyway."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from glm_experiments.recipe import losses

    original_to, original_select = torch.nn.Module.to, losses.supervised_positions
    torch.nn.Module.to = lambda self, *args, **kwargs: self
    # boolean indexing has a data-dependent shape; keeping every row (labels -100 ignored) changes the chunked
    # loss's compute, not its peak (one chunk's logits)
    losses.supervised_positions = lambda hidden, targets: (hidden, targets)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        torch.nn.Module.to, losses.supervised_positions = original_to, original_select


def training_steps(
    model_config,
    method_cfg,
    batch: int,
    source_len: int,
    target_len: int,
    *,
    gradient_checkpointing: bool = False,
    loss_chunk_size: int = 0,
    dtype=torch.bfloat16,
) -> dict:
    """Build ``GlmForCausalLM(model_config)`` in ``dtype``, apply the method and run two training steps on ``batch``
    samples of ``source_len + target_len`` tokens (loss on the target part; bf16 autocast for bf16), counting
    live tensor bytes. Real tensors here; under :func:`trace_training_step` fake ones."""
    from transformers import GlmForCausalLM

    from glm_experiments.recipe.losses import chunked_loss
    from glm_experiments.methods import get_method, trainable_summary

    tracker = LiveBytes()
    with tracker:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = GlmForCausalLM(model_config)
        finally:
            torch.set_default_dtype(previous)
        model = get_method(method_cfg.name).apply(model, method_cfg)
        weights = tracker.live
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.train()
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-4
        )
        ids = torch.randint(
            0, model_config.vocab_size, (batch, source_len + target_len)
        )
        labels = ids.clone()
        labels[:, :source_len] = -100
        for _ in range(2):
            chunked = (
                chunked_loss(model, loss_chunk_size)
                if loss_chunk_size
                else contextlib.nullcontext()
            )
            with (
                torch.autocast(
                    "cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16
                ),
                chunked,
            ):
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        summary = trainable_summary(model)
    return {
        "peak_mib": tracker.peak / MIB,
        "weights_mib": weights / MIB,
        "trainable_params": summary["trainable"],
        "tokens": batch * (source_len + target_len),
    }


def trace_training_step(
    model_config, method_cfg, batch: int, source_len: int, target_len: int, **kwargs
) -> dict:
    """:func:`training_steps` on fake tensors: the peak without computing anything."""
    with _fake_world():
        return training_steps(
            model_config, method_cfg, batch, source_len, target_len, **kwargs
        )


def trace_any_method(
    model_config, method_cfg, batch: int, source_len: int, target_len: int, **kwargs
) -> dict:
    """:func:`trace_training_step` for every method, QLoRA included: bitsandbytes needs CUDA, so QLoRA is traced as
    LoRA on the bf16 base and its 4-bit weights are counted by arithmetic (minus :func:`nf4_saving_mib`, plus
    :func:`dequant_transient_mib`)."""
    if method_cfg.name != "qlora":
        return trace_training_step(
            model_config, method_cfg, batch, source_len, target_len, **kwargs
        )
    from omegaconf import OmegaConf

    lora_cfg = OmegaConf.merge(method_cfg, {"name": "lora"})
    r = trace_training_step(
        model_config, lora_cfg, batch, source_len, target_len, **kwargs
    )
    nf4, dequant = nf4_saving_mib(model_config), dequant_transient_mib(model_config)
    r["peak_mib"] += dequant - nf4
    r["weights_mib"] -= nf4
    r["nf4_saving_mib"], r["dequant_transient_mib"] = nf4, dequant
    return r


NF4_BYTES_PER_PARAM = 0.53  # 4 bits + the double-quantised absmax per 64-weight block


def decoder_linear_params(model_config) -> int:
    """Weights of the decoder's linear layers (q/k/v, o, gate/up, down), all layers: what QLoRA quantises."""
    h, f = model_config.hidden_size, model_config.intermediate_size
    kv = model_config.num_key_value_heads * model_config.head_dim
    return model_config.num_hidden_layers * (
        h * (h + 2 * kv) + h * h + h * 2 * f + f * h
    )


def nf4_saving_mib(model_config) -> float:
    """bf16 bytes of the decoder's linear weights minus their nf4 size: what QLoRA's 4-bit base saves over the
    traced bf16 base (embedding and output head stay bf16)."""
    return decoder_linear_params(model_config) * (2 - NF4_BYTES_PER_PARAM) / MIB


def dequant_transient_mib(model_config) -> float:
    """bitsandbytes dequantises a 4-bit weight to bf16 for each matmul: the largest one (gate_up_proj) is alive at
    a time on top of the traced peak, which already holds every weight in bf16 instead."""
    return model_config.hidden_size * 2 * model_config.intermediate_size * 2 / MIB
