"""GLM-4's tokenizer (``tokenizer.model``: tiktoken, ``base64(token) rank`` per line) as a fast byte-level BPE
tokenizer with GLM-4's split regex and its specials after the ranks (see tokenizers.py for the ids)."""

from __future__ import annotations

import base64
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from glm_experiments.models.tokenizers import TokenizerError, tokenizer_model_file, wrap_fast

GLM4_SPECIALS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
]  # fmt: skip
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _bytes_to_unicode() -> dict[int, str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise TokenizerError(f"{path}:{lineno}: expected 'base64-token rank'") from None
    return ranks


def _tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """tiktoken merges any adjacent pair whose concatenation is a token, lowest rank first: every split of a
    token into two tokens is a merge, ranked by the token it makes."""
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def glm4_tokenizer(model_file: str | os.PathLike) -> PreTrainedTokenizerFast:
    """GLM-4 tokenizer from its tiktoken ``tokenizer.model``."""
    ranks = read_tiktoken_ranks(model_file)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{model_file}: tiktoken ranks are not 0..{len(ranks) - 1}")
    table = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in _tiktoken_merges(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    n = len(ranks)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM4_SPECIALS])
    for k, t in enumerate(GLM4_SPECIALS):
        if tok.token_to_id(t) != n + k:
            raise TokenizerError(f"{model_file}: special token {t!r} got id {tok.token_to_id(t)}, expected {n + k}")
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A",
        pair="[gMASK] <sop> $A $B",
        special_tokens=[("[gMASK]", n + 2), ("<sop>", n + 4)],
    )
    return wrap_fast(tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", mask_token="[MASK]")


# ----------------------------------------------------------------------------------------------- entry point


def glm4_tokenizer_from_dir(directory: str | os.PathLike) -> PreTrainedTokenizerFast:
    """GLM-4's tokenizer from a checkpoint directory (tiktoken tokenizer.model)."""
    return glm4_tokenizer(tokenizer_model_file(directory, "glm4", "tiktoken"))
