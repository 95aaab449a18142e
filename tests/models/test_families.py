"""All four ChatGLM families load without trust_remote_code, from tiny checkpoints in THUDM's exact layout.

The reference forwards below are written from the THUDM model definitions in plain torch, reading the
checkpoint's own tensors by their THUDM names, independently of the key mapping in models/thudm.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from glm_experiments.data import templates  # noqa: E402
from glm_experiments.errors import UserError  # noqa: E402
from glm_experiments.models import thudm  # noqa: E402
from glm_experiments.models.chatglm.modeling import ChatGLMv1ForCausalLM  # noqa: E402
from glm_experiments.models.thudm import CheckpointError, converted_path, load_checkpoint  # noqa: E402
from tests.helpers import thudm_fixtures as fx  # noqa: E402
from tests.helpers.common import assert_close  # noqa: E402

V2_FAMILIES = ["chatglm2", "chatglm3", "glm4"]
ALL_FAMILIES = ["chatglm", *V2_FAMILIES]
TEXTS = [
    "你好",
    "今天天气很好，我们去公园散步吧。",
    "Hello world, this is a tiny corpus for tests.",
    "[Round 1]\n\n问：连衣裙\n\n答：",
    "\n",
    "a\nb\n\nc",
    "\nleading newline",
    " leading space",
    "two  spaces and   three",
    "tab\there",
    "isopropyl sop eop stop",
    "numbers 2023 3.14 and 😀 emoji",
    "def main():\n    return 42",
    "混合 mixed 文本 text。",
]


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """family -> a THUDM-layout checkpoint directory (bin shards + index)."""
    root = tmp_path_factory.mktemp("thudm")
    dirs = {"chatglm": fx.write_chatglm_v1_checkpoint(root / "chatglm")}
    for family in V2_FAMILIES:
        dirs[family] = fx.write_chatglm2_checkpoint(root / family, family)
    return dirs


@pytest.fixture(scope="module")
def loaded(ckpt):
    return {family: load_checkpoint(ckpt[family], family, torch.float32) for family in ALL_FAMILIES}


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a THUDM checkpoint directory, read through its index."""
    sd = {}
    for index_name in ("pytorch_model.bin.index.json", "model.safetensors.index.json"):
        index = directory / index_name
        if index.exists():
            for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                if name.endswith(".bin"):
                    sd.update(torch.load(directory / name, weights_only=True))
                else:
                    from safetensors.torch import load_file

                    sd.update(load_file(directory / name))
            return sd
    if (directory / "pytorch_model.bin").exists():
        return torch.load(directory / "pytorch_model.bin", weights_only=True)
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def sample_ids(family: str, tok) -> list[int]:
    """A prompt + answer in the family's own layout."""
    messages = [{"role": "user", "content": "连衣裙 宽松"}, {"role": "assistant", "content": "简约的设计 hello"}]
    return templates.get_template(family).encode(tok, messages).input_ids


