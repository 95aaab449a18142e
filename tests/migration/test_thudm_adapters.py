"""Adapters trained with THUDM's scripts (PEFT 0.6-0.10 LoRA on THUDM module names, ptuning/main.py prefix
encoders, PEFT PREFIX_TUNING) give, after ``convert --adapter``, the logits the original computed.

The foreign layouts are written here on tiny THUDM-layout checkpoints; the expected logits come from the plain-torch
reference forwards of test_families.py, over the THUDM tensors with the adapter applied in THUDM's own names (LoRA
folded into the fused weights; the prefix as THUDM's PrefixEncoder.get_prompt lays it out) -- independent of the
key mapping under test.
"""

from __future__ import annotations

import json
import re
import math
import shutil
from pathlib import Path

import pytest
from tests.models import test_families as tf
import torch

from glm_experiments import convert
from glm_experiments.migration.thudm_adapters import convert_adapter
from glm_experiments.models.thudm import CheckpointError, load_checkpoint
from tests.helpers import thudm_fixtures as fx
from tests.helpers.common import assert_close

V2_FAMILIES = ["chatglm2", "chatglm3", "glm4"]
V2_TARGETS = ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
V1_TARGETS = ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
BASE_NAMES = {"chatglm": "THUDM/chatglm-6b", "chatglm2": "THUDM/chatglm2-6b", "chatglm3": "THUDM/chatglm3-6b",
              "glm4": "THUDM/glm-4-9b-chat"}


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    dirs = {"chatglm": fx.write_chatglm_v1_checkpoint(root / "chatglm", shards=1)}
    for family in V2_FAMILIES:
        dirs[family] = fx.write_chatglm2_checkpoint(root / family, family, shards=1)
    return dirs


def peft06_config(family: str, r: int, alpha: float, targets: list[str], version: str = "0.6", **extra) -> dict:
    """adapter_config.json as PEFT 0.6 (or 0.10, with its extra fields) wrote it for ChatGLM's finetune_demo."""
    cfg = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": BASE_NAMES[family], "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
        "layers_to_transform": None, "lora_alpha": float(alpha), "lora_dropout": 0.1, "modules_to_save": None,
        "peft_type": "LORA", "r": r, "rank_pattern": {}, "revision": None, "target_modules": targets,
        "task_type": "CAUSAL_LM",
    }
    if version == "0.10":
        cfg.update({"loftq_config": {}, "megatron_config": None, "megatron_core": "megatron.core", "use_dora": False,
                    "use_rslora": False, "layer_replication": None})
    cfg.update(extra)
    return cfg


def lora_weights(family: str, base: Path, targets: list[str], r: int, seed: int = 1, dora: bool = False,
                 ranks: dict | None = None) -> dict:
    """Random lora_A and (non-zero) lora_B for every layer and target, under PEFT 0.6's key names (``ranks``: rank
    per short module name, as a rank_pattern gives it)."""
    gen = torch.Generator().manual_seed(seed)
    sd = tf.read_state_dict(base)
    stack = "transformer.layers" if family == "chatglm" else "transformer.encoder.layers"
    layers = json.loads((base / "config.json").read_text())["num_layers"]
    out = {}
    for i in range(layers):
        for t in targets:
            w = sd[f"{stack}.{i}.{t}.weight"]
            p = f"base_model.model.{stack}.{i}.{t}."
            rank = (ranks or {}).get(t.rsplit(".", 1)[-1], r)
            out[p + "lora_A.weight"] = torch.randn(rank, w.shape[1], generator=gen) * 0.2
            out[p + "lora_B.weight"] = torch.randn(w.shape[0], rank, generator=gen) * 0.2
            if dora:
                out[p + "lora_magnitude_vector"] = w.norm(dim=1) * (1 + 0.3 * torch.rand(w.shape[0], generator=gen))
    return out


