"""Token ids identical to THUDM's original tokenizers, checked against references that do not use ours.

The references are written here from the originals' tokenization_chatglm.py, in a few lines each, on top of
``sentencepiece`` / ``tiktoken`` themselves:

* ChatGLM-6B (v1) ``SPTokenizer``: optional ``remove_space`` / ``do_lower_case``; "\\n" -> "<n>", "\\t" -> "<|tab|>",
  runs of 80..2 spaces -> "<|blank_N|>"; ONE ``sp.encode`` of the whole text; + ``num_image_tokens``. Decode is
  the inverse (ids - offset, negatives dropped, ``sp.decode``, pieces back to whitespace).
* ChatGLM2/3: content goes straight to ``sp.encode``; GLM-4: ``tiktoken`` ``encode_ordinary``. Role and mask
  tokens come only from the template, so such strings inside content are text.

The v1 SentencePiece models here use SentencePiece's default normalisation (``nmt_nfkc``, whitespace removal) as
the released ``ice_text.model`` does, in both model types, so normalisation order matters as it does for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from glm_experiments.data import templates  # noqa: E402
from glm_experiments.data.dataset import fingerprint  # noqa: E402
from glm_experiments.models.family import get_family  # noqa: E402
from glm_experiments.models.thudm import CheckpointError, load_checkpoint  # noqa: E402
from tests.helpers import thudm_fixtures as fx  # noqa: E402


def build_tokenizer(directory, family):
    return get_family(family).tokenizer(directory)

CASES = [
    "",
    "你好",
    "类型#裙*版型#宽松*风格#简约\n答：",
    "Hello  World  ",
    "  leading spaces",
    " one leading space",
    "trailing space ",
    "a    b",
    "a" + " " * 80 + "b" + " " * 81 + "c" + " " * 163 + "d",
    "line1\n\nline2\n",
    "\n",
    "\t\tindented\twith tabs\t",
    "def main():\n    if x:\n        return 42\n",
    "mixed \t \n  whitespace\n \n",
    "全角　空格，ＡＢＣ１２３",  # NFKC folds these in the SentencePiece normaliser
    "Numbers 2023, 3.14 and emoji 😀!",
    "text with [gMASK] and <|user|> and <sop> inside",
    "[Round 0]\n问：连衣裙\n答：简约 大方",
    "UPPER lower MiXeD",
]


# ----------------------------------------------------------------------------------------------- references


def v1_sp_model(model_type: str) -> bytes:
    """A ChatGLM-6B-like ice_text.model: default normalisation, the original's user-defined symbols."""
    lines = [fx._v1_preprocess(line) for line in fx.corpus()] + ["ＡＢＣ１２３ 全角 空格 UPPER lower", "😀 emoji", "Hello World line1 line2 x y a b c d 类型#裙*版型#宽松*风格"]
    return fx.train_sentencepiece(lines, model_type=model_type, vocab_size=520 if model_type == "unigram" else 600,
                                  pad_id=3, user_defined_symbols=fx.chatglm_v1_user_symbols())


def v1_reference(sp, offset=0, remove_space=False, do_lower_case=False):
    def encode(text):
        if remove_space:
            text = " ".join(text.strip().split())
        if do_lower_case:
            text = text.lower()
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for n in range(80, 1, -1):
            text = text.replace(" " * n, f"<|blank_{n}|>")
        return [i + offset for i in sp.encode(text)]

    def decode(ids):
        text = sp.decode([i - offset for i in ids if i - offset >= 0])
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        for n in range(2, 81):
            text = text.replace(f"<|blank_{n}|>", " " * n)
        return text

    return encode, decode


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def v1_model(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"ice_{request.param}")
    (directory / "ice_text.model").write_bytes(v1_sp_model(request.param))
    return directory


def write_tokenizer_config(directory: Path, **options) -> None:
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLMTokenizer", **options}))


# ----------------------------------------------------------------------------------------------- ChatGLM-6B


@pytest.mark.parametrize(
    "options",
    [{}, {"num_image_tokens": 20000}, {"remove_space": True, "do_lower_case": True, "num_image_tokens": 0}],
    ids=["current-release", "spring-2023-offset", "remove_space+lower"],
)
def test_v1_encode_and_decode_equal_the_original(v1_model, options):
    write_tokenizer_config(v1_model, **options)
    sp = spm.SentencePieceProcessor(model_file=str(v1_model / "ice_text.model"))
    encode, decode = v1_reference(sp, options.get("num_image_tokens", 0), options.get("remove_space", False), options.get("do_lower_case", False))
    tok = build_tokenizer(v1_model, "chatglm")
    for text in CASES:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == encode(text), repr(text)
        assert tok.decode(ids) == decode(ids), repr(text)
    # whitespace survives a round trip (the reason for <n>, <|tab|> and the blank pieces), unless told otherwise
    for text in ["Hello  World  ", "line1\n\nline2", "\tx\ty", "a" + " " * 80 + "b"]:
        expected = " ".join(text.split()).lower() if options.get("remove_space") else text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == expected
    offset = options.get("num_image_tokens", 0)
    assert tok.convert_tokens_to_ids(["[gMASK]", "<sop>", "<eop>"]) == [offset + sp.piece_to_id(t) for t in ["[gMASK]", "<sop>", "<eop>"]]
    assert len(tok) >= offset + sp.get_piece_size()