# ----------------------------------------------------------------------------------------------- references


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_chatglm2(sd: dict, cfg: dict, ids: list[int], prefix=None) -> torch.Tensor:
    """ChatGLM2/3/GLM-4 forward (modeling_chatglm.py, original_rope) over THUDM tensors; logits (L, vocab).

    ``prefix``: P-Tuning v2's per-layer (keys, values), each (P, groups, d): they start every layer's keys/values
    (not rotated), every query sees all of them, position ids count the real tokens from 0."""
    L, d = len(ids), cfg["kv_channels"]
    nh, ng, eps = cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["layernorm_epsilon"]
    rot = d // 2
    base = 10000 * cfg.get("rope_ratio", 1)
    theta = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float) / rot))
    angles = torch.outer(torch.arange(L, dtype=torch.float), theta).to(sd["transformer.output_layer.weight"].dtype)
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]

    def rope(x):  # (L, heads, d): pairs (0,1), (2,3), ... of the first rot dims
        xr, xp = x[..., :rot], x[..., rot:]
        xr = xr.reshape(L, x.shape[1], rot // 2, 2)
        x0, x1 = xr[..., 0], xr[..., 1]
        out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(2)
        return torch.cat([out, xp], dim=-1)

    h = sd["transformer.embedding.word_embeddings.weight"][torch.tensor(ids)]
    P = prefix[0][0].shape[0] if prefix else 0
    allowed = torch.cat([torch.ones(L, P, dtype=torch.bool), torch.ones(L, L, dtype=torch.bool).tril()], dim=1)
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        x = rms_norm(h, sd[p + "input_layernorm.weight"], eps)
        qkv = x @ sd[p + "self_attention.query_key_value.weight"].T + sd[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([nh * d, ng * d, ng * d], dim=-1)
        q, k, v = rope(q.view(L, nh, d)), rope(k.view(L, ng, d)), v.view(L, ng, d)
        if prefix:
            k, v = torch.cat([prefix[i][0].to(k.dtype), k]), torch.cat([prefix[i][1].to(v.dtype), v])
        k, v = k.repeat_interleave(nh // ng, dim=1), v.repeat_interleave(nh // ng, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(L, nh * d)
        h = h + attn @ sd[p + "self_attention.dense.weight"].T
        x = rms_norm(h, sd[p + "post_attention_layernorm.weight"], eps)
        gate, up = (x @ sd[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        h = h + (F.silu(gate) * up) @ sd[p + "mlp.dense_4h_to_h.weight"].T
    h = rms_norm(h, sd["transformer.encoder.final_layernorm.weight"], eps)
    return h @ sd["transformer.output_layer.weight"].T


def reference_chatglm_v1(sd: dict, cfg: dict, ids: list[int], prefix=None) -> torch.Tensor:
    """ChatGLM-6B forward (2D RoPE, bidirectional context, alpha residual) over THUDM tensors.

    ``prefix``: P-Tuning v2's per-layer (keys, values), each (P, heads, head_dim), concatenated after RoPE of the
    new keys (never rotated), visible to every query; positions ignore them (modeling_chatglm.py v1)."""
    L, H, nh = len(ids), cfg["hidden_size"], cfg["num_attention_heads"]
    hd, eps = H // nh, cfg["layernorm_epsilon"]
    alpha = math.sqrt(2 * 28)  # GLMBlock(num_layers=28) default: the original never passes the config's depth
    ctx = ids.index(cfg["bos_token_id"])
    mask_pos = ids.index(cfg["gmask_token_id"])
    pos = torch.tensor([t if t < ctx else mask_pos for t in range(L)])
    block = torch.tensor([0 if t < ctx else t - ctx + 1 for t in range(L)])
    half = hd // 2
    inv_freq = (1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))).half().float()

    def rope(x, p):  # (L, heads, half), rotate-half style
        f = (p[:, None].float() * inv_freq).to(x.dtype)
        emb = torch.cat([f, f], dim=-1)[:, None, :]
        x1, x2 = x[..., : half // 2], x[..., half // 2 :]
        return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()

    def gelu(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    idx = torch.arange(L)
    P = prefix[0][0].shape[0] if prefix else 0
    allowed = torch.cat([torch.ones(L, P, dtype=torch.bool), (idx[None, :] <= idx[:, None]) | (idx[None, :] < ctx)], dim=1)
    h = sd["transformer.word_embeddings.weight"][torch.tensor(ids)]
    for i in range(cfg["num_layers"]):
        p = f"transformer.layers.{i}."
        xn = F.layer_norm(h, (H,), sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"], eps)
        qkv = (xn @ sd[p + "attention.query_key_value.weight"].T + sd[p + "attention.query_key_value.bias"]).view(L, nh, 3 * hd)
        q, k, v = qkv[..., :hd], qkv[..., hd : 2 * hd], qkv[..., 2 * hd :]
        q = torch.cat([rope(q[..., :half], pos), rope(q[..., half:], block)], dim=-1)
        k = torch.cat([rope(k[..., :half], pos), rope(k[..., half:], block)], dim=-1)
        if prefix:
            k, v = torch.cat([prefix[i][0].to(k.dtype), k]), torch.cat([prefix[i][1].to(v.dtype), v])
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(L, H)
        attn = attn @ sd[p + "attention.dense.weight"].T + sd[p + "attention.dense.bias"]
        h = xn * alpha + attn
        mn = F.layer_norm(h, (H,), sd[p + "post_attention_layernorm.weight"], sd[p + "post_attention_layernorm.bias"], eps)
        mlp = gelu(mn @ sd[p + "mlp.dense_h_to_4h.weight"].T + sd[p + "mlp.dense_h_to_4h.bias"])
        h = mn * alpha + mlp @ sd[p + "mlp.dense_4h_to_h.weight"].T + sd[p + "mlp.dense_4h_to_h.bias"]
    h = F.layer_norm(h, (H,), sd["transformer.final_layernorm.weight"], sd["transformer.final_layernorm.bias"], eps)
    return h @ sd["lm_head.weight"].T


# ----------------------------------------------------------------------------------------------- logits


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_logits_match_reference_forward(family, ckpt, loaded):
    model, tok = loaded[family]
    expected_cls = ChatGLMv1ForCausalLM if family == "chatglm" else __import__("transformers").GlmForCausalLM
    assert type(model) is expected_cls
    cfg = json.loads((ckpt[family] / "config.json").read_text())
    sd = read_state_dict(ckpt[family])
    ids = sample_ids(family, tok)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    reference = reference_chatglm_v1 if family == "chatglm" else reference_chatglm2
    expected = reference(sd, cfg, ids)
    assert_close(logits, expected, what="logits")


def test_glm4_keeps_rope_ratio(loaded):
    model, _ = loaded["glm4"]
    assert model.config.rope_parameters["rope_theta"] == 10000 * 500
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
    assert model.config.rms_norm_eps == 1.5625e-07
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("fmt,shards", [("safetensors", 2), ("bin", 1), ("safetensors", 1)])
def test_weight_file_variants_load_the_same(fmt, shards, tmp_path, loaded):
    directory = fx.write_chatglm2_checkpoint(tmp_path / "c", "chatglm3", fmt=fmt, shards=shards)
    model, _ = load_checkpoint(directory, "chatglm3", torch.float32)
    reference = loaded["chatglm3"][0].state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key], atol=0, rtol=0)


def test_dtype_and_no_meta_tensors(ckpt):
    model, _ = load_checkpoint(ckpt["chatglm3"], "chatglm3", torch.bfloat16)
    for name, param in model.named_parameters():
        assert param.device.type == "cpu", name
        assert param.dtype == torch.bfloat16, name
    for name, buf in model.named_buffers():
        assert buf.device.type == "cpu", name


def test_attn_implementation_reaches_real_checkpoints(ckpt, monkeypatch, tmp_path):
    """model.attn_implementation is honoured for THUDM layouts (in memory and via the conversion cache); ChatGLM-6B's
    own attention ignores it; an unavailable kernel is one UserError naming the setting."""
    from omegaconf import OmegaConf

    from glm_experiments.errors import UserError
    from glm_experiments.models.loading import load_model_and_tokenizer

    monkeypatch.setenv("GLM_EXPERIMENTS_CACHE", str(tmp_path))
    for cached in (False, True):
        cfg = OmegaConf.create({"name": "chatglm3", "family": "chatglm3", "path": str(ckpt["chatglm3"]), "dtype": "float32",
                                "attn_implementation": "eager", "cache_conversion": cached, "tiny": None})
        model, _ = load_model_and_tokenizer(cfg)
        assert model.config._attn_implementation == "eager"
    v1 = OmegaConf.merge(cfg, {"name": "chatglm", "family": "chatglm", "path": str(ckpt["chatglm"]), "attn_implementation": "sdpa"})
    assert type(load_model_and_tokenizer(v1)[0]).__name__ == "ChatGLMv1ForCausalLM"
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(UserError, match="model.attn_implementation=flash_attention_2: .*sdpa, the default"):
            load_model_and_tokenizer(OmegaConf.merge(cfg, {"attn_implementation": "flash_attention_2"}))


# ----------------------------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_convert_round_trip(family, ckpt, loaded, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glm_experiments import convert

    dst = tmp_path / "out"
    assert convert.main(["--family", family, "--src", str(ckpt[family]), "--dst", str(dst), "--shard-size", "200KB"]) == 0
    assert len(list(dst.glob("model-*.safetensors"))) > 1 and (dst / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(dst)
    ref_model, ref_tok = loaded[family]
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False) == ref_tok.encode(text, add_special_tokens=False), text
    ids = sample_ids(family, tok)
    assert ids == sample_ids(family, ref_tok)
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids])).logits, ref_model(torch.tensor([ids])).logits, atol=0, rtol=0)
    assert model.generation_config.eos_token_id == ref_model.generation_config.eos_token_id
    # a native directory passes straight through load_checkpoint
    again, _ = load_checkpoint(dst, family, torch.float32)
    assert type(again) is type(ref_model)