def write_peft_adapter(directory: Path, config: dict, weights: dict, fmt: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if fmt == "bin":
        torch.save(weights, directory / "adapter_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(weights, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def write_ptuning_main_checkpoint(directory: Path, base: Path, pre_seq_len: int, projection: bool, seed: int = 2) -> Path:
    """ptuning/main.py's output/<run>/checkpoint-N: config.json (with pre_seq_len) + pytorch_model.bin holding only
    transformer.prefix_encoder.* (ChatGLM2's PrefixEncoder: projection embeds into the full kv width)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = json.loads((base / "config.json").read_text())
    h = cfg["hidden_size"]
    v1 = "position_encoding_2d" in cfg
    kv_size = cfg["num_layers"] * (h if v1 else cfg["kv_channels"] * cfg["multi_query_group_num"]) * 2
    emb = h if v1 and projection else kv_size  # ChatGLM-6B's projection embeds into hidden_size, ChatGLM2's into kv_size
    p = "transformer.prefix_encoder."
    sd = {p + "embedding.weight": torch.randn(pre_seq_len, emb, generator=gen)}
    if projection:
        sd[p + "trans.0.weight"] = torch.randn(h, emb, generator=gen) * 0.1
        sd[p + "trans.0.bias"] = torch.randn(h, generator=gen) * 0.1
        sd[p + "trans.2.weight"] = torch.randn(kv_size, h, generator=gen) * 0.3
        sd[p + "trans.2.bias"] = torch.randn(kv_size, generator=gen) * 0.1
    directory.mkdir(parents=True, exist_ok=True)
    cfg.update(pre_seq_len=pre_seq_len, prefix_projection=projection)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.save(sd, directory / "pytorch_model.bin")
    return directory


def write_peft_prefix_adapter(directory: Path, family: str, base: Path, tokens: int, fmt: str, seed: int = 3) -> Path:
    """PEFT PREFIX_TUNING as finetune_demo saved it: prompt_embeddings = the encoder's output per virtual token."""
    gen = torch.Generator().manual_seed(seed)
    cfg = json.loads((base / "config.json").read_text())
    token_dim = cfg["kv_channels"] * cfg["multi_query_group_num"]
    config = {
        "auto_mapping": None, "base_model_name_or_path": BASE_NAMES[family], "encoder_hidden_size": cfg["hidden_size"],
        "inference_mode": True, "num_attention_heads": cfg["multi_query_group_num"], "num_layers": cfg["num_layers"],
        "num_transformer_submodules": 1, "num_virtual_tokens": tokens, "peft_type": "PREFIX_TUNING",
        "prefix_projection": False, "revision": None, "task_type": "CAUSAL_LM", "token_dim": token_dim,
    }
    weights = {"prompt_embeddings": torch.randn(tokens, cfg["num_layers"] * 2 * token_dim, generator=gen)}
    return write_peft_adapter(directory, config, weights, fmt)


# ----------------------------------------------------------------------------------------------- references


def fold_lora(sd: dict, weights: dict, scale, dora: bool = False) -> dict:
    """THUDM tensors with each LoRA folded into its own (fused) weight: W + scale * B @ A (DoRA: row-normalised
    and rescaled by the magnitude), in float64."""
    out = {k: v.double() for k, v in sd.items()}
    for key, lora_a in weights.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        a, b = lora_a.double(), weights[key.replace("lora_A", "lora_B")].double()
        s = scale(module) if callable(scale) else scale
        w = out[module + ".weight"] + s * b @ a
        if dora:
            m = weights[key.replace("lora_A.weight", "lora_magnitude_vector")].double()
            w = w * (m / w.norm(dim=1))[:, None]
        out[module + ".weight"] = w
    return out


def thudm_prefix(values: torch.Tensor, cfg: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """THUDM get_prompt: (P, L*2*g*d) -> view(P, L*2, g, d), permute([2, 1, 0, 3, 4]).split(2): layer i's
    (key, value) = slots 2i, 2i+1, each (P, g, d) (ChatGLM-6B: g = heads, d = hidden / heads)."""
    P = values.shape[0]
    if "position_encoding_2d" in cfg:
        g, d = cfg["num_attention_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    else:
        g, d = cfg["multi_query_group_num"], cfg["kv_channels"]
    x = values.view(P, cfg["num_layers"] * 2, g, d).permute(1, 0, 2, 3)
    return [(x[2 * i], x[2 * i + 1]) for i in range(cfg["num_layers"])]


def double_state(base: Path) -> dict:
    """The THUDM checkpoint's tensors in float64, for the references with a prefix."""
    return {k: v.double() for k, v in tf.read_state_dict(base).items()}


def prefix_encoder_output(sd: dict, projection: bool) -> torch.Tensor:
    """THUDM's PrefixEncoder in plain torch (float64): the embedding, or embedding -> Linear -> tanh -> Linear."""
    p = "transformer.prefix_encoder."
    x = sd[p + "embedding.weight"].double()
    if projection:
        x = torch.tanh(x @ sd[p + "trans.0.weight"].double().T + sd[p + "trans.0.bias"].double())
        x = x @ sd[p + "trans.2.weight"].double().T + sd[p + "trans.2.bias"].double()
    return x


def load_checkpoint_state(base: Path, folded: dict) -> dict:
    """Native-model state dict of THUDM tensors (through the base conversion, not the adapter mapping)."""
    from glm_experiments.models.glm.layout import glm_config_from_thudm, map_v2_key

    cfg = json.loads((base / "config.json").read_text())
    config = glm_config_from_thudm(cfg)
    out = {}
    for key, tensor in folded.items():
        for target, value in map_v2_key(key, lambda t=tensor: t, config, cfg["num_layers"]) or []:
            out[target] = value
    return out


def run_convert(base: Path, family: str, adapter: Path, dst: Path, capsys=None) -> Path:
    rc = convert.main(["--family", family, "--src", str(base), "--dst", str(dst), "--adapter", str(adapter)])
    assert rc == 0
    assert (dst / "adapter").is_dir()
    return dst


def ids_for(family: str, tok) -> list[int]:
    return tf.sample_ids(family, tok)


# ----------------------------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("family,fmt,version,targets,flags", [
    ("chatglm3", "safetensors", "0.6", ["query_key_value"], {}),
    ("chatglm3", "bin", "0.10", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], {}),
    ("chatglm2", "bin", "0.6", ["query_key_value", "dense_h_to_4h"], {}),
    ("glm4", "safetensors", "0.10", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], {"use_rslora": True}),
    ("glm4", "bin", "0.10", ["query_key_value", "dense_4h_to_h"], {"use_dora": True}),
    ("chatglm3", "safetensors", "0.10", ["query_key_value", "dense"],
     {"rank_pattern": {"query_key_value": 2}, "alpha_pattern": {"dense": 2.0}}),
])
def test_lora_converted_matches_original(family, fmt, version, targets, flags, bases, tmp_path):
    from peft import PeftModel

    base = bases[family]
    r, alpha = 4, 8.0
    full = [t for t in V2_TARGETS if t.rsplit(".", 1)[-1] in targets]
    ranks = flags.get("rank_pattern", {})
    weights = lora_weights(family, base, full, r, dora=flags.get("use_dora", False), ranks=ranks)
    adapter = write_peft_adapter(tmp_path / "thudm_adapter", peft06_config(family, r, alpha, targets, version, **flags), weights, fmt)
    dst = run_convert(base, family, adapter, tmp_path / "out")

    saved = json.loads((dst / "adapter" / "adapter_config.json").read_text())
    expected_targets = {"query_key_value": ["q_proj", "k_proj", "v_proj"], "dense": ["o_proj"],
                        "dense_h_to_4h": ["gate_up_proj"], "dense_4h_to_h": ["down_proj"]}
    assert sorted(saved["target_modules"]) == sorted(n for t in targets for n in expected_targets[t])
    assert saved["r"] == r and saved["lora_alpha"] == alpha
    assert saved["use_rslora"] == flags.get("use_rslora", False) and saved["use_dora"] == flags.get("use_dora", False)

    model, tok = load_checkpoint(dst, family, torch.float32)
    model = PeftModel.from_pretrained(model, str(dst / "adapter")).eval()
    ids = ids_for(family, tok)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    def scale(module: str) -> float:
        name = module.rsplit(".", 1)[-1]
        rank, a = ranks.get(name, r), flags.get("alpha_pattern", {}).get(name, alpha)
        return a / math.sqrt(rank) if flags.get("use_rslora") else a / rank

    cfg = json.loads((base / "config.json").read_text())
    folded = fold_lora(tf.read_state_dict(base), weights, scale, dora=flags.get("use_dora", False))
    expected = tf.reference_chatglm2(folded, cfg, ids)
    assert_close(logits, expected, what=f"{family} LoRA {targets} logits")
    # the adapter really changes the output (a no-op adapter would pass too)
    plain = tf.reference_chatglm2(double_state(base), cfg, ids)
    assert (expected - plain).norm() > 1e-2 * plain.norm()


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_chatglm_v1_lora_loads_as_it_is(fmt, bases, tmp_path):
    """ChatGLM-6B keeps THUDM's module names: PEFT loads the original adapter directory itself, and convert writes
    the same keys in the current format."""
    from peft import PeftModel

    base = bases["chatglm"]
    r, alpha = 4, 16.0
    weights = lora_weights("chatglm", base, V1_TARGETS, r, seed=5)
    adapter = write_peft_adapter(tmp_path / "v1_adapter",
                                 peft06_config("chatglm", r, alpha, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
                                 weights, fmt)
    cfg = json.loads((base / "config.json").read_text())
    folded = fold_lora(tf.read_state_dict(base), weights, alpha / r)
    model, tok = load_checkpoint(base, "chatglm", torch.float32)
    ids = ids_for("chatglm", tok)
    expected = tf.reference_chatglm_v1(folded, cfg, ids)
    as_is = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        assert_close(as_is(input_ids=torch.tensor([ids])).logits[0], expected, what="v1 LoRA loaded as it is")

    dst = run_convert(base, "chatglm", adapter, tmp_path / "out")
    from safetensors.torch import load_file

    assert set(load_file(str(dst / "adapter" / "adapter_model.safetensors"))) == set(weights)
    model, _ = load_checkpoint(dst, "chatglm", torch.float32)
    converted = PeftModel.from_pretrained(model, str(dst / "adapter")).eval()
    with torch.no_grad():
        assert_close(converted(input_ids=torch.tensor([ids])).logits[0], expected, what="v1 LoRA converted")


# ----------------------------------------------------------------------------------------------- P-Tuning v2


def _ptuning_logits(dst: Path, family: str, ids: list[int]) -> torch.Tensor:
    from glm_experiments.methods import ptuning

    model, _ = load_checkpoint(dst, family, torch.float32)
    model = ptuning.load(model, dst / "adapter").eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("family,projection", [("chatglm2", False), ("chatglm2", True), ("chatglm3", True), ("glm4", False)])
def test_ptuning_main_checkpoint_matches_original(family, projection, bases, tmp_path):
    base = bases[family]
    ckpt = write_ptuning_main_checkpoint(tmp_path / "output" / "run" / "checkpoint-10", base, 5, projection)
    dst = run_convert(base, family, ckpt, tmp_path / "out")
    method = json.loads((dst / "adapter" / "method.json").read_text())
    assert method["method"] == "ptuning"
    assert method["settings"]["pre_seq_len"] == 5 and method["settings"]["prefix_projection"] is projection

    cfg = json.loads((base / "config.json").read_text())
    sd = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    x = prefix_encoder_output(sd, projection)
    _, tok = load_checkpoint(base, family, torch.float32)
    ids = ids_for(family, tok)
    expected = tf.reference_chatglm2(double_state(base), cfg, ids, prefix=thudm_prefix(x, cfg))
    assert_close(_ptuning_logits(dst, family, ids), expected, what=f"{family} ptuning/main.py prefix logits")
    plain = tf.reference_chatglm2(double_state(base), cfg, ids)
    assert (expected - plain).norm() > 1e-2 * plain.norm()  # the prefix matters


@pytest.mark.parametrize("projection", [False, True])
def test_chatglm_v1_ptuning_main_checkpoint_matches_original(projection, bases, tmp_path):
    """ChatGLM-6B's ptuning/main.py (the most used P-Tuning v2 script): its PrefixEncoder embeds into hidden_size
    when projecting."""
    base = bases["chatglm"]
    ckpt = write_ptuning_main_checkpoint(tmp_path / "checkpoint-3000", base, 3, projection)
    dst = run_convert(base, "chatglm", ckpt, tmp_path / "out")
    cfg = json.loads((base / "config.json").read_text())
    sd = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    x = prefix_encoder_output(sd, projection)
    _, tok = load_checkpoint(base, "chatglm", torch.float32)
    ids = ids_for("chatglm", tok)
    expected = tf.reference_chatglm_v1(double_state(base), cfg, ids, prefix=thudm_prefix(x, cfg))
    assert_close(_ptuning_logits(dst, "chatglm", ids), expected, what="ChatGLM-6B ptuning/main.py prefix logits")
    plain = tf.reference_chatglm_v1(double_state(base), cfg, ids)
    assert (expected - plain).norm() > 1e-2 * plain.norm()  # the prefix matters


def test_full_model_save_with_prefix_encoder(bases, tmp_path):
    """A P-Tuning v2 run that saved the whole model (finetune_demo with THUDM's pre_seq_len, or ptuning/main.py
    without its prefix-only save): sharded safetensors + index; the prefix encoder is taken, the base ignored."""
    base = bases["chatglm3"]
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(pre_seq_len=4, prefix_projection=False)
    ckpt = tmp_path / "checkpoint-500"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(cfg))
    table = torch.randn(4, cfg["num_layers"] * 2 * cfg["kv_channels"] * cfg["multi_query_group_num"])
    fx._save_shards(ckpt, {**fx.chatglm2_state_dict(cfg), "transformer.prefix_encoder.embedding.weight": table},
                    fmt="safetensors", shards=2)
    dst = run_convert(base, "chatglm3", ckpt, tmp_path / "out")
    _, tok = load_checkpoint(base, "chatglm3", torch.float32)
    ids = ids_for("chatglm3", tok)
    expected = tf.reference_chatglm2(double_state(base), cfg, ids, prefix=thudm_prefix(table.double(), cfg))
    assert_close(_ptuning_logits(dst, "chatglm3", ids), expected, what="full-save prefix logits")


