"""The project's own small native GLM (GlmForCausalLM, ChatGLM3 block structure), pre-trained on the demo
corpus the first time it is needed (models/tiny/build.py): the CPU default of every study."""

from __future__ import annotations

from glm_experiments.models.family import Family, register
from glm_experiments.models.glm.family import GLM


def load(model_cfg, dtype, quantization_config):
    from omegaconf import DictConfig, OmegaConf
    from transformers import AutoTokenizer

    from glm_experiments.models.checkpoint_files import from_pretrained_strict
    from glm_experiments.models.tiny.build import ensure_tiny_checkpoint

    tiny_cfg = OmegaConf.to_object(model_cfg.tiny) if isinstance(model_cfg.tiny, DictConfig) else model_cfg.tiny
    path = ensure_tiny_checkpoint(tiny_cfg)
    model = from_pretrained_strict(
        path, dtype=dtype, attn_implementation=model_cfg.attn_implementation, quantization_config=quantization_config
    )
    return model, AutoTokenizer.from_pretrained(path)


FAMILY = register(Family("tiny", load, template="chatglm3", architecture=GLM))