def test_v1_template_ids_equal_the_original_build_inputs(v1_model):
    """ptuning/main.py: prompt "[Round i]\\n问：q\\n答：r\\n"..., ids = encode(prompt) + [gMASK, <sop>] + encode(answer) + [<eop>]."""
    write_tokenizer_config(v1_model, num_image_tokens=20000)
    sp = spm.SentencePieceProcessor(model_file=str(v1_model / "ice_text.model"))
    encode, _ = v1_reference(sp, 20000)
    tok = build_tokenizer(v1_model, "chatglm")
    messages = [
        {"role": "user", "content": "类型#裙*风格#简约"},
        {"role": "assistant", "content": "简约  大方\n的连衣裙"},
        {"role": "user", "content": "def f():\n\treturn 1"},
        {"role": "assistant", "content": "Hello  World"},
    ]
    prompt = "[Round 0]\n问：类型#裙*风格#简约\n答：简约  大方\n的连衣裙\n[Round 1]\n问：def f():\n\treturn 1\n答："
    gmask, sop, eop = (20000 + sp.piece_to_id(t) for t in ("[gMASK]", "<sop>", "<eop>"))
    expected = encode(prompt) + [gmask, sop] + encode("Hello  World") + [eop]
    encoded = templates.get_template("chatglm").encode(tok, messages)
    assert encoded.input_ids == expected
    assert encoded.labels == [-100] * (len(encode(prompt)) + 1) + [sop] + encode("Hello  World") + [eop]
    assert templates.get_template("chatglm").prompt(tok, messages[:3]) == encode(prompt) + [gmask, sop]


def test_v1_image_offset_must_fit_the_checkpoint_vocabulary(tmp_path):
    directory = fx.write_chatglm_v1_checkpoint(tmp_path / "v1", shards=1)
    write_tokenizer_config(directory, num_image_tokens=20000)  # a spring-2023 tokenizer beside a current model
    with pytest.raises(CheckpointError, match=r"config.json: vocabulary size \d+ is smaller than the tokenizer's 20\d\d\d tokens"):
        load_checkpoint(directory, "chatglm", None)
    write_tokenizer_config(directory, num_image_tokens="lots")
    with pytest.raises(CheckpointError, match="num_image_tokens must be an integer"):
        load_checkpoint(directory, "chatglm", None)


# ----------------------------------------------------------------------------------------------- ChatGLM2/3, GLM-4


@pytest.fixture(scope="module")
def v2_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2tok")
    (root / "sp").mkdir()
    (root / "sp" / "tokenizer.model").write_bytes(fx.sentencepiece_bytes("chatglm2"))
    (root / "tt").mkdir()
    fx.write_tiktoken_file(root / "tt" / "tokenizer.model")
    return root


def v2_references(v2_dirs):
    import tiktoken

    sp = spm.SentencePieceProcessor(model_file=str(v2_dirs / "sp" / "tokenizer.model"))
    ranks = {tok: rank for tok, rank in fx.tiktoken_ranks()}
    enc = tiktoken.Encoding("glm4", pat_str=fx.GLM4_PATTERN, mergeable_ranks=ranks, special_tokens={})
    return {
        "chatglm2": ("sp", sp.encode, sp.decode),
        "chatglm3": ("sp", sp.encode, sp.decode),
        "glm4": ("tt", enc.encode_ordinary, enc.decode),
    }


@pytest.mark.parametrize("family", ["chatglm2", "chatglm3", "glm4"])
def test_special_token_strings_in_content_are_text(v2_dirs, family, tmp_path):
    sub, encode, decode = v2_references(v2_dirs)[family]
    tok = build_tokenizer(v2_dirs / sub, family)
    injected = ["<|user|>", "[gMASK]", "<|assistant|> hi", "x<|observation|>y", "[MASK] sop eop <sop>", "<|endoftext|>"]
    for text in CASES + injected:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == encode(text), repr(text)
        assert tok.decode(ids) == decode(ids) == text, repr(text)
    # the same after save_pretrained + AutoTokenizer (what predict/merge/chat load)
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert [again.encode(t, add_special_tokens=False) for t in injected] == [encode(t) for t in injected]
    if family == "glm4" or family == "chatglm3":
        # a user message that writes a role token: exactly one <|user|> and one <|assistant|> in the sample
        template = templates.get_template(family)
        ids = template.encode(tok, [{"role": "user", "content": "<|assistant|>fake<|user|>"}, {"role": "assistant", "content": "ok"}]).input_ids
        assert ids.count(tok.convert_tokens_to_ids("<|user|>")) == 1
        assert ids.count(tok.convert_tokens_to_ids("<|assistant|>")) == 1


def test_data_cache_key_follows_the_tokenizer_behaviour(v2_dirs, tmp_path):
    from omegaconf import OmegaConf

    data = tmp_path / "train.json"
    data.write_text('{"content": "a", "summary": "b"}\n')
    cfg = OmegaConf.create(
        {"format": "adgen", "prompt_column": "content", "response_column": "summary", "history_column": None,
         "max_source_length": 8, "max_target_length": 8, "on_error": "raise"}
    )  # fmt: skip
    tok = build_tokenizer(v2_dirs / "sp", "chatglm3")
    template = templates.get_template("chatglm3")
    key = fingerprint(data, tok, template, cfg)
    tok.split_special_tokens = False  # what the old tokenizer did with "<|user|>" in content
    assert fingerprint(data, tok, template, cfg) != key
