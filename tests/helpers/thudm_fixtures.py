"""Tiny checkpoints in THUDM's exact on-disk layout, written offline for the tests.

* ChatGLM2/3 and GLM-4: ``config.json`` with the real key names (model_type "chatglm") at tiny sizes, the real
  state-dict key names and shapes, saved as two ``pytorch_model-0000X-of-00002.bin`` shards plus
  ``pytorch_model.bin.index.json`` (or ``model-0000X-of-00002.safetensors`` + ``model.safetensors.index.json``,
  or one file).
* ChatGLM-6B (v1): its own config keys and state dict keys.
* Tokenizers: a SentencePiece BPE ``tokenizer.model`` (ChatGLM2/3 settings: byte fallback, dummy prefix, no
  whitespace removal, identity normalisation), a SentencePiece Unigram ``ice_text.model`` with ChatGLM-6B's
  specials and whitespace pieces as user-defined symbols, and a tiktoken rank file for GLM-4 (BPE merges
  learned here over GLM-4's split regex).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
from collections import Counter
from pathlib import Path

import torch

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, multi_query_group_num=2, kv_channels=16, ffn_hidden_size=96)

_ZH = "今天天气很好我们去公园散步吧这件连衣裙的版型宽松显瘦面料柔软舒适适合夏天穿着简约的设计搭配精致的细节让你轻松展现优雅气质"
_EN = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning ChatGLM with LoRA is cheap and fast.",
    "Hello world, this is a tiny corpus for tests.",
    "Numbers like 2023 and 3.14 appear here too.",
    "def main():\n    return 42",
]


def corpus() -> list[str]:
    """A few hundred deterministic Chinese/English lines (with newlines, spaces, digits, punctuation)."""
    lines = []
    for i in range(240):
        a = (i * 7) % (len(_ZH) - 12)
        zh = _ZH[a : a + 6 + i % 7]
        en = _EN[i % len(_EN)]
        lines.append(f"{zh}，{en} 问：{zh[:3]}？\n答：{zh[3:]}。 {i}")
        lines.append(f"[Round {i % 5}]\n\n问：{zh}\n\n答：{en}")
    return lines


def chatglm_v1_user_symbols() -> list[str]:
    return (
        ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>", "<n>", "<|tab|>"]
        + [f"<|blank_{n}|>" for n in range(2, 81)]
    )


def _v1_preprocess(text: str) -> str:
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(80, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


def train_sentencepiece(lines, **settings) -> bytes:
    """A SentencePiece model trained offline on ``lines``; ids 0-2 are unk, bos, eos as in every ChatGLM tokenizer."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, character_coverage=1.0,
                                   num_threads=1, minloglevel=2, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2,
                                   **settings)
    return out.getvalue()


@functools.lru_cache(maxsize=None)
def sentencepiece_bytes(kind: str) -> bytes:
    """A trained SentencePiece model: kind "chatglm2" (BPE, as ChatGLM2/3) or "chatglm" (Unigram, as ice_text)."""
    common = dict(add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity")
    if kind == "chatglm2":
        return train_sentencepiece(corpus(), model_type="bpe", vocab_size=700, byte_fallback=True, split_digits=True,
                                   pad_id=-1, **common)
    if kind == "chatglm":
        return train_sentencepiece([_v1_preprocess(line) for line in corpus()], model_type="unigram", vocab_size=500,
                                   byte_fallback=False, pad_id=3, user_defined_symbols=chatglm_v1_user_symbols(),
                                   **common)
    raise ValueError(kind)


GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@functools.lru_cache(maxsize=None)
def tiktoken_ranks(num_merges: int = 300) -> tuple[tuple[bytes, int], ...]:
    """A byte-level BPE learned on the corpus over GLM-4's split regex: 256 bytes, then merges in order."""
    import regex

    words = Counter()
    for line in corpus():
        for piece in regex.findall(GLM4_PATTERN, line):
            words[tuple(bytes([b]) for b in piece.encode("utf-8"))] += 1
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(num_merges):
        pairs = Counter()
        for word, freq in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += freq
        if not pairs:
            break
        (a, b), _count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        new = a + b
        if new in ranks:
            break
        ranks[new] = len(ranks)
        merged = Counter()
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged
    return tuple(ranks.items())


def write_tiktoken_file(path: Path) -> int:
    ranks = tiktoken_ranks()
    path.write_text("".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in ranks))
    return len(ranks)


def _pad_to(n: int, multiple: int = 64) -> int:
    return int(math.ceil(n / multiple) * multiple)


