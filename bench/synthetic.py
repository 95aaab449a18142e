"""Random-weight GLMs of a given shape, random batches, and timed training steps on them.

Used by the measured memory benchmark (bench/method_memory.py), the traced one (bench/traced_peaks.py), the
knobs (bench/knobs.py) and the GPU check's train cases (bench/gpu_train.py). transformers and the project are
imported inside the functions: bench/gpu_check.py imports this module before it installs what its machine lacks.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import torch

# ChatGLM3-6B's shape (its config.json: hidden 4096, 32 heads, 2 KV groups, ffn 13696); ChatGLM2-6B has the same. 28 layers in the real models.
CHATGLM3_6B = {
    "hidden_size": 4096,
    "intermediate_size": 13696,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "vocab_size": 65024,
}


def glm_config(shape: dict, layers: int, **settings):
    """A ``GlmConfig`` of ``shape`` with ``layers`` decoder layers: ChatGLM's partial rotary embedding, biased
    attention projections, an untied output head, pad id 0, SDPA attention; ``settings``: any other field."""
    from transformers import GlmConfig

    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    config = GlmConfig(
        **shape,
        num_hidden_layers=layers,
        attention_bias=True,
        tie_word_embeddings=False,
        rope_parameters=rope,
        pad_token_id=0,
        **settings,
    )
    config._attn_implementation = "sdpa"
    return config


def chatglm_config(shape: dict, layers: int):
    """:func:`glm_config` with the ChatGLM checkpoints' settings (``CHATGLM3_6B`` or a smaller shape)."""
    return glm_config(
        shape,
        layers,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )


def random_model(config, dtype, device: str):
    """Random weights in ``dtype``, created on ``device`` (meta -> to_empty -> init there: no fp32 init pass and no
    CPU copy of a 6B model; every page touched, so the weights show in RSS)."""
    from transformers import GlmForCausalLM
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    torch.manual_seed(0)
    with torch.device("meta"):
        model = GlmForCausalLM(config).to(dtype)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(
                1.0 if "norm" in name else 0.0
            )
    model.model.rotary_emb = GlmRotaryEmbedding(config=config).to(
        device
    )  # inv_freq buffer (meta -> real), fp32
    return model


def quantized_random_model(config, method, method_cfg, cache: Path, build_device: str):
    """QLoRA's base the way the CLI loads one: a random bf16 checkpoint of the shape, saved once into ``cache``
    (built on ``build_device``), read back by ``from_pretrained`` with the method's ``quantization_config``
    (bitsandbytes nf4: CUDA only)."""
    from transformers import AutoModelForCausalLM

    if not (cache / "done").exists():
        shutil.rmtree(cache, ignore_errors=True)
        model = random_model(config, torch.bfloat16, build_device)
        model.save_pretrained(cache)
        del model
        if build_device == "cuda":
            torch.cuda.empty_cache()
        (cache / "done").write_text("ok\n")
    return AutoModelForCausalLM.from_pretrained(
        cache,
        quantization_config=method.quantization_config(method_cfg),
        dtype=torch.bfloat16,
        device_map={"": 0},
    )


def random_batch(
    batch: int, seq: int, prompt_len: int, high: int, device: str = "cpu"
) -> dict:
    """``batch`` rows of ``seq`` random token ids in [10, high) (fixed seed), the first ``prompt_len`` of each
    unsupervised (label -100) as an SFT prompt is."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, high, (batch, seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def train_steps(
    model,
    optimizer,
    batch: dict,
    steps: int,
    device: str,
    *,
    bf16: bool = True,
    loss_chunk_size: int = 0,
) -> tuple[list[float], list[float]]:
    """``steps`` optimizer steps on ``batch``: bf16 autocast (unless ``bf16=False``) and the chunked loss of
    ``train.loss_chunk_size`` (when set), as GlmTrainer applies them. (seconds per step, CUDA-synchronised;
    loss per step)."""
    from glm_experiments.recipe.losses import chunked_loss

    cuda = device == "cuda"
    times, losses = [], []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        chunked = (
            chunked_loss(model, loss_chunk_size)
            if loss_chunk_size
            else contextlib.nullcontext()
        )
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16), chunked:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.detach().float().item())
    return times, losses