def test_peft_prefix_tuning_with_projection_encoder(bases, tmp_path):
    """PREFIX_TUNING saved with its encoder (prompt_encoder.<adapter>.embedding / transform.{0,2}) instead of the
    computed prompt_embeddings."""
    base = bases["glm4"]
    cfg = json.loads((base / "config.json").read_text())
    token_dim, L, hid, P = cfg["kv_channels"] * cfg["multi_query_group_num"], cfg["num_layers"], 24, 5
    gen = torch.Generator().manual_seed(7)
    w = {"base_model.prompt_encoder.default.embedding.weight": torch.randn(P, token_dim, generator=gen),
         "base_model.prompt_encoder.default.transform.0.weight": torch.randn(hid, token_dim, generator=gen) * 0.2,
         "base_model.prompt_encoder.default.transform.0.bias": torch.randn(hid, generator=gen) * 0.1,
         "base_model.prompt_encoder.default.transform.2.weight": torch.randn(L * 2 * token_dim, hid, generator=gen) * 0.5,
         "base_model.prompt_encoder.default.transform.2.bias": torch.randn(L * 2 * token_dim, generator=gen) * 0.1}
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": P, "token_dim": token_dim,
              "num_layers": L, "num_attention_heads": cfg["multi_query_group_num"], "num_transformer_submodules": 1,
              "encoder_hidden_size": hid, "prefix_projection": True, "base_model_name_or_path": "THUDM/glm-4-9b-chat"}
    adapter = write_peft_adapter(tmp_path / "pt", config, w, "bin")
    dst = run_convert(base, "glm4", adapter, tmp_path / "out")
    v = {k.rsplit("default.", 1)[1]: t.double() for k, t in w.items()}
    x = torch.tanh(v["embedding.weight"] @ v["transform.0.weight"].T + v["transform.0.bias"])
    x = x @ v["transform.2.weight"].T + v["transform.2.bias"]
    _, tok = load_checkpoint(base, "glm4", torch.float32)
    ids = ids_for("glm4", tok)
    expected = tf.reference_chatglm2(double_state(base), cfg, ids, prefix=thudm_prefix(x, cfg))
    assert_close(_ptuning_logits(dst, "glm4", ids), expected, what="PEFT PREFIX_TUNING (encoder) logits")


