"""ChatGLM-6B (v1): THUDM's v1 layout, loaded into the project's ChatGLMv1ForCausalLM (models/chatglm_v1.py)."""

from __future__ import annotations

from glm_experiments.models.families.base import Architecture, Family, register
from glm_experiments.models.families.glm import load_checkpoint_dir
from glm_experiments.models.thudm_layouts import V1
from glm_experiments.models.tokenizers import chatglm_v1_tokenizer_from_dir


def _positions(model, input_ids, attention_mask):
    """2D positions computed from [gMASK]/<sop> in the ids, as the model itself does (needed by P-Tuning v2)."""
    from glm_experiments.models.chatglm_v1 import chatglm_v1_positions

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
