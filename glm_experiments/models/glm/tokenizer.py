"""ChatGLM2-6B's / ChatGLM3-6B's tokenizer rebuilt from THUDM's SentencePiece tokenizer.model (see models/tokenizers.py for what is kept equal to the original)."""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import (
    AddedToken,
    processors,
)
from transformers import PreTrainedTokenizerFast

from glm_experiments.models.tokenizers import TokenizerError, load_sp_proto, sp_backend, tokenizer_model_file, wrap_fast


CHATGLM2_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
# tokens that would be matched inside ordinary text if they were added tokens: keep them vocabulary-only
_BARE_WORD_SPECIALS = {"sop", "eop"}


def chatglm2_tokenizer(model_file: str | os.PathLike) -> PreTrainedTokenizerFast:
    """ChatGLM2-6B / ChatGLM3-6B tokenizer from the SentencePiece ``tokenizer.model``."""
    proto = load_sp_proto(Path(model_file))
    sp_size = len(proto.pieces)
    tok = sp_backend(proto, appended=CHATGLM2_SPECIALS)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in CHATGLM2_SPECIALS if t not in _BARE_WORD_SPECIALS]
    )
    ids = {t: sp_size + k for k, t in enumerate(CHATGLM2_SPECIALS)}
    for t, i in ids.items():
        if tok.token_to_id(t) != i:
            raise TokenizerError(f"{model_file}: special token {t!r} would get id {tok.token_to_id(t)}, expected {i}")
    gmask, sop = ("[gMASK]", ids["[gMASK]"]), ("sop", ids["sop"])
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] sop $A", pair="[gMASK] sop $A $B", special_tokens=[gmask, sop]
    )
    piece = {i: p.piece for i, p in enumerate(proto.pieces)}
    t = proto.trainer_spec
    return wrap_fast(
        tok,
        unk_token=piece.get(t.unk_id, "<unk>"),
        bos_token=piece.get(t.bos_id, "<s>") if t.bos_id >= 0 else None,
        eos_token=piece.get(t.eos_id, "</s>") if t.eos_id >= 0 else None,
        pad_token=piece.get(t.unk_id, "<unk>"),  # ChatGLM2/3 pad with id 0
        mask_token="[MASK]",
    )


def chatglm2_tokenizer_from_dir(directory: str | os.PathLike, family: str = "chatglm2") -> PreTrainedTokenizerFast:
    """ChatGLM2-6B's / ChatGLM3-6B's tokenizer from a checkpoint directory (SentencePiece tokenizer.model)."""
    return chatglm2_tokenizer(tokenizer_model_file(directory, family, "sentencepiece"))