@pytest.mark.parametrize("family,fmt", [("chatglm3", "safetensors"), ("glm4", "bin"), ("chatglm2", "bin")])
def test_peft_prefix_tuning_matches_original(family, fmt, bases, tmp_path):
    base = bases[family]
    adapter = write_peft_prefix_adapter(tmp_path / "pt", family, base, 6, fmt)
    dst = run_convert(base, family, adapter, tmp_path / "out")
    cfg = json.loads((base / "config.json").read_text())
    table = (torch.load(adapter / "adapter_model.bin", weights_only=True) if fmt == "bin"
             else __import__("safetensors.torch").torch.load_file(str(adapter / "adapter_model.safetensors")))["prompt_embeddings"]
    _, tok = load_checkpoint(base, family, torch.float32)
    ids = ids_for(family, tok)
    expected = tf.reference_chatglm2(double_state(base), cfg, ids, prefix=thudm_prefix(table.double(), cfg))
    assert_close(_ptuning_logits(dst, family, ids), expected, what=f"{family} PEFT PREFIX_TUNING logits")


# ----------------------------------------------------------------------------------------------- errors


def _lora_dir(bases, tmp_path, family="chatglm3", mutate=None, config_extra=None, fmt="safetensors"):
    weights = lora_weights(family, bases[family], ["self_attention.query_key_value"] if family != "chatglm"
                           else ["attention.query_key_value"], 4)
    if mutate:
        weights = mutate(weights)
    return write_peft_adapter(tmp_path / "bad", peft06_config(family, 4, 8, ["query_key_value"], **(config_extra or {})), weights, fmt)