def test_convert_cli_errors_are_one_line(ckpt, tmp_path, capsys):
    from glm_experiments import convert

    assert convert.main(["--family", "chatglm", "--src", str(ckpt["chatglm3"]), "--dst", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error:") and "config.json" in err


def test_converted_path_is_cached(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_EXPERIMENTS_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    shutil.copytree(ckpt["chatglm2"], src)
    calls = []
    original = thudm.convert_checkpoint
    monkeypatch.setattr(thudm, "convert_checkpoint", lambda *a, **k: calls.append(a) or original(*a, **k))
    first = converted_path(src, "chatglm2")
    assert first == converted_path(src, "chatglm2")
    assert len(calls) == 1 and first.is_relative_to(tmp_path / "cache" / "converted")
    assert (first / "tokenizer.json").exists() and list(first.glob("*.safetensors"))
    # changed files (mtime) -> a new conversion
    import os

    cfg = src / "config.json"
    os.utime(cfg, ns=(cfg.stat().st_atime_ns, cfg.stat().st_mtime_ns + 10**9))
    assert converted_path(src, "chatglm2") != first and len(calls) == 2
    model, tok = load_checkpoint(src, "chatglm2", torch.float32, cached=True)
    assert len(calls) == 2 and tok.convert_tokens_to_ids("sop") == 703


# ----------------------------------------------------------------------------------------------- tokenizers


def sp_processor(directory: Path, name: str):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(directory / name))


def v1_original_encode(sp, text: str) -> list[int]:
    """ChatGLM-6B's SPTokenizer.encode: "\\n" -> <n>, tab -> <|tab|>, runs of 80..2 spaces -> <|blank_N|>."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(80, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return sp.encode(text)


def glm4_original(directory: Path):
    import base64

    import tiktoken

    ranks = {}
    for line in (directory / "tokenizer.model").read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding("glm4", pat_str=fx.GLM4_PATTERN, mergeable_ranks=ranks, special_tokens={}), len(ranks)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_encode_matches_original_tokenizer(family, ckpt, loaded):
    _, tok = loaded[family]
    if family == "chatglm":
        sp = sp_processor(ckpt[family], "ice_text.model")
        original = lambda text: v1_original_encode(sp, text)  # noqa: E731
    elif family == "glm4":
        enc, _ = glm4_original(ckpt[family])
        original = enc.encode_ordinary
    else:
        original = sp_processor(ckpt[family], "tokenizer.model").encode
    for text in TEXTS + fx.corpus()[:40]:
        assert tok.encode(text, add_special_tokens=False) == original(text), repr(text)


def test_special_token_ids(ckpt, loaded):
    sp = sp_processor(ckpt["chatglm3"], "tokenizer.model")
    n = sp.get_piece_size()
    names = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    for family in ("chatglm2", "chatglm3"):
        tok = loaded[family][1]
        assert tok.convert_tokens_to_ids(names) == [n + k for k in range(9)]
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 0, 0)
        assert tok("你好").input_ids[:2] == [n + 1, n + 3]  # add_special_tokens: [gMASK] sop prefix
    _, m = glm4_original(ckpt["glm4"])
    tok = loaded["glm4"][1]
    g4 = {"<|endoftext|>": 0, "[gMASK]": 2, "<sop>": 4, "<|system|>": 6, "<|user|>": 7, "<|assistant|>": 8, "<|observation|>": 9}
    assert {t: tok.convert_tokens_to_ids(t) - m for t in g4} == g4
    assert tok.eos_token_id == tok.pad_token_id == m
    sp1 = sp_processor(ckpt["chatglm"], "ice_text.model")
    tok = loaded["chatglm"][1]
    for name in ("[MASK]", "[gMASK]", "<sop>", "<eop>", "<pad>"):
        assert tok.convert_tokens_to_ids(name) == sp1.piece_to_id(name), name
    assert (tok.bos_token, tok.eos_token, tok.pad_token_id) == ("<sop>", "<eop>", 3)
    # "sop" inside words stays text
    assert "sop" not in loaded["chatglm3"][1].convert_ids_to_tokens(loaded["chatglm3"][1].encode("isopropyl sop", add_special_tokens=False))


def test_template_layouts(ckpt, loaded):
    messages = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "hello world"},
    ]
    # ChatGLM2: [gMASK, sop] + prompt + answer + [eos]
    sp = sp_processor(ckpt["chatglm2"], "tokenizer.model")
    n = sp.get_piece_size()
    enc = templates.get_template("chatglm2").encode(loaded["chatglm2"][1], messages)
    assert enc.input_ids == [n + 1, n + 3] + sp.encode("[Round 1]\n\n问：你好\n\n答：") + sp.encode("hello world") + [2]
    # ChatGLM3: [gMASK, sop] + <|role|> encode(metadata + "\n") encode(content) ... + [eos]
    enc = templates.get_template("chatglm3").encode(loaded["chatglm3"][1], messages)
    assert enc.input_ids == (
        [n + 1, n + 3, n + 6] + sp.encode("\n") + sp.encode("你好") + [n + 7] + sp.encode("\n") + sp.encode("hello world") + [2]
    )
    # GLM-4: same layout with its own ids; eos <|endoftext|>
    tt, m = glm4_original(ckpt["glm4"])
    enc = templates.get_template("glm4").encode(loaded["glm4"][1], messages)
    assert enc.input_ids == (
        [m + 2, m + 4, m + 7] + tt.encode("\n") + tt.encode("你好") + [m + 8] + tt.encode("\n") + tt.encode("hello world") + [m]
    )
    # ChatGLM-6B: prompt + [gMASK, <sop>] + answer + [<eop>]
    sp1 = sp_processor(ckpt["chatglm"], "ice_text.model")
    g, s, e = (sp1.piece_to_id(t) for t in ("[gMASK]", "<sop>", "<eop>"))
    enc = templates.get_template("chatglm").encode(loaded["chatglm"][1], messages)
    assert enc.input_ids == v1_original_encode(sp1, "[Round 0]\n问：你好\n答：") + [g, s] + v1_original_encode(sp1, "hello world") + [e]


# ----------------------------------------------------------------------------------------------- generation


def _force_next_token(model, token_id: int):
    """Zero the output layer (all logits equal) so that suppressing every lower id makes greedy pick token_id."""
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    return list(range(token_id))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_generation_stops_on_family_eos(family, ckpt):
    model, tok = load_checkpoint(ckpt[family], family, torch.float32)
    template = templates.get_template(family)
    stop_ids = template.stop_ids(tok)
    eos = model.generation_config.eos_token_id
    assert sorted(eos if isinstance(eos, list) else [eos]) == sorted(stop_ids)
    expected = {
        "chatglm": ["<eop>"],
        "chatglm2": ["</s>"],
        "chatglm3": ["</s>", "<|user|>", "<|observation|>"],
        "glm4": ["<|endoftext|>", "<|user|>", "<|observation|>"],
    }[family]
    assert sorted(stop_ids) == sorted(tok.convert_tokens_to_ids(expected))
    prompt = torch.tensor([template.prompt(tok, [{"role": "user", "content": "你好"}])])
    for stop in stop_ids:
        suppress = _force_next_token(model, stop)
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, suppress_tokens=suppress)
        assert out[0, prompt.shape[1] :].tolist() == [stop]
    other = 30  # an ordinary piece: generation runs to max_new_tokens
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, suppress_tokens=_force_next_token(model, other))
    assert out[0, prompt.shape[1] :].tolist() == [other] * 4


# ----------------------------------------------------------------------------------------------- ChatGLM-6B model


def test_v1_generate_with_cache_equals_without(loaded):
    model, tok = loaded["chatglm"]
    prompt = templates.get_template("chatglm").prompt(tok, [{"role": "user", "content": "连衣裙"}])
    ids = torch.tensor([prompt])
    with_cache = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, eos_token_id=None)
    without = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, eos_token_id=None)
    assert with_cache.tolist() == without.tolist()
    assert with_cache.shape[1] == len(prompt) + 8


def test_v1_left_padding_matches_unpadded(loaded):
    model, tok = loaded["chatglm"]
    tpl = templates.get_template("chatglm")
    a = tpl.prompt(tok, [{"role": "user", "content": "连衣裙 宽松 显瘦"}])
    b = tpl.prompt(tok, [{"role": "user", "content": "你好"}])
    batch = tok.pad({"input_ids": [a, b]}, return_tensors="pt")
    assert batch["input_ids"][1, 0].item() == tok.pad_token_id  # left padded
    with torch.no_grad():
        padded = model(**batch).logits
        alone = model(torch.tensor([b])).logits
    assert_close(padded[1, -len(b) :], alone[0], what="left-padded logits")
    gen = model.generate(**batch, max_new_tokens=4, do_sample=False, eos_token_id=None)
    gen_b = model.generate(torch.tensor([b]), max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert gen[1, -4:].tolist() == gen_b[0, -4:].tolist()


def test_v1_loss_gradient_checkpointing_and_lora(ckpt):
    from peft import LoraConfig, get_peft_model

    model, tok = load_checkpoint(ckpt["chatglm"], "chatglm", torch.float32)
    enc = templates.get_template("chatglm").encode(tok, [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hello"}])
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"], lora_dropout=0.0))
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    model.train()

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    # make LoRA B non-zero so the A gradients are non-trivial
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    loss, grads = loss_and_grads()
    assert math.isfinite(loss) and loss > 0
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    loss_gc, grads_gc = loss_and_grads()
    assert loss_gc == pytest.approx(loss, rel=1e-5)
    for n in grads:
        assert_close(grads_gc[n], grads[n], what=n)
    assert any(g.abs().sum() > 0 for g in grads.values())


# ----------------------------------------------------------------------------------------------- errors


def _copy(ckpt, family, tmp_path) -> Path:
    dst = tmp_path / family
    shutil.copytree(ckpt[family], dst)
    return dst


def test_error_not_a_checkpoint_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty.*config\.json"):
        load_checkpoint(tmp_path / "empty", "chatglm3", torch.float32)
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "chatglm", "padded_vocab_size": 8}))
    with pytest.raises(CheckpointError, match=r"noweights: not a recognised checkpoint directory"):
        thudm.find_weight_files(d)


def test_error_missing_shard(ckpt, tmp_path):
    d = _copy(ckpt, "chatglm3", tmp_path)
    (d / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(d, "chatglm3", torch.float32)
    msg = str(err.value)
    assert "pytorch_model.bin.index.json" in msg and "pytorch_model-00002-of-00002.bin" in msg and "transformer." in msg


def test_error_missing_key(ckpt, tmp_path):
    d = _copy(ckpt, "chatglm3", tmp_path)
    shard = d / "pytorch_model-00002-of-00002.bin"
    sd = torch.load(shard, weights_only=True)
    sd.pop("transformer.output_layer.weight")
    torch.save(sd, shard)
    index = json.loads((d / "pytorch_model.bin.index.json").read_text())
    index["weight_map"].pop("transformer.output_layer.weight")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin\.index\.json: missing key transformer\.output_layer\.weight"):
        load_checkpoint(d, "chatglm3", torch.float32)


def test_error_index_lists_key_the_shard_lacks(ckpt, tmp_path):
    d = _copy(ckpt, "chatglm2", tmp_path)
    shard = d / "pytorch_model-00001-of-00002.bin"
    sd = torch.load(shard, weights_only=True)
    sd.pop("transformer.embedding.word_embeddings.weight")
    torch.save(sd, shard)
    with pytest.raises(CheckpointError, match=r"lists key transformer\.embedding\.word_embeddings\.weight in pytorch_model-00001"):
        load_checkpoint(d, "chatglm2", torch.float32)


def test_error_unexpected_key(ckpt, tmp_path):
    d = _copy(ckpt, "glm4", tmp_path)
    shard = d / "pytorch_model-00002-of-00002.bin"
    sd = torch.load(shard, weights_only=True)
    sd["transformer.prefix_encoder.embedding.weight"] = torch.zeros(2, 2)
    torch.save(sd, shard)
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00002\.bin: unexpected key transformer\.prefix_encoder\.embedding\.weight"):
        load_checkpoint(d, "glm4", torch.float32)


def test_error_shape_mismatch(ckpt, tmp_path):
    d = _copy(ckpt, "chatglm3", tmp_path)
    shard = d / "pytorch_model-00002-of-00002.bin"
    sd = torch.load(shard, weights_only=True)
    key = next(k for k in sd if k.endswith("mlp.dense_4h_to_h.weight"))
    sd[key] = sd[key][:, :-1].clone()
    torch.save(sd, shard)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(d, "chatglm3", torch.float32)
    msg = str(err.value)
    assert "pytorch_model-00002-of-00002.bin" in msg and key in msg and "(64, 95)" in msg and "(64, 96)" in msg
    # the qkv rows must add up to Q + K + V
    d2 = _copy(ckpt, "chatglm2", tmp_path)
    for shard in sorted(d2.glob("pytorch_model-*.bin")):
        sd = torch.load(shard, weights_only=True)
        key = next((k for k in sd if k.endswith("query_key_value.weight")), None)
        if key:
            sd[key] = sd[key][:-16].clone()
            torch.save(sd, shard)
            break
    with pytest.raises(CheckpointError, match=r"key transformer\.encoder\.layers\.0\.self_attention\.query_key_value\.weight has shape"):
        load_checkpoint(d2, "chatglm2", torch.float32)


def test_error_family_mismatch(ckpt):
    with pytest.raises(CheckpointError, match=r"config\.json: family chatglm3 expects .*ChatGLM-6B \(v1\) keys"):
        load_checkpoint(ckpt["chatglm"], "chatglm3", torch.float32)
    with pytest.raises(CheckpointError, match=r"config\.json: family chatglm expects ChatGLM-6B's v1 config keys"):
        load_checkpoint(ckpt["chatglm3"], "chatglm", torch.float32)
    with pytest.raises(CheckpointError, match=r"tokenizer\.model: is a SentencePiece model, but family glm4"):
        load_checkpoint(ckpt["chatglm3"], "glm4", torch.float32)
    with pytest.raises(CheckpointError, match=r"tokenizer\.model: is a tiktoken \(GLM-4\) file, but family chatglm3"):
        load_checkpoint(ckpt["glm4"], "chatglm3", torch.float32)
    with pytest.raises(UserError, match="model.family='glm5': expected one of chatglm, chatglm2, chatglm3, glm4, hf, tiny"):
        load_checkpoint(ckpt["glm4"], "glm5", torch.float32)


def test_v1_prefix_in_cache(loaded):
    """P-Tuning v2 style: a prefix already in the cache, the whole sequence as input, a mask for the input only."""
    from transformers.cache_utils import DynamicCache

    model, tok = loaded["chatglm"]
    cfg = model.config
    ids = torch.tensor([sample_ids("chatglm", tok)])
    hd = cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache(config=cfg)
    gen = torch.Generator().manual_seed(0)
    for layer in range(cfg.num_hidden_layers):
        kv = torch.randn(2, 1, cfg.num_attention_heads, 3, hd, generator=gen)
        cache.update(kv[0], kv[1], layer)
    with torch.no_grad():
        out = model(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True).logits
        plain = model(ids).logits
    assert out.shape == plain.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, plain)
    assert cache.get_seq_length() == 3 + ids.shape[1]
