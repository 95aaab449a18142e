"""ChatGLM-6B (v1): THUDM's v1 layout, loaded into the project's ChatGLMv1ForCausalLM (models/chatglm/modeling.py)."""

from __future__ import annotations

from glm_experiments.models.family import Architecture, Family, register
from glm_experiments.models.glm.family import load_checkpoint_dir
from glm_experiments.models.chatglm.layout import V1
from glm_experiments.models.chatglm.tokenizer import chatglm_v1_tokenizer_from_dir


def _positions(model, input_ids, attention_mask):
    """2D positions computed from [gMASK]/<sop> in the ids, as the model itself does (needed by P-Tuning v2)."""
    from glm_experiments.models.chatglm.modeling import chatglm_v1_positions

    return chatglm_v1_positions(input_ids, attention_mask, model.config)[0]


CHATGLM_V1 = Architecture(
    "chatglm_v1",
    lora_targets=("query_key_value",),  # fused QKV, as THUDM's own LoRA examples target
    prefix_position_ids=_positions,
    no_soft_prompt_because=(
        "its positions and attention pattern are computed from the token ids ([gMASK]/<sop>), so a soft prompt"
        " cannot be put in front. Use method=ptuning (P-Tuning v2) instead."
    ),
)

FAMILY = register(Family("chatglm", load_checkpoint_dir, template="chatglm", architecture=CHATGLM_V1, layout=V1,
                         tokenizer=chatglm_v1_tokenizer_from_dir, name_pattern=r"chatglm-6b(?!\d)"))