def _save_shards(directory: Path, state: dict[str, torch.Tensor], fmt: str = "bin", shards: int = 2) -> None:
    keys = list(state)
    if shards == 1:
        if fmt == "bin":
            torch.save(state, directory / "pytorch_model.bin")
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors", metadata={"format": "pt"})
        return
    per = math.ceil(len(keys) / shards)
    weight_map, total = {}, 0
    for s in range(shards):
        part = {k: state[k] for k in keys[s * per : (s + 1) * per]}
        if fmt == "bin":
            name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
            torch.save(part, directory / name)
        else:
            from safetensors.torch import save_file

            name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: v.contiguous() for k, v in part.items()}, directory / name, metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (directory / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _rand(gen, *shape, scale=0.2):
    return torch.randn(*shape, generator=gen) * scale


def chatglm2_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with ChatGLM2/3/GLM-4's key names and shapes (fp32)."""
    gen = torch.Generator().manual_seed(seed)
    h, d = cfg["hidden_size"], cfg["kv_channels"]
    heads, groups = cfg["num_attention_heads"], cfg["multi_query_group_num"]
    qkv = heads * d + 2 * groups * d
    ffn, vocab = cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    rope_dim = d // 2
    sd = {
        "transformer.embedding.word_embeddings.weight": _rand(gen, vocab, h, scale=1.0),
        "transformer.rotary_pos_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, rope_dim, 2).float() / rope_dim)),
    }
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1.0 + _rand(gen, h, scale=0.1)
        sd[p + "self_attention.query_key_value.weight"] = _rand(gen, qkv, h)
        sd[p + "self_attention.query_key_value.bias"] = _rand(gen, qkv, scale=0.1)
        sd[p + "self_attention.dense.weight"] = _rand(gen, h, heads * d)
        sd[p + "post_attention_layernorm.weight"] = 1.0 + _rand(gen, h, scale=0.1)
        sd[p + "mlp.dense_h_to_4h.weight"] = _rand(gen, 2 * ffn, h)
        sd[p + "mlp.dense_4h_to_h.weight"] = _rand(gen, h, ffn)
    sd["transformer.encoder.final_layernorm.weight"] = 1.0 + _rand(gen, h, scale=0.1)
    sd["transformer.output_layer.weight"] = _rand(gen, vocab, h)
    return sd


def chatglm_v1_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h, inner, vocab = cfg["hidden_size"], cfg["inner_hidden_size"], cfg["vocab_size"]
    sd = {"transformer.word_embeddings.weight": _rand(gen, vocab, h, scale=1.0)}
    for i in range(cfg["num_layers"]):
        p = f"transformer.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[p + norm + ".weight"] = 1.0 + _rand(gen, h, scale=0.1)
            sd[p + norm + ".bias"] = _rand(gen, h, scale=0.1)
        sd[p + "attention.query_key_value.weight"] = _rand(gen, 3 * h, h)
        sd[p + "attention.query_key_value.bias"] = _rand(gen, 3 * h, scale=0.1)
        sd[p + "attention.dense.weight"] = _rand(gen, h, h, scale=0.1)
        sd[p + "attention.dense.bias"] = _rand(gen, h, scale=0.1)
        sd[p + "mlp.dense_h_to_4h.weight"] = _rand(gen, inner, h)
        sd[p + "mlp.dense_h_to_4h.bias"] = _rand(gen, inner, scale=0.1)
        sd[p + "mlp.dense_4h_to_h.weight"] = _rand(gen, h, inner, scale=0.1)
        sd[p + "mlp.dense_4h_to_h.bias"] = _rand(gen, h, scale=0.1)
    sd["transformer.final_layernorm.weight"] = 1.0 + _rand(gen, h, scale=0.1)
    sd["transformer.final_layernorm.bias"] = _rand(gen, h, scale=0.1)
    sd["lm_head.weight"] = _rand(gen, vocab, h)
    return sd


def write_chatglm2_checkpoint(
    directory: Path, family: str = "chatglm3", fmt: str = "bin", shards: int = 2, seed: int = 0, **overrides
) -> Path:
    """A tiny ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B-chat checkpoint directory in THUDM's layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if family == "glm4":
        n = write_tiktoken_file(directory / "tokenizer.model")
        vocab_used, eos, pad, rope_ratio, eps, seq = n + 14, [n, n + 7, n + 9], n, 500, 1.5625e-07, 131072
    else:
        model = sentencepiece_bytes("chatglm2")
        (directory / "tokenizer.model").write_bytes(model)
        import sentencepiece as spm

        sp_size = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
        vocab_used, eos, pad, rope_ratio, eps = sp_size + 9, 2, 0, None, 1e-5
        seq = 32768 if family == "chatglm2" else 8192
    cfg = {
        "_name_or_path": f"THUDM/{family}-tiny",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "layernorm_epsilon": eps,
        "multi_query_attention": True,
        "original_rope": True,
        "padded_vocab_size": _pad_to(vocab_used),
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": seq,
        "use_cache": True,
        "torch_dtype": "float32",
        "transformers_version": "4.30.2",
        "tie_word_embeddings": False,
        **TINY,
    }
    if rope_ratio is not None:
        cfg["rope_ratio"] = rope_ratio
    cfg.update(overrides)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "ChatGLMTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}})
    )
    _save_shards(directory, chatglm2_state_dict(cfg, seed), fmt=fmt, shards=shards)
    return directory


def write_chatglm_v1_checkpoint(directory: Path, fmt: str = "bin", shards: int = 2, seed: int = 0) -> Path:
    """A tiny ChatGLM-6B checkpoint directory in THUDM's layout (ice_text.model, v1 config keys)."""
    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = sentencepiece_bytes("chatglm")
    (directory / "ice_text.model").write_bytes(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    cfg = {
        "_name_or_path": "THUDM/chatglm-6b-tiny",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig", "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "bos_token_id": sp.piece_to_id("<sop>"),
        "eos_token_id": sp.piece_to_id("<eop>"),
        "mask_token_id": sp.piece_to_id("[MASK]"),
        "gmask_token_id": sp.piece_to_id("[gMASK]"),
        "pad_token_id": sp.piece_to_id("<pad>"),
        "hidden_size": 64,
        "inner_hidden_size": 256,
        "layernorm_epsilon": 1e-05,
        "max_sequence_length": 2048,
        "num_attention_heads": 4,
        "num_layers": 2,
        "position_encoding_2d": True,
        "pre_seq_len": None,
        "prefix_projection": False,
        "quantization_bit": 0,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": _pad_to(sp.get_piece_size()),
    }
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    _save_shards(directory, chatglm_v1_state_dict(cfg, seed), fmt=fmt, shards=shards)
    return directory
