"""bench/memory_trace.py: the traced bytes are the model's real bytes, and the knobs move the peak the right way."""

from __future__ import annotations

import pytest
import torch
from transformers import GlmConfig, GlmForCausalLM

from glm_experiments.methods import get_method
from glm_experiments.methods.full import FullMethodConfig
from glm_experiments.methods.lora import LoraMethodConfig

from memory_trace import MIB, trace_training_step  # bench/, on pytest's pythonpath


def config(vocab: int = 4096) -> GlmConfig:
    return GlmConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, max_position_embeddings=512, attention_bias=True,
                     tie_word_embeddings=False, pad_token_id=0,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})


def real_bytes(method_cfg) -> int:
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = GlmForCausalLM(config())
    finally:
        torch.set_default_dtype(torch.float32)
    model = get_method(method_cfg.name).apply(model, method_cfg)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


@pytest.mark.parametrize("method_cfg", [LoraMethodConfig(name="lora", r=4), FullMethodConfig(name="full")])
def test_traced_weights_are_the_real_bytes(method_cfg):
    traced = trace_training_step(config(), method_cfg, batch=2, source_len=8, target_len=8)
    # exact up to a few scalars the method and transformers keep alive (LoRA: 16 B with older transformers, 144 B
    # with 5.25), out of 1.2 MB
    assert abs(traced["weights_mib"] * MIB - real_bytes(method_cfg)) <= 256
    assert traced["peak_mib"] > traced["weights_mib"]


def test_knobs_lower_the_traced_peak():
    lora = LoraMethodConfig(name="lora", r=4)
    plain = trace_training_step(config(), lora, batch=4, source_len=32, target_len=96)["peak_mib"]
    checkpointed = trace_training_step(config(), lora, batch=4, source_len=32, target_len=96, gradient_checkpointing=True)
    chunked = trace_training_step(config(), lora, batch=4, source_len=32, target_len=96, loss_chunk_size=64)
    assert checkpointed["peak_mib"] < plain and chunked["peak_mib"] < plain
    # the full-vocabulary logits dominate this small model: chunking removes most of them (fp32 4 x 128 x 4096 = 8 MiB)
    assert plain - chunked["peak_mib"] > 4


def test_fake_trace_equals_the_count_of_a_real_run():
    """The same two fp32 training steps, on fake tensors and on real ones: the same peak (bench/run.py's memory_trace
    also compares it with the process's peak RSS: within 1 %)."""
    from memory_trace import training_steps

    lora = LoraMethodConfig(name="lora", r=4)
    fake = trace_training_step(config(), lora, batch=2, source_len=16, target_len=48, dtype=torch.float32)
    real = training_steps(config(), lora, batch=2, source_len=16, target_len=48, dtype=torch.float32)
    assert fake["peak_mib"] == pytest.approx(real["peak_mib"], abs=1e-3)
    assert fake["peak_mib"] > fake["weights_mib"] + 2 * 64 * 4096 * 4 / MIB  # the fp32 logits were counted
