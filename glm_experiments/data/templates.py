"""Prompt templates and loss masks of each ChatGLM family, exactly as the official fine-tuning code builds them.

A sample is a list of messages ``{"role", "content", "metadata"?, "loss"?}`` (see data/formats.py).
Each template turns it into ``input_ids`` and position-aligned ``labels`` (-100 = no loss; the model
shifts labels itself), split at the point where generation starts so that max_source_length and
max_target_length can be applied separately.
"""

from __future__ import annotations

from dataclasses import dataclass

from glm_experiments.constants import IGNORE_INDEX
from glm_experiments.errors import SettingError


@dataclass
class Encoded:
    """Token ids and labels of one sample; ``source_len`` tokens form the prompt of the last reply."""

    input_ids: list[int]
    labels: list[int]
    source_len: int
    # tokens at the start of the source that truncation must keep (e.g. [gMASK], sop)
    head_len: int = 0


def _special(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise SettingError(f"tokenizer has no special token {token!r}; wrong template for this model?")
    return token_id


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


class ChatGLM3Template:
    """ChatGLM3-6B and GLM-4: ``[gMASK] sop`` then ``<|role|> metadata\\n content`` per message, then eos.

    Loss masks are shifted right by one (finetune_hf.py): assistant content and the token after the
    turn (next role token or eos) are targets, the ``<|assistant|>`` token is not.
    """

    roles = ("system", "user", "assistant", "observation")
    has_system_role = True
    # generation starts right after <|assistant|>: a metadata line (empty for plain replies) comes first
    reply_starts_with_metadata_line = True

    def __init__(self, name: str = "chatglm3", sop: str = "sop"):
        self.name, self.sop = name, sop  # GLM-4 spells it "<sop>"

    def prefix(self, tokenizer) -> list[int]:
        return [_special(tokenizer, "[gMASK]"), _special(tokenizer, self.sop)]

    def message_ids(self, tokenizer, role: str, content: str, metadata: str = "") -> list[int]:
        return [_special(tokenizer, f"<|{role}|>")] + _encode(tokenizer, f"{metadata}\n") + _encode(tokenizer, content)

    def stop_ids(self, tokenizer) -> list[int]:
        return [tokenizer.eos_token_id, _special(tokenizer, "<|user|>"), _special(tokenizer, "<|observation|>")]

    def generation_bos(self, tokenizer) -> int | None:
        return None

    def encode(self, tokenizer, messages: list[dict]) -> Encoded:
        ids = self.prefix(tokenizer)
        mask = [False] * len(ids)
        source_len = 0
        for message in messages:
            role = message["role"]
            if role == "assistant" and message is messages[-1]:
                source_len = len(ids) + 1  # the prompt ends with the <|assistant|> cue
            piece = self.message_ids(tokenizer, role, message["content"], message.get("metadata") or "")
            ids += piece
            mask += [bool(message.get("loss", role == "assistant"))] * len(piece)
        ids.append(tokenizer.eos_token_id)
        mask.append(False)
        labels = [IGNORE_INDEX] + [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[:-1])]
        return Encoded(ids, labels, source_len or len(ids), head_len=2)

    def prompt(self, tokenizer, messages: list[dict]) -> list[int]:
        """Ids to generate the reply to ``messages`` (which end with a user/observation turn)."""
        ids = self.prefix(tokenizer)
        for message in messages:
            ids += self.message_ids(tokenizer, message["role"], message["content"], message.get("metadata") or "")
        return ids + [_special(tokenizer, "<|assistant|>")]

    def clean_response(self, text: str) -> str:
        # generation starts right after <|assistant|>: a metadata line (empty for plain replies) comes first
        return text.split("\n", 1)[1].strip() if "\n" in text else text.strip()


def _round_pairs(messages: list[dict]) -> tuple[list[tuple[str, str]], str, str | None]:
    """(history pairs, last query, last reply or None) for the round-based v1/v2 templates."""
    turns = [m for m in messages if m["role"] in ("user", "assistant")]
    pairs, query = [], None
    for message in turns:
        if message["role"] == "user":
            if query is not None:
                raise ValueError("two user turns in a row")
            query = message["content"]
        else:
            if query is None:
                raise ValueError("assistant turn without a user turn before it")
            pairs.append((query, message["content"]))
            query = None
    if query is not None:
        return pairs, query, None
    if not pairs:
        raise ValueError("conversation has no user turn")
    last_q, last_r = pairs.pop()
    return pairs, last_q, last_r


class _RoundsTemplate:
    """ChatGLM-6B's and ChatGLM2-6B's plain-text rounds "[Round i]" + 问/答 (no roles, no system prompt)."""

    has_system_role = False
    reply_starts_with_metadata_line = False
    first_round = 0
    newline = "\n"  # between the parts of a round: ChatGLM2 doubles it

    def _prompt_text(self, history, query) -> str:
        n, i0 = self.newline, self.first_round
        text = "".join(f"[Round {i + i0}]{n}问：{q}{n}答：{r}{n}" for i, (q, r) in enumerate(history))
        return text + f"[Round {len(history) + i0}]{n}问：{query}{n}答："

    def clean_response(self, text: str) -> str:
        return text.strip()


