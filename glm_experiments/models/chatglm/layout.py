"""THUDM's v1 checkpoint layout (ChatGLM-6B: num_layers/inner_hidden_size/position_encoding_2d): keys loaded as
they are into ``ChatGLMv1ForCausalLM`` (models/chatglm/modeling.py)."""

from __future__ import annotations


import torch

from glm_experiments.models.layouts import Layout, _empty_model, is_v1_config


def _build_v1(cfg: dict, dtype: torch.dtype, attn_implementation: str | None):
    from glm_experiments.models.chatglm.modeling import ChatGLMv1Config, ChatGLMv1ForCausalLM

    config = ChatGLMv1Config.from_thudm(cfg)
    config.dtype = dtype
    model = _empty_model(ChatGLMv1ForCausalLM, config)
    known = {name for name, _ in model.named_parameters()}
    return model, lambda key, load: [(key, load())] if key in known else None, lambda k: k


V1 = Layout(
    "chatglm_v1",
    matches=is_v1_config,
    expects="ChatGLM-6B's v1 config keys (num_layers, inner_hidden_size, position_encoding_2d)",
    described_as="ChatGLM-6B (v1) keys (inner_hidden_size, position_encoding_2d): use family chatglm",
    check=lambda config_file, cfg: None,
    build=_build_v1,
    own_attention=True,
)