def _convert_error(base, family, adapter, tmp_path, capsys) -> str:
    rc = convert.main(["--family", family, "--src", str(base), "--dst", str(tmp_path / "out"), "--adapter", str(adapter)])
    err = capsys.readouterr().err
    assert rc == 2  # bad input
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    return err


def test_error_unknown_target_module(bases, tmp_path, capsys):
    def mutate(w):
        key = next(iter(w))
        w[key.replace("self_attention.query_key_value", "self_attention.rotary")] = w.pop(key)
        return w

    adapter = _lora_dir(bases, tmp_path, mutate=mutate)
    err = _convert_error(bases["chatglm3"], "chatglm3", adapter, tmp_path, capsys)
    assert "adapter_model.safetensors: key base_model.model.transformer.encoder.layers.0.self_attention.rotary.lora_A.weight" in err
    assert "unknown target module" in err


def test_error_shape_mismatch(bases, tmp_path, capsys):
    def mutate(w):
        key = "base_model.model.transformer.encoder.layers.1.self_attention.query_key_value.lora_B.weight"
        w[key] = w[key][:-16]
        return w

    adapter = _lora_dir(bases, tmp_path, mutate=mutate, fmt="bin")
    err = _convert_error(bases["chatglm3"], "chatglm3", adapter, tmp_path, capsys)
    assert "adapter_model.bin: key base_model.model.transformer.encoder.layers.1.self_attention.query_key_value.lora_B.weight has shape (112, 4), expected (128, r)" in err