class ChatGLM2Template(_RoundsTemplate):
    """ChatGLM2-6B: ``[gMASK] sop`` + "[Round i]\\n\\n问：q\\n\\n答：" prompt + answer + eos; loss on the answer."""

    name = "chatglm2"
    first_round = 1
    newline = "\n\n"

    def stop_ids(self, tokenizer) -> list[int]:
        return [tokenizer.eos_token_id]

    def prefix(self, tokenizer) -> list[int]:
        # kept when a long prompt is cut from the left, as encode()'s head_len=2 keeps it for training
        return [_special(tokenizer, "[gMASK]"), _special(tokenizer, "sop")]

    def generation_bos(self, tokenizer) -> int | None:
        return None

    def prompt(self, tokenizer, messages: list[dict]) -> list[int]:
        history, query, _ = _round_pairs(messages + [{"role": "assistant", "content": ""}])
        return self.prefix(tokenizer) + _encode(tokenizer, self._prompt_text(history, query))

    def encode(self, tokenizer, messages: list[dict]) -> Encoded:
        history, query, reply = _round_pairs(messages)
        source = self.prefix(tokenizer) + _encode(tokenizer, self._prompt_text(history, query))
        target = _encode(tokenizer, reply or "") + [tokenizer.eos_token_id]
        return Encoded(source + target, [IGNORE_INDEX] * len(source) + target, len(source), head_len=2)


class ChatGLMTemplate(_RoundsTemplate):
    """ChatGLM-6B (v1): "[Round i]\\n问：q\\n答：" prompt + [gMASK] <sop> + answer + <eop>; labels from <sop> on."""

    name = "chatglm"

    def stop_ids(self, tokenizer) -> list[int]:
        return [_special(tokenizer, "<eop>")]

    def prefix(self, tokenizer) -> list[int]:
        return []  # [gMASK] <sop> end the prompt: nothing at its start must survive truncation

    def generation_bos(self, tokenizer) -> int | None:
        return _special(tokenizer, "<sop>")  # THUDM's generation_config.json names <sop> as bos

    def prompt(self, tokenizer, messages: list[dict]) -> list[int]:
        history, query, _ = _round_pairs(messages + [{"role": "assistant", "content": ""}])
        return _encode(tokenizer, self._prompt_text(history, query)) + [_special(tokenizer, "[gMASK]"), _special(tokenizer, "<sop>")]

    def encode(self, tokenizer, messages: list[dict]) -> Encoded:
        history, query, reply = _round_pairs(messages)
        context = _encode(tokenizer, self._prompt_text(history, query)) + [_special(tokenizer, "[gMASK]")]
        target = [_special(tokenizer, "<sop>")] + _encode(tokenizer, reply or "") + [_special(tokenizer, "<eop>")]
        # the source ends with <sop>, which starts generation; it is also the first label (as in ptuning/main.py)
        return Encoded(context + target, [IGNORE_INDEX] * len(context) + target, len(context) + 1, head_len=0)


TEMPLATES = {
    "chatglm": ChatGLMTemplate(),
    "chatglm2": ChatGLM2Template(),
    "chatglm3": ChatGLM3Template("chatglm3", sop="sop"),
    "glm4": ChatGLM3Template("glm4", sop="<sop>"),
}


def get_template(name: str):
    try:
        return TEMPLATES[name]
    except KeyError:
        raise SettingError(f"unknown template {name!r}; known: {sorted(TEMPLATES)}") from None


def truncate(encoded: Encoded, max_source_length: int, max_target_length: int) -> tuple[list[int], list[int], bool]:
    """Cut the source from the left (after its head: the answer cue at its end survives) and the
    target from the right (its final stop token survives). Returns (ids, labels, truncated?)."""
    ids, labels, split, head = encoded.input_ids, encoded.labels, encoded.source_len, encoded.head_len
    src_ids, src_labels = ids[:split], labels[:split]
    tgt_ids, tgt_labels = ids[split:], labels[split:]
    truncated = False
    if len(src_ids) > max_source_length:
        keep = max_source_length - head
        src_ids = src_ids[:head] + src_ids[len(src_ids) - keep :]
        src_labels = src_labels[:head] + src_labels[len(src_labels) - keep :]
        truncated = True
    if len(tgt_ids) > max_target_length:
        tgt_ids = tgt_ids[: max_target_length - 1] + tgt_ids[-1:]
        tgt_labels = tgt_labels[: max_target_length - 1] + tgt_labels[-1:]
        truncated = True
    return src_ids + tgt_ids, src_labels + tgt_labels, truncated
