"""ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B: THUDM's v2 layout, loaded into transformers' native GlmForCausalLM.

Also home of ``GLM``, the record of that class, and ``load_checkpoint_dir``, the loader every THUDM family shares.
"""

from __future__ import annotations

from functools import partial

from glm_experiments.models.family import Architecture, Family, register
from glm_experiments.models.glm.layout import V2
from glm_experiments.models.glm.glm4_tokenizer import glm4_tokenizer_from_dir
from glm_experiments.models.glm.tokenizer import chatglm2_tokenizer_from_dir

GLM = Architecture("glm", lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"))


def load_checkpoint_dir(model_cfg, dtype, quantization_config):
    """A checkpoint directory of ``model_cfg.family``: THUDM's layout, or the same model in transformers' format."""
    from glm_experiments.models.loading import checkpoint_dir
    from glm_experiments.models.thudm import load_checkpoint

    checkpoint_dir(model_cfg)
    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    return load_checkpoint(model_cfg.path, model_cfg.family, dtype, cached=model_cfg.cache_conversion,
                           attn_implementation=model_cfg.attn_implementation, **extra)


CHATGLM2 = register(Family("chatglm2", load_checkpoint_dir, template="chatglm2", architecture=GLM, layout=V2,
                           tokenizer=partial(chatglm2_tokenizer_from_dir, family="chatglm2"), name_pattern=r"chatglm2",
                           shares_weights_with=("chatglm3",)))
CHATGLM3 = register(Family("chatglm3", load_checkpoint_dir, template="chatglm3", architecture=GLM, layout=V2,
                           tokenizer=partial(chatglm2_tokenizer_from_dir, family="chatglm3"), name_pattern=r"chatglm3",
                           shares_weights_with=("chatglm2",)))
GLM4 = register(Family("glm4", load_checkpoint_dir, template="glm4", architecture=GLM, layout=V2,
                       tokenizer=glm4_tokenizer_from_dir, name_pattern=r"glm-?4"))
