"""Tests that can only run on a CUDA GPU (``pytest -m gpu``); skipped, with the reason, everywhere else.

On the GPU machine the packages it lacks (hydra-core, omegaconf, datasets, bitsandbytes, ...) come from the
carried wheels (scripts/fetch_gpu_wheels.sh), installed the way bench/gpu_check.py installs them.
bench/gpu_check.py runs this file as one of its cases.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers.common import ROOT, assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]

if torch.cuda.is_available():  # before anything imports the project (hydra, datasets, bitsandbytes)
    from gpu_check import ensure_packages

    ensure_packages("cuda")


def tiny_glm(vocab: int = 512, layers: int = 2):
    from transformers import GlmConfig, GlmForCausalLM

    torch.manual_seed(0)
    config = GlmConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, attention_bias=True,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    return GlmForCausalLM(config)


def batch(vocab: int = 512, bs: int = 4, seq: int = 64, device: str = "cuda") -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (bs, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 3] = -100
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def test_bf16_loss_close_to_fp32():
    """bf16 autocast (what the trainer runs on a bf16 GPU) gives the fp32 loss and gradients up to bf16 rounding,
    also through the chunked cross-entropy."""
    from glm_experiments.recipe.losses import chunked_loss

    model = tiny_glm().cuda()
    inputs = batch()
    fp32 = model(**inputs).loss
    fp32.backward()
    grad32 = model.model.layers[0].mlp.down_proj.weight.grad.clone()
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = model(**inputs).loss
    bf16.backward()
    grad16 = model.model.layers[0].mlp.down_proj.weight.grad.clone()
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16), chunked_loss(model, 16):
        chunked = model(**inputs).loss
    assert torch.isfinite(bf16) and torch.isfinite(chunked)
    assert abs(bf16.item() - fp32.item()) <= 1e-2 * abs(fp32.item()), (bf16.item(), fp32.item())
    assert abs(chunked.item() - bf16.item()) <= 1e-2 * abs(fp32.item()), (chunked.item(), bf16.item())
    assert_close(grad16, grad32, rel=5e-2, what="bf16 vs fp32 gradient")


def test_qlora_trains_and_reloads(tmp_path):
    """A real bitsandbytes nf4 base (from_pretrained with the method's quantization_config): LoRA on it trains
    (loss falls on a fixed batch), saves, and loads back onto a fresh 4-bit base with the same outputs."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (scripts/fetch_gpu_wheels.sh carries it)")
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from glm_experiments.methods import get_method
    from glm_experiments.models.quantization import bnb_config

    base_dir = tmp_path / "base"
    tiny_glm().to(torch.bfloat16).save_pretrained(base_dir)
    cfg = OmegaConf.create({"name": "qlora", "r": 8, "alpha": 32, "dropout": 0.0, "target_modules": [], "bias": "none"})
    method = get_method("qlora")

    def quantized_base():
        return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb_config("4bit"),
                                                    dtype=torch.bfloat16, device_map={"": 0})

    model = method.apply(quantized_base(), cfg)
    assert any("4bit" in type(m).__name__ for m in model.modules()), "no bitsandbytes 4-bit layer in the model"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch()
    losses = []
    model.train()
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses

    def logits(m):  # bf16 matmuls as in training; the trained model's norms/head are fp32 (k-bit preparation)
        m.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return m(input_ids=inputs["input_ids"]).logits.float()

    trained = logits(model)
    method.save(model, tmp_path / "adapter", cfg)
    fresh = quantized_base()
    untouched = logits(fresh)
    again = logits(method.load(fresh, tmp_path / "adapter", cfg))
    assert_close(again, trained, rel=2e-2, what="reloaded QLoRA logits")
    assert (untouched - trained).norm() > 3 * (again - trained).norm(), "the adapter changed nothing"


def test_greedy_generation_gpu_equals_cpu():
    """The project's batched greedy generation (left padding, length-sorted batches) gives the same replies on
    the GPU as on the CPU, for the pre-trained tiny model in fp32."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glm_experiments.config.schema import TinyModelConfig
    from glm_experiments.data.templates import get_template
    from glm_experiments.models.tiny.build import ensure_tiny_checkpoint
    from glm_experiments.recipe.evaluation import generate, load_eval_set

    path = ensure_tiny_checkpoint(TinyModelConfig())
    tokenizer = AutoTokenizer.from_pretrained(path)
    template = get_template("chatglm3")
    eval_set = load_eval_set(str(ROOT / "data" / "adgen_demo" / "dev.json"), "adgen", tokenizer, template, 64, 16)
    eval_cfg = OmegaConf.create({"max_new_tokens": 24, "do_sample": False, "num_beams": 1, "batch_size": 8})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    on_cpu = generate(model, tokenizer, template, eval_set.prompts, eval_cfg, show_progress=False)
    on_gpu = generate(model.cuda(), tokenizer, template, eval_set.prompts, eval_cfg, show_progress=False)
    same = sum(a == b for a, b in zip(on_cpu, on_gpu))
    assert same == len(on_cpu), [(a, b) for a, b in zip(on_cpu, on_gpu) if a != b][:3]


def test_cli_logs_cuda_memory(tmp_path):
    """A short ``python -m glm_experiments`` run on the GPU trains in bf16 and logs perf/cuda_max_allocated_mib
    and perf/cuda_max_reserved_mib (recorded through bench/gpu_check.py's --cli-child: tracking=none logs nowhere)."""
    metrics_file = tmp_path / "metrics.jsonl"
    overrides = ["tracking=none", f"hydra.run.dir={tmp_path / 'run'}", "train.max_steps=5", "train.save_steps=0",
                 "train.logging_steps=1", "eval.before_training=false", "eval.max_samples=8", "data.metrics=[accuracy]"]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cli-child", str(metrics_file), "--",
                           *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    args = next(r["training_arguments"] for r in rows if "training_arguments" in r)
    assert args["bf16"] and not args["use_cpu"], args
    final = [r for r in rows if "perf/train_seconds" in r]
    assert final, "no final perf/* metrics logged"
    allocated, reserved = final[-1].get("perf/cuda_max_allocated_mib"), final[-1].get("perf/cuda_max_reserved_mib")
    assert allocated and allocated > 0 and reserved >= allocated, final[-1]
    assert any("perf/cuda_max_allocated_mib" in r for r in rows if "train/loss" in r), "no CUDA memory at logging steps"
