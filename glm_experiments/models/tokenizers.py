"""Fast (``tokenizers``-backed) tokenizers for the ChatGLM families, built from THUDM's tokenizer files.

No ``trust_remote_code``: the original SentencePiece / tiktoken files are converted into a
``PreTrainedTokenizerFast`` whose ``encode(text, add_special_tokens=False)`` gives the same ids as the
original tokenizer, and whose special tokens carry the names and ids of the originals:

* ChatGLM2-6B / ChatGLM3-6B (``tokenizer.model``, SentencePiece): the pieces keep their ids; appended after
  them, at ``sp_size + k``: [MASK], [gMASK], [sMASK], sop, eop, <|system|>, <|user|>, <|assistant|>,
  <|observation|> (real model: sp_size = 64789). unk/pad = 0 ("<unk>"), bos = 1 ("<s>"), eos = 2 ("</s>").
  "sop"/"eop" are plain vocabulary entries (not matched inside text: "isopropyl" must stay text); the
  bracketed ones are special tokens.
* ChatGLM-6B (``ice_text.model``, SentencePiece): the specials are pieces of the SentencePiece model itself,
  so, exactly as the original ``tokenization_chatglm.py`` does (``sp.PieceToId``), their ids are looked up in
  the model (real model: [MASK] 130000, [gMASK] 130001, <sop> 130004, <eop> 130005, <pad> 3). The original's
  text preprocessing is reproduced by the normalizer: "\\n" -> "<n>", "\\t" -> "<|tab|>", runs of 80..2
  spaces -> "<|blank_N|>" (longest first), and reversed by the decoder.
* GLM-4 (``tokenizer.model``, tiktoken: ``base64(token) rank`` per line): byte-level BPE with GLM-4's split
  regex; specials appended after the ranks in GLM-4's order (real: <|endoftext|> 151329, [gMASK] 151331,
  <sop> 151333, <|system|> 151335, <|user|> 151336, <|assistant|> 151337, <|observation|> 151338).

``add_special_tokens=True`` adds the family's prefix/suffix like the originals did
(v2/v3: ``[gMASK] sop`` + text; GLM-4: ``[gMASK] <sop>`` + text; v1: text + ``[gMASK] <sop>``).
Padding side is "left", as in all the originals.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
)
from transformers import PreTrainedTokenizerFast

from glm_experiments.errors import UserError

# SentencePiece ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# the score given to vocabulary entries a Unigram lattice must never choose (control, byte, appended specials)
_NEVER = -1e6


class TokenizerError(UserError, ValueError):
    """A tokenizer file that cannot be used for the requested family."""


# ----------------------------------------------------------------------------------------------- detection


def tokenizer_file_kind(path: str | os.PathLike) -> str:
    """"sentencepiece" (a ModelProto) or "tiktoken" (base64 + rank lines) for a ``tokenizer.model`` file."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(4096)
    first = head.split(b"\n", 1)[0].strip()
    parts = first.split()
    if len(parts) == 2 and parts[1].isdigit():
        try:
            base64.b64decode(parts[0], validate=True)
            return "tiktoken"
        except ValueError:
            pass
    proto = load_sp_proto(path, strict=False)
    if proto is not None and len(proto.pieces) > 0:
        return "sentencepiece"
    raise TokenizerError(f"{path}: neither a SentencePiece model nor a tiktoken rank file")


def load_sp_proto(path: Path, strict: bool = True):
    from sentencepiece import sentencepiece_model_pb2 as pb2

    proto = pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as err:  # protobuf raises DecodeError (not exported consistently)
        if strict:
            raise TokenizerError(f"{path}: not a SentencePiece model ({err})") from None
        return None
    return proto


# ----------------------------------------------------------------------------------------------- SentencePiece