def test_error_lora_made_for_a_wider_model(bases, tmp_path, capsys):
    """Every lora_A twice as wide as this base's hidden size (a LoRA of another model size): refused, nothing written."""
    def mutate(w):
        return {k: torch.cat([v, v], dim=1) if "lora_A" in k else v for k, v in w.items()}

    adapter = _lora_dir(bases, tmp_path, mutate=mutate)
    err = _convert_error(bases["chatglm3"], "chatglm3", adapter, tmp_path, capsys)
    assert re.search(r"adapter_model.safetensors: key \S+lora_A.weight has shape \(4, (\d+)\), expected \(r, \d+\) "
                     "for this base", err), err


def test_error_wrong_family(bases, tmp_path, capsys):
    v1_adapter = _lora_dir(bases, tmp_path, family="chatglm")
    err = _convert_error(bases["chatglm3"], "chatglm3", v1_adapter, tmp_path, capsys)
    assert "adapter_config.json: key base_model_name_or_path='THUDM/chatglm-6b' is a chatglm model, but the base is family chatglm3" in err
    shutil.rmtree(v1_adapter)
    v1_adapter = _lora_dir(bases, tmp_path, family="chatglm", config_extra={"base_model_name_or_path": "/data/my-model"})
    err = _convert_error(bases["chatglm3"], "chatglm3", v1_adapter, tmp_path, capsys)
    assert "transformer.layers.0.attention.query_key_value.lora_A.weight is a ChatGLM-6B (v1) module name" in err
    shutil.rmtree(v1_adapter)

    glm4_named = _lora_dir(bases, tmp_path, config_extra={"base_model_name_or_path": "THUDM/glm-4-9b-chat"})
    err = _convert_error(bases["chatglm3"], "chatglm3", glm4_named, tmp_path, capsys)
    assert "adapter_config.json: key base_model_name_or_path='THUDM/glm-4-9b-chat' is a glm4 model, but the base is family chatglm3" in err

    with pytest.raises(CheckpointError, match=r"ChatGLM2/3/GLM-4 module name"):
        convert_adapter(glm4_named, tmp_path / "x", json.loads((bases["chatglm"] / "config.json").read_text()))


