"""ChatGLM-6B's tokenizer rebuilt from THUDM's ice_text.model + tokenizer_config.json (see models/tokenizers.py for what is kept equal to the original)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    normalizers,
    processors,
)
from transformers import PreTrainedTokenizerFast

from glm_experiments.models.tokenizers import TokenizerError, load_sp_proto, sp_backend, wrap_fast


CHATGLM_V1_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
CHATGLM_V1_MAX_BLANK = 80


def chatglm_v1_tokenizer(
    model_file: str | os.PathLike, num_image_tokens: int = 0, remove_space: bool = False, do_lower_case: bool = False
) -> PreTrainedTokenizerFast:
    """ChatGLM-6B tokenizer from ``ice_text.model`` (specials are pieces of the model itself).

    The keyword arguments are the original's ``tokenizer_config.json`` keys: ``num_image_tokens`` ids come before
    the pieces (20000 in the spring-2023 release, 0 today), ``remove_space`` squeezes whitespace runs and strips
    the text, ``do_lower_case`` lower-cases it, both before the whitespace pieces are substituted.
    """
    proto = load_sp_proto(Path(model_file))
    if num_image_tokens < 0:
        raise TokenizerError(f"{model_file}: num_image_tokens must be >= 0, got {num_image_tokens}")
    pieces = {p.piece: i for i, p in enumerate(proto.pieces)}
    missing = [t for t in ["[MASK]", "[gMASK]", "<sop>", "<eop>", "<n>"] if t not in pieces]
    if missing:
        raise TokenizerError(f"{model_file}: not a ChatGLM-6B ice_text.model: pieces {missing} are missing")
    index = {t: num_image_tokens + i for t, i in pieces.items()}
    replacements = [("\n", "<n>"), ("\t", "<|tab|>")]
    replacements += [(" " * n, f"<|blank_{n}|>") for n in range(CHATGLM_V1_MAX_BLANK, 1, -1)]
    atomic = [dst for _, dst in replacements if dst in index] + [t for t in CHATGLM_V1_SPECIALS if t in index]
    preprocess = []
    if remove_space:  # the original: " ".join(text.strip().split())
        preprocess += [normalizers.Strip(), normalizers.Replace(Regex(r"\s+"), " ")]
    if do_lower_case:
        preprocess.append(normalizers.Lowercase())
    tok = sp_backend(
        proto,
        replacements=replacements,
        atomic=atomic,
        prepended=[f"<image_{k}>" for k in range(num_image_tokens)],  # the original's names for these ids
        preprocess=preprocess,
    )
    specials = [t for t in CHATGLM_V1_SPECIALS if t in index]
    pad = "<pad>" if "<pad>" in index else proto.pieces[proto.trainer_spec.unk_id].piece
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + [pad]])
    tok.post_processor = processors.TemplateProcessing(
        single="$A [gMASK] <sop>",
        pair="$A [gMASK] <sop> $B <eop>",
        special_tokens=[(t, index[t]) for t in ("[gMASK]", "<sop>", "<eop>")],
    )
    return wrap_fast(
        tok,
        unk_token=proto.pieces[proto.trainer_spec.unk_id].piece,
        bos_token="<sop>",
        eos_token="<eop>",
        pad_token=pad,
        mask_token="[MASK]",
    )


# ----------------------------------------------------------------------------------------------- tiktoken


def _v1_options(directory: Path) -> dict:
    """ChatGLM-6B's tokenizer options from its ``tokenizer_config.json`` (the original's defaults when absent)."""
    path = directory / "tokenizer_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: not valid JSON ({err})") from None
    options = {"num_image_tokens": cfg.get("num_image_tokens", 0)}
    options["remove_space"] = cfg.get("remove_space", False)
    options["do_lower_case"] = cfg.get("do_lower_case", False)
    if not isinstance(options["num_image_tokens"], int) or isinstance(options["num_image_tokens"], bool):
        raise TokenizerError(f"{path}: num_image_tokens must be an integer, got {options['num_image_tokens']!r}")
    return options


def chatglm_v1_tokenizer_from_dir(directory: str | os.PathLike) -> PreTrainedTokenizerFast:
    """ChatGLM-6B's tokenizer from a checkpoint directory (ice_text.model + tokenizer_config.json)."""
    directory = Path(directory)
    path = directory / "ice_text.model"
    if not path.is_file():
        if (directory / "tokenizer.model").is_file():
            raise TokenizerError(
                f"{directory}: has tokenizer.model but no ice_text.model: not a ChatGLM-6B (v1) checkpoint;"
                " use family chatglm2/chatglm3/glm4"
            )
        raise TokenizerError(f"{directory}: ice_text.model not found (ChatGLM-6B tokenizer)")
    return chatglm_v1_tokenizer(path, **_v1_options(directory))