def _bpe_merges(pieces) -> list[tuple[str, str]]:
    """Merges for a SentencePiece BPE model: a pair merges when its concatenation is a normal piece, the
    higher the piece's score the earlier (what SentencePiece's encoder does)."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == _NORMAL}
    merges = []
    for piece, (score, idx) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-score, idx, normal[left][1], normal[right][1], left, right))
    merges.sort()
    return [(m[4], m[5]) for m in merges]


def sp_backend(
    proto,
    appended: list[str] = (),
    replacements: list[tuple[str, str]] = (),
    atomic: list[str] = (),
    prepended: list[str] = (),
    preprocess: list = (),
) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` reproducing ``SentencePieceProcessor.encode`` of ``proto``.

    ``appended``: vocabulary entries added after the pieces (ids ``len(pieces) + k``), never produced from text.
    ``prepended``: vocabulary entries placed before the pieces, shifting every piece's id by their number
    (ChatGLM-6B's ``num_image_tokens``), never produced from text.
    ``preprocess``: normalizers applied to the raw text first (ChatGLM-6B's ``remove_space``/``do_lower_case``).
    ``replacements``: literal text replacements applied to the raw text before SentencePiece sees it (ChatGLM-6B's
    "<n>"), so before SentencePiece's own normalisation, as the original did.
    ``atomic``: pieces that must stay whole (besides the model's user-defined pieces).
    """
    pieces = list(proto.pieces)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    byte_fallback = bool(trainer.byte_fallback)
    user_defined = [p.piece for p in pieces if p.type == _USER_DEFINED]
    atomic = list(dict.fromkeys(list(user_defined) + [a for a in atomic if a]))
    offset = len(prepended)

    if trainer.model_type == 2:  # BPE
        vocab = {token: k for k, token in enumerate(prepended)}
        vocab.update({p.piece: offset + i for i, p in enumerate(pieces)})
        for k, token in enumerate(appended):
            vocab.setdefault(token, offset + len(pieces) + k)
        model = models.BPE(
            vocab=vocab,
            merges=_bpe_merges(pieces),
            unk_token=pieces[trainer.unk_id].piece,
            fuse_unk=True,
            byte_fallback=byte_fallback,
            ignore_merges=bool(atomic),  # a whole atomic piece is looked up directly
        )
    elif trainer.model_type == 1:  # Unigram
        vocab = [(token, _NEVER) for token in prepended]
        vocab += [
            (p.piece, p.score if p.type in (_NORMAL, _USER_DEFINED) else (0.0 if p.type == _UNKNOWN else _NEVER))
            for p in pieces
        ]
        vocab += [(token, _NEVER) for token in appended]
        model = models.Unigram(vocab, unk_id=offset + trainer.unk_id, byte_fallback=byte_fallback)
    else:
        raise TokenizerError(f"SentencePiece model type {trainer.model_type} is not supported (BPE and Unigram are)")
    tok = Tokenizer(model)

    # normalizer: the caller's text preprocessing, then SentencePiece's own steps, in its order
    steps = list(preprocess) + [normalizers.Replace(src, dst) for src, dst in replacements]
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)

    if atomic:  # user-defined pieces are never split or merged with their neighbours
        pattern = "|".join(_regex_escape(a) for a in sorted(atomic, key=len, reverse=True))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")

    # SentencePiece decodes the unknown piece to its surface (" ⁇ "), not to its name
    dec = [decoders.Replace(pieces[trainer.unk_id].piece, trainer.unk_surface), decoders.Replace("▁", " ")]
    if byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    dec += [decoders.Replace(dst, src) for src, dst in replacements]
    tok.decoder = decoders.Sequence(dec)
    return tok


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in r".^$*+?()[]{}|\/" else c for c in text)


def wrap_fast(tok: Tokenizer, **kwargs) -> PreTrainedTokenizerFast:
    kwargs.setdefault("padding_side", "left")
    kwargs.setdefault("clean_up_tokenization_spaces", False)
    # special tokens come from the templates (by id), never from text: "<|user|>" or "[gMASK]" written inside a
    # sample's content is ordinary text, as in the originals (ChatGLM-6B's own specials are SentencePiece
    # user-defined pieces: its backend still finds them, inside the one normalised string, like the original)
    kwargs.setdefault("split_special_tokens", True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def tokenizer_model_file(directory: str | os.PathLike, family: str, kind: str) -> Path:
    """``tokenizer.model`` of ``directory``, checked to be a ``kind`` ("sentencepiece"/"tiktoken") file."""
    directory = Path(directory)
    path = directory / "tokenizer.model"
    if not path.is_file():
        hint = " (found ice_text.model: a ChatGLM-6B checkpoint, use family chatglm)" if (directory / "ice_text.model").is_file() else ""
        raise TokenizerError(f"{path}: tokenizer file not found{hint}")
    found = tokenizer_file_kind(path)
    if found != kind:
        if found == "tiktoken":
            raise TokenizerError(f"{path}: is a tiktoken (GLM-4) file, but family {family} needs a SentencePiece model")
        raise TokenizerError(f"{path}: is a SentencePiece model, but family {family} needs GLM-4's tiktoken file")
    return path