def test_error_prefix_width_and_length(bases, tmp_path, capsys):
    ckpt = write_ptuning_main_checkpoint(tmp_path / "ckpt", bases["chatglm3"], 4, False)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["pre_seq_len"] = 8
    (ckpt / "config.json").write_text(json.dumps(cfg))
    err = _convert_error(bases["chatglm3"], "chatglm3", ckpt, tmp_path, capsys)
    assert "config.json: key pre_seq_len=8, but pytorch_model.bin's transformer.prefix_encoder.embedding.weight has 4 rows" in err

    v1_cfg = json.loads((bases["chatglm"] / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"a ChatGLM2/3/GLM-4 config; the base is another family"):
        convert_adapter(ckpt, tmp_path / "y", v1_cfg)


def test_error_unconvertible_config_fields(bases, tmp_path, capsys):
    adapter = _lora_dir(bases, tmp_path, config_extra={"fan_in_fan_out": True})
    err = _convert_error(bases["chatglm3"], "chatglm3", adapter, tmp_path, capsys)
    assert "adapter_config.json: key fan_in_fan_out=True cannot be converted" in err


# ----------------------------------------------------------------------------------------------- predict / init_from


def _adgen_file(path: Path) -> Path:
    rows = [{"content": "类型#裙*颜色#蓝色*风格#简约", "summary": "简约的蓝色连衣裙，宽松显瘦。"},
            {"content": "类型#上衣*材质#棉", "summary": "柔软舒适的棉质上衣。"},
            {"content": "类型#裤*风格#休闲", "summary": "休闲的裤子，适合夏天穿着。"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["lora", "ptuning"])
def test_predict_with_foreign_adapter(kind, bases, tmp_path, monkeypatch, capsys):
    from glm_experiments import predict

    monkeypatch.setenv("GLM_EXPERIMENTS_CACHE", str(tmp_path / "cache"))
    base = bases["chatglm3"]
    if kind == "lora":
        weights = lora_weights("chatglm3", base, V2_TARGETS, 4)
        adapter = write_peft_adapter(tmp_path / "finetune_demo_lora", peft06_config("chatglm3", 4, 8, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]), weights, "safetensors")
    else:
        adapter = write_ptuning_main_checkpoint(tmp_path / "checkpoint-10", base, 4, True)
    out = tmp_path / "preds.jsonl"
    rc = predict.main(["--model-path", str(base), "--family", "chatglm3", "--adapter", str(adapter), "--input",
                       str(_adgen_file(tmp_path / "dev.json")), "--output", str(out), "--max-new-tokens", "4",
                       "--device", "cpu", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["method"] == kind and summary["samples"] == 3 and summary["adapter"] == str(adapter)
    assert set(summary["metrics"]) == {"bleu-4", "rouge-1", "rouge-2", "rouge-l"}
    assert "metrics (3 samples): bleu-4" in captured.err
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3
    assert len(list((tmp_path / "cache" / "adapters").glob("*/method.json"))) == 1  # converted once, into the cache


def test_predict_foreign_adapter_error_is_one_line(bases, tmp_path, monkeypatch, capsys):
    from glm_experiments import predict

    monkeypatch.setenv("GLM_EXPERIMENTS_CACHE", str(tmp_path / "cache"))
    adapter = write_ptuning_main_checkpoint(tmp_path / "ckpt", bases["chatglm3"], 4, False)
    cfg = json.loads((adapter / "config.json").read_text())
    cfg["num_layers"] = 3
    torch.save({"transformer.prefix_encoder.embedding.weight": torch.zeros(4, 3 * 2 * 32)}, adapter / "pytorch_model.bin")
    (adapter / "config.json").write_text(json.dumps(cfg))
    rc = predict.main(["--model-path", str(bases["chatglm3"]), "--family", "chatglm3", "--adapter", str(adapter),
                       "--input", str(_adgen_file(tmp_path / "dev.json")), "--device", "cpu"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert rc == 2 and len(err) == 1
    assert "pytorch_model.bin: key transformer.prefix_encoder.embedding.weight gives 192 values per prefix token" in err[0]


@pytest.mark.parametrize("kind", ["lora", "ptuning"])
def test_training_starts_from_foreign_adapter(kind, bases, tmp_path, monkeypatch):
    """method.init_from=<THUDM adapter>: the run trains the converted adapter (with lr 0 it saves it unchanged) and
    logs the loss it starts from at step 0."""
    from safetensors.torch import load_file

    from tests.helpers.common import ROOT, run_cli

    monkeypatch.setenv("GLM_EXPERIMENTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the CLI of this checkout, whatever is installed
    base = bases["chatglm3"]
    if kind == "lora":
        weights = lora_weights("chatglm3", base, ["self_attention.query_key_value", "mlp.dense_4h_to_h"], 4)
        adapter = write_peft_adapter(tmp_path / "lora", peft06_config("chatglm3", 4, 8, ["query_key_value", "dense_4h_to_h"]), weights, "bin")
        method = ["method=lora", "method.r=4", "method.alpha=8"]
        weights_file = "adapter_model.safetensors"
    else:
        adapter = write_ptuning_main_checkpoint(tmp_path / "checkpoint-10", base, 4, False)
        method = ["method=ptuning", "method.pre_seq_len=4"]
        weights_file = "prefix_encoder.safetensors"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli([*method, f"method.init_from={adapter}", "model=chatglm3", f"model.path={base}", "model.dtype=float32",
                      "train.max_steps=1", "train.learning_rate=1e-12", "train.per_device_train_batch_size=4",
                      "data.max_train_samples=8", "data.dev_file=null", "eval.before_training=false",
                      f"tracking.tracking_uri={uri}", "tracking.experiment_name=init_from", f"hydra.run.dir={tmp_path / 'run'}"],
                     tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "method.init_from: loss before the first update" in (tmp_path / "run" / "__main__.log").read_text()
    converted = next((tmp_path / "cache" / "adapters").glob("*/method.json")).parent
    start, end = load_file(str(converted / weights_file)), load_file(str(tmp_path / "run" / "adapter" / weights_file))
    assert set(start) == set(end)
    for key in start:  # one AdamW step of lr 1e-12 moves each weight by ~1e-12: the adapter is where training began
        assert_close(end[key], start[key], rel=1e-6, what=key)

    import mlflow

    run_id = json.loads((tmp_path / "run" / "result.json").read_text())["run_id"]
    history = mlflow.MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train/init_from_loss")
    assert [m.step for m in history] == [0]

    # that loss is the original adapter's on the run's first 4 samples, not the bare base's
    from glm_experiments.data.dataset import load_split, make_collator
    from glm_experiments.data.templates import get_template
    from tests.helpers.common import compose

    cfg = compose(["model=chatglm3", f"model.path={base}"])
    model, tok = load_checkpoint(base, "chatglm3", torch.float32)
    rows, _, _ = load_split(cfg.data.train_file, tok, get_template("chatglm3"), cfg.data, tmp_path / "tok")
    batch = make_collator(cfg.train, tok.pad_token_id)([rows[i] for i in range(4)])
    with torch.no_grad():
        base_loss = float(model(**batch).loss)
    if kind == "lora":
        folded = fold_lora(tf.read_state_dict(base), weights, 8 / 4)
        model.load_state_dict({k: v.float() for k, v in load_checkpoint_state(base, folded).items()}, strict=False)
    else:
        from glm_experiments.methods import ptuning
        from glm_experiments.migration.thudm_adapter_files import read_weights

        # the prefix encoder built by hand from the THUDM file (not through the converter)
        state = {k.removeprefix("transformer.prefix_encoder."): v.float() for k, v in read_weights(adapter / "pytorch_model.bin").items()
                 if k.startswith("transformer.prefix_encoder.")}
        pre_seq_len, embedding_dim = state["embedding.weight"].shape
        settings = {"pre_seq_len": pre_seq_len, "prefix_projection": "trans.0.weight" in state,
                    "prefix_hidden_size": state["trans.0.weight"].shape[0] if "trans.0.weight" in state else 512}
        model = ptuning.apply(model, settings, embedding_dim=embedding_dim)
        model.prefix_encoder.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        adapter_loss = float(model(**batch).loss)
    assert abs(history[0].value - adapter_loss) <= 1e-5 * adapter_loss
    assert abs(adapter_loss - base_loss) > 1e-4 * base_loss  # (random tiny weights: the adapter moves it a little)


# ----------------------------------------------------------------------------------------------- v1 fidelity


def test_chatglm_v1_residual_alpha_is_sqrt_56_for_any_depth(bases):
    """The original builds GLMBlock without passing num_layers (default 28): a 2-layer checkpoint uses sqrt(56)."""
    model, tok = load_checkpoint(bases["chatglm"], "chatglm", torch.float32)
    assert model.config.num_hidden_layers == 2
    assert all(layer.alpha == math.sqrt(56) for layer in model.transformer.layers)
    cfg = json.loads((bases["chatglm"] / "config.json").read_text())
    ids = ids_for("chatglm", tok)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    sd = double_state(bases["chatglm"])
    assert_close(logits, tf.reference_chatglm_v1(sd, cfg, ids), what="v1 logits, alpha sqrt(56)")
    for layer in model.transformer.layers:  # the config's depth would give another model
        layer.alpha = math.sqrt(2 * 2)
    with torch.no_grad():
        other = model(input_ids=torch.tensor([ids])).logits[0]
    assert (other - logits).norm() > 1e-2 * logits.norm()
