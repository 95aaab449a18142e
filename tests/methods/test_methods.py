"""Fine-tuning methods on a tiny native GLM (hidden 64, 2 layers, vocab 128): train, save, reload."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GlmConfig, GlmForCausalLM

from glm_experiments.methods import get_method, load_saved, lora, ptuning, qlora, trainable_summary
from glm_experiments.methods.freeze import FreezeMethodConfig
from glm_experiments.methods.full import FullMethodConfig
from glm_experiments.methods.lora import LoraMethodConfig
from glm_experiments.methods.prompt_tuning import PromptTuningMethodConfig
from glm_experiments.methods.ptuning import PtuningMethodConfig
from glm_experiments.methods.qlora import QloraMethodConfig
from glm_experiments.migration.thudm_adapters import load_adapter
from tests.helpers.common import assert_close

torch.set_num_threads(1)

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 128, 64, 2, 4, 2, 16
KV_DIM = KV_HEADS * HEAD_DIM


def make_model(seed: int = 0) -> GlmForCausalLM:
    torch.manual_seed(seed)
    config = GlmConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attention_bias=True,
    )
    return GlmForCausalLM(config)


def batch():
    """Two right-padded samples, as the training collator makes them."""
    ids = torch.tensor([[5, 17, 33, 40, 41, 42, 43, 2], [7, 9, 11, 60, 61, 2, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 6 + [0, 0]])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # prompt tokens carry no loss
    return ids, mask, labels


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train(model, steps: int = 6, lr: float = 1e-2) -> list[float]:
    torch.manual_seed(123)
    ids, mask, labels = batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def eval_logits(model) -> torch.Tensor:
    ids, mask, _ = batch()
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def linear_shapes(model, names) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for n, m in model.named_modules() if n.split(".")[-1] in names]


# --------------------------------------------------------------------------- every method
CASES = {
    "freeze": (FreezeMethodConfig(name="freeze", num_last_layers=1), 1e-2, lambda n: "layers.1." in n),
    "freeze_patterns": (
        FreezeMethodConfig(name="freeze", trainable_patterns=["lm_head", "layers.0.mlp."]),
        1e-2,
        lambda n: n.startswith("lm_head") or ".layers.0.mlp." in n,
    ),
    "lora": (LoraMethodConfig(name="lora", r=4, alpha=8, dropout=0.0), 1e-2, lambda n: "lora_" in n),
    "dora": (LoraMethodConfig(name="dora", r=4, alpha=8, dropout=0.0), 1e-2, lambda n: "lora_" in n),
    "ptuning": (PtuningMethodConfig(name="ptuning", pre_seq_len=4), 1e-2, lambda n: n.startswith("prefix_encoder.")),
    "ptuning_projection": (
        PtuningMethodConfig(name="ptuning", pre_seq_len=4, prefix_projection=True, prefix_hidden_size=24),
        1e-2,
        lambda n: n.startswith("prefix_encoder."),
    ),
    "prompt_tuning": (
        PromptTuningMethodConfig(name="prompt_tuning", num_virtual_tokens=4),
        2e-2,
        lambda n: n.startswith("soft_prompt."),
    ),
    "full": (FullMethodConfig(name="full"), 1e-3, lambda n: True),
}


def expected_trainable(case: str, base) -> int:
    if case == "freeze":
        return sum(p.numel() for n, p in base.named_parameters() if "layers.1." in n)
    if case == "freeze_patterns":
        return sum(p.numel() for n, p in base.named_parameters() if n.startswith("lm_head") or ".layers.0.mlp." in n)
    if case == "lora":
        return sum(4 * (i + o) for i, o in linear_shapes(base, {"q_proj", "k_proj", "v_proj", "o_proj"}))
    if case == "dora":  # LoRA's A and B plus one magnitude per output row
        return sum(4 * (i + o) + o for i, o in linear_shapes(base, {"q_proj", "k_proj", "v_proj", "o_proj"}))
    if case == "ptuning":
        return 4 * LAYERS * 2 * KV_DIM
    if case == "ptuning_projection":
        return 4 * KV_DIM + (KV_DIM * 24 + 24) + (24 * LAYERS * 2 * KV_DIM + LAYERS * 2 * KV_DIM)
    if case == "prompt_tuning":
        return 4 * HIDDEN
    return sum(p.numel() for p in base.parameters())


@pytest.mark.parametrize("case", list(CASES))
def test_train_save_reload(case, tmp_path):
    cfg, lr, intended = CASES[case]
    method = get_method(cfg.name)
    base_total = sum(p.numel() for p in make_model().parameters())
    model = method.apply(make_model(), cfg)

    summary = trainable_summary(model)
    want = expected_trainable(case, make_model())
    assert summary["trainable"] == want
    extra = want if case in ("lora", "dora", "ptuning", "ptuning_projection", "prompt_tuning") else 0
    assert summary["total"] == base_total + extra
    assert summary["pct"] == pytest.approx(100.0 * want / summary["total"])

    before = params(model)
    losses = train(model, lr=lr)
    assert losses[-1] < losses[0], losses
    after = params(model)
    assert set(before) == set(after)
    for name in before:
        if intended(name):
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
        else:
            assert torch.equal(before[name], after[name]), f"{name} is frozen but changed"

    trained = eval_logits(model)
    method.save(model, tmp_path, cfg)
    saved = json.loads((tmp_path / "method.json").read_text())
    assert saved["method"] == cfg.name
    if case != "full":  # only the trainable part is written
        size = sum(f.stat().st_size for f in tmp_path.iterdir())
        assert size < 4 * want * 4 + 100_000

    reloaded = method.load(make_model(), tmp_path, cfg)
    assert_close(eval_logits(reloaded), trained, rel=1e-6, what="reloaded logits")
    # and via method.json alone
    again = load_saved(make_model(), tmp_path)
    assert_close(eval_logits(again), trained, rel=1e-6, what="logits via method.json")


def test_get_method_unknown():
    with pytest.raises(ValueError, match="unknown method 'adapter'"):
        get_method("adapter")


def test_freeze_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="num_last_layers must be in 1..2"):
        get_method("freeze").apply(make_model(), FreezeMethodConfig(name="freeze", num_last_layers=3))
    with pytest.raises(ValueError, match="no parameter name contains"):
        get_method("freeze").apply(make_model(), FreezeMethodConfig(name="freeze", trainable_patterns=["nope"]))
    freeze = get_method("freeze")
    model = freeze.apply(make_model(), FreezeMethodConfig(name="freeze", num_last_layers=1))
    freeze.save(model, tmp_path, FreezeMethodConfig(name="freeze", num_last_layers=1))
    with pytest.raises(ValueError, match="num_last_layers: configured 2, saved 1"):
        freeze.load(make_model(), tmp_path, FreezeMethodConfig(name="freeze", num_last_layers=2))


# --------------------------------------------------------------------------- LoRA
def test_lora_merge_matches_unmerged():
    cfg = LoraMethodConfig(name="lora", r=4, alpha=8, dropout=0.0)
    model = lora.apply(make_model(), cfg)
    train(model, steps=3)
    unmerged = eval_logits(model)
    merged = lora.merge(model)
    assert type(merged) is GlmForCausalLM
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert_close(eval_logits(merged), unmerged, what="merged logits")


def test_dora_is_one_module_and_one_yaml():
    """method=dora composes from conf/method/dora.yaml, trains, differs from LoRA, reloads and merges exactly."""
    from tests.helpers.common import compose

    cfg = compose(["method=dora", "method.dropout=0.0", "method.r=4", "method.alpha=8"]).method
    assert type(cfg._metadata.object_type).__name__ == "type" and cfg._metadata.object_type.__name__ == "DoraMethodConfig"
    method = get_method("dora")
    model = method.apply(make_model(), cfg)
    assert model.peft_config["default"].use_dora
    assert any("lora_magnitude_vector" in n and p.requires_grad for n, p in model.named_parameters())
    losses = train(model, steps=6)
    assert losses[-1] < losses[0]
    as_lora = lora.apply(make_model(), cfg)
    train(as_lora, steps=6)
    assert (eval_logits(as_lora) - eval_logits(model)).abs().max() > 1e-4  # the decomposition changes the result
    assert get_method("dora").packable and get_method("dora").merge_into_base is lora.merge
    unmerged = eval_logits(model)
    assert_close(eval_logits(method.merge(model)), unmerged, what="merged DoRA logits")


def test_lora_target_modules():
    base = make_model()
    assert lora.resolve_target_modules(base, LoraMethodConfig(name="lora")) == ["q_proj", "k_proj", "v_proj", "o_proj"]

    class V1:
        class config:
            model_type = "chatglm_v1"

    assert lora.default_target_modules(V1()) == ["query_key_value"]
    model = lora.apply(base, LoraMethodConfig(name="lora", r=2, target_modules=["all-linear"]))
    wrapped = {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_lora_reload_with_other_rank_fails(tmp_path):
    cfg = LoraMethodConfig(name="lora", r=4, alpha=8)
    lora.save(lora.apply(make_model(), cfg), tmp_path, cfg)
    with pytest.raises(ValueError, match="r: configured 8, saved 4"):
        lora.load(make_model(), tmp_path, LoraMethodConfig(name="lora", r=8, alpha=8))
    with pytest.raises(ValueError, match="method=lora"):
        ptuning.load(make_model(), tmp_path)


# --------------------------------------------------------------------------- QLoRA (configuration only)
def test_qlora_needs_cuda_and_bitsandbytes(monkeypatch):
    cfg = QloraMethodConfig(name="qlora")
    monkeypatch.setattr(qlora, "_cuda_available", lambda: False)
    with pytest.raises(RuntimeError, match="method=qlora needs a CUDA GPU and bitsandbytes: torch.cuda"):
        qlora.check_available()
    with pytest.raises(RuntimeError, match="method=qlora needs a CUDA GPU and bitsandbytes"):
        qlora.apply(make_model(), cfg)
    monkeypatch.setattr(qlora, "_cuda_available", lambda: True)
    monkeypatch.setattr(qlora, "_bitsandbytes_importable", lambda: False)
    with pytest.raises(RuntimeError, match="bitsandbytes is not installed"):
        qlora.check_available()
    with pytest.raises(RuntimeError, match="method=qlora needs a CUDA GPU and bitsandbytes"):
        qlora.quantization_config(cfg)


def test_qlora_quantization_config(monkeypatch):
    monkeypatch.setattr(qlora, "_bitsandbytes_importable", lambda: True)
    q4 = qlora.quantization_config(QloraMethodConfig(name="qlora"))
    assert q4.load_in_4bit and not q4.load_in_8bit
    assert q4.bnb_4bit_quant_type == "nf4"
    assert q4.bnb_4bit_use_double_quant is True
    assert q4.bnb_4bit_compute_dtype == torch.bfloat16
    q8 = qlora.quantization_config(QloraMethodConfig(name="qlora", bits=8))
    assert q8.load_in_8bit and not q8.load_in_4bit
    fp4 = qlora.quantization_config(QloraMethodConfig(name="qlora", quant_type="fp4", double_quant=False, compute_dtype="float16"))
    assert (fp4.bnb_4bit_quant_type, fp4.bnb_4bit_use_double_quant, fp4.bnb_4bit_compute_dtype) == ("fp4", False, torch.float16)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        qlora.quantization_config(QloraMethodConfig(name="qlora", bits=3))
    # an unquantised base is refused even where CUDA and bitsandbytes exist
    monkeypatch.setattr(qlora, "_cuda_available", lambda: True)
    with pytest.raises(ValueError, match="not quantised"):
        qlora.apply(make_model(), QloraMethodConfig(name="qlora"))


# --------------------------------------------------------------------------- P-Tuning v2
def loss_and_grads(model, seed=7):
    ids, mask, labels = batch()
    model.zero_grad()
    torch.manual_seed(seed)  # prefix dropout is active: same draws in both runs
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("projection", [False, True])
def test_ptuning_gradient_checkpointing_matches(projection):
    cfg = PtuningMethodConfig(name="ptuning", pre_seq_len=4, prefix_projection=projection, prefix_hidden_size=24)
    model = ptuning.apply(make_model(), cfg)
    model.train()
    loss, grads = loss_and_grads(model)
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    loss_ckpt, grads_ckpt = loss_and_grads(model)
    assert_close(loss, loss_ckpt, what="loss")
    assert set(grads) == set(grads_ckpt) and all(g.abs().sum() > 0 for g in grads.values())
    for name in grads:
        assert_close(grads_ckpt[name], grads[name], what=name)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("prefix_encoder."))


def test_ptuning_reentrant_checkpointing_is_refused():
    model = ptuning.apply(make_model(), PtuningMethodConfig(name="ptuning", pre_seq_len=4))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match="use_reentrant"):
        model(input_ids=ids, attention_mask=mask, labels=labels)


def _generation_checks(model):
    """Left-padded batched greedy decoding == each sample alone == a plain forward's argmax."""
    model.eval()
    a, b = [5, 17, 33, 40, 41], [7, 9, 11]
    ids = torch.tensor([a, [0, 0] + b])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    together = model.generate(input_ids=ids, attention_mask=mask, **kw)
    alone_a = model.generate(input_ids=torch.tensor([a]), **kw)
    alone_b = model.generate(input_ids=torch.tensor([b]), **kw)
    assert together[0].tolist() == alone_a[0].tolist()
    assert together[1, 2:].tolist() == alone_b[0].tolist()
    with torch.no_grad():
        logits = model(input_ids=alone_a).logits
    assert logits.shape[1] == alone_a.shape[1]
    assert logits[0, 4:-1].argmax(-1).tolist() == alone_a[0, 5:].tolist()


def test_ptuning_generate_left_padding():
    model = ptuning.apply(make_model(), PtuningMethodConfig(name="ptuning", pre_seq_len=4))
    torch.manual_seed(0)
    with torch.no_grad():  # a small prefix: the continuation depends on the text, not only the prefix
        model.prefix_encoder.embedding.weight.mul_(0.1)
    _generation_checks(model)


def test_ptuning_positions_start_at_zero():
    model = ptuning.apply(make_model(), PtuningMethodConfig(name="ptuning", pre_seq_len=3))
    model.eval()
    seen = {}
    rotary = model.model.rotary_emb
    orig = rotary.forward

    def spy(x, position_ids, *args, **kwargs):
        seen.setdefault("pos", []).append(position_ids.clone())
        return orig(x, position_ids, *args, **kwargs)

    rotary.forward = spy
    ids = torch.tensor([[5, 17, 33], [0, 7, 9]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert seen["pos"][0].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert seen["pos"][1].tolist() == [[0, 1, 2], [0, 0, 1]]  # generate's prefill
    assert seen["pos"][2].tolist() == [[3], [2]]  # first decoding step


def test_ptuning_reload_with_other_settings_fails(tmp_path):
    cfg = PtuningMethodConfig(name="ptuning", pre_seq_len=4)
    ptuning.save(ptuning.apply(make_model(), cfg), tmp_path, cfg)
    assert {p.name for p in tmp_path.iterdir()} == {"prefix_encoder.safetensors", "method.json"}
    with pytest.raises(ValueError, match="pre_seq_len: configured 8, saved 4"):
        ptuning.load(make_model(), tmp_path, PtuningMethodConfig(name="ptuning", pre_seq_len=8))
    with pytest.raises(ValueError, match="prefix_projection: configured True, saved False"):
        ptuning.load(make_model(), tmp_path, PtuningMethodConfig(name="ptuning", pre_seq_len=4, prefix_projection=True))
    with pytest.raises(ValueError, match="already applied"):
        ptuning.apply(ptuning.load(make_model(), tmp_path, cfg), cfg)


def _thudm_split(encoder_out: torch.Tensor, batch_size: int, pre_seq_len: int):
    """ChatGLM2's get_prompt(): view, permute([2, 1, 0, 3, 4]).split(2)."""
    past = encoder_out.view(batch_size, pre_seq_len, LAYERS * 2, KV_HEADS, HEAD_DIM)
    return past.permute([2, 1, 0, 3, 4]).split(2)


@pytest.mark.parametrize("layout", ["plain", "projection", "chatglm2_projection"])
def test_import_thudm_prefix(layout, tmp_path):
    torch.manual_seed(3)
    pre_seq_len, hidden, out_dim = 5, 40, LAYERS * 2 * KV_DIM
    emb_dim = {"plain": out_dim, "projection": KV_DIM, "chatglm2_projection": out_dim}[layout]
    state = {
        "transformer.prefix_encoder.embedding.weight": torch.randn(pre_seq_len, emb_dim).half(),
        "transformer.encoder.final_layernorm.weight": torch.ones(HIDDEN).half(),  # other keys are ignored
    }
    if layout != "plain":
        state["transformer.prefix_encoder.trans.0.weight"] = torch.randn(hidden, emb_dim).half()
        state["transformer.prefix_encoder.trans.0.bias"] = torch.randn(hidden).half()
        state["transformer.prefix_encoder.trans.2.weight"] = torch.randn(out_dim, hidden).half()
        state["transformer.prefix_encoder.trans.2.bias"] = torch.randn(out_dim).half()
    torch.save(state, tmp_path / "pytorch_model.bin")
    # ptuning/main.py saves the model's config.json beside the weights
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "pre_seq_len": pre_seq_len,
                                                      "prefix_projection": layout != "plain"}))

    def import_prefix(cfg=None):
        return load_adapter(make_model(), tmp_path, method_cfg=cfg, is_trainable=True)[0]

    model = import_prefix(PtuningMethodConfig(name="ptuning", pre_seq_len=pre_seq_len, prefix_projection=layout != "plain", prefix_hidden_size=hidden))
    enc = model.prefix_encoder
    assert enc.pre_seq_len == pre_seq_len and enc.prefix_projection == (layout != "plain")
    assert torch.equal(enc.embedding.weight, state["transformer.prefix_encoder.embedding.weight"].float())
    enc.eval()
    x = state["transformer.prefix_encoder.embedding.weight"].float()
    if layout != "plain":
        w0, b0 = (state[f"transformer.prefix_encoder.trans.0.{k}"].float() for k in ("weight", "bias"))
        w2, b2 = (state[f"transformer.prefix_encoder.trans.2.{k}"].float() for k in ("weight", "bias"))
        x = torch.tanh(x @ w0.T + b0) @ w2.T + b2
    reference = _thudm_split(x.unsqueeze(0).expand(2, -1, -1), 2, pre_seq_len)
    with torch.no_grad():
        keys, values = enc(2)
    for i in range(LAYERS):
        # THUDM: (2, P, b, kv_heads, head_dim) per layer -> ours (b, kv_heads, P, head_dim)
        assert_close(keys[i], reference[i][0].permute(1, 2, 0, 3), what=f"keys {i}")
        assert_close(values[i], reference[i][1].permute(1, 2, 0, 3), what=f"values {i}")

    # the imported encoder saves and reloads like a trained one
    model.eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    ptuning.save(model, tmp_path / "saved", None)
    again = ptuning.load(make_model(), tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, want)

    with pytest.raises(ValueError, match="pre_seq_len: configured 9, saved 5"):
        import_prefix(PtuningMethodConfig(name="ptuning", pre_seq_len=9, prefix_projection=layout != "plain", prefix_hidden_size=hidden))


def test_import_thudm_prefix_wrong_model(tmp_path):
    torch.save({"transformer.prefix_encoder.embedding.weight": torch.zeros(4, 3 * 2 * KV_DIM)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "pre_seq_len": 4}))
    with pytest.raises(ValueError, match="needs num_layers\\*2\\*kv_heads\\*head_dim = 2\\*2\\*2\\*16 = 128"):
        load_adapter(make_model(), tmp_path)


# --------------------------------------------------------------------------- prompt tuning
def test_prompt_tuning_generate_left_padding():
    model = get_method("prompt_tuning").apply(make_model(), PromptTuningMethodConfig(name="prompt_tuning", num_virtual_tokens=3))
    _generation_checks(model)


def test_prompt_tuning_init_text_and_mismatch(tmp_path):
    pt = get_method("prompt_tuning")

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % VOCAB for c in text]}

    cfg = PromptTuningMethodConfig(name="prompt_tuning", num_virtual_tokens=5, init_text="abc")
    with pytest.raises(ValueError, match="needs the tokenizer"):
        pt.apply(make_model(), cfg)
    model = pt.apply(make_model(), cfg, tokenizer=Tok())
    rows = [ord(c) % VOCAB for c in "abcab"]
    assert torch.equal(model.soft_prompt.embedding.weight, model.get_input_embeddings().weight[rows])
    pt.save(model, tmp_path, cfg)
    with pytest.raises(ValueError, match="num_virtual_tokens: configured 4, saved 5"):
        pt.load(make_model(), tmp_path, PromptTuningMethodConfig(name="prompt_tuning", num_virtual_tokens=4))


# --------------------------------------------------------------------------- ChatGLM-6B (v1) class
def make_v1_model(seed: int = 0):
    v1 = pytest.importorskip("glm_experiments.models.chatglm.modeling")
    torch.manual_seed(seed)
    config = v1.ChatGLMv1Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=128, bos_token_id=4, eos_token_id=5, mask_token_id=6, gmask_token_id=7, pad_token_id=3,
    )
    return v1.ChatGLMv1ForCausalLM(config)


def test_ptuning_on_chatglm_v1():
    model = ptuning.apply(make_v1_model(), PtuningMethodConfig(name="ptuning", pre_seq_len=3))
    assert model.prefix_encoder.embedding.weight.shape == (3, LAYERS * 2 * HIDDEN)  # v1: kv_dim = hidden
    ids = torch.tensor([[20, 21, 22, 7, 4, 40, 41, 5], [30, 31, 7, 4, 50, 5, 3, 3]])
    mask = torch.tensor([[1] * 8, [1] * 6 + [0, 0]])
    labels = ids.masked_fill(mask == 0, -100)
    model.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.zero_grad()
        torch.manual_seed(7)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads.append((loss.detach(), model.prefix_encoder.embedding.weight.grad.clone()))
    assert_close(grads[1][0], grads[0][0], what="loss")
    assert_close(grads[1][1], grads[0][1], what="prefix grad")
    assert grads[0][1].abs().sum() > 0

    model.gradient_checkpointing_disable()
    model.eval()
    a, b = [20, 21, 22, 7, 4], [30, 31, 7, 4]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=3, eos_token_id=None)
    together = model.generate(input_ids=torch.tensor([a, [3] + b]), attention_mask=torch.tensor([[1] * 5, [0, 1, 1, 1, 1]]), **kw)
    alone_a = model.generate(input_ids=torch.tensor([a]), **kw)
    alone_b = model.generate(input_ids=torch.tensor([b]), **kw)
    assert together[0].tolist() == alone_a[0].tolist()
    assert together[1, 1:].tolist() == alone_b[0].tolist()
    with torch.no_grad():
        logits = model(input_ids=alone_a).logits
    assert logits[0, 4:-1].argmax(-1).tolist() == alone_a[0, 5:].tolist()


def test_v1_lora_default_and_prompt_tuning_refused():
    model = lora.apply(make_v1_model(), LoraMethodConfig(name="lora", r=2))
    assert {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if "lora_A" in n} == {"query_key_value"}
    with pytest.raises(ValueError, match="prompt_tuning does not support chatglm_v1"):
        get_method("prompt_tuning").apply(make_v1_model(), PromptTuningMethodConfig(name="prompt_tuning"))


@pytest.mark.parametrize("name", ["ptuning", "prompt_tuning"])
def test_forward_override_keeps_signature_and_survives_deepcopy(name):
    import copy
    import inspect

    cfg = PtuningMethodConfig(name=name, pre_seq_len=3) if name == "ptuning" else PromptTuningMethodConfig(name=name, num_virtual_tokens=3)
    model = get_method(name).apply(make_model(), cfg)
    params = inspect.signature(model.forward).parameters
    assert list(params)[:3] == ["input_ids", "attention_mask", "position_ids"] and "labels" in params
    clone = copy.deepcopy(model)
    trainable = next(p for p in clone.parameters() if p.requires_grad)
    with torch.no_grad():
        trainable.add_(1.0)  # only the copy changes: its forward must use its own prefix / prompt
    assert not torch.equal(eval_logits(clone), eval_logits(model))
    clone_again = copy.deepcopy(model)
    assert torch.equal(eval_logits(clone_again), eval_logits(model))


def test_reload_with_the_composed_method_config(tmp_path):
    """The training run hands methods a DictConfig (lists are ListConfig): reload must accept it."""
    from omegaconf import OmegaConf

    from tests.helpers.common import compose

    cfg = OmegaConf.merge(compose(["method=freeze"]).method, {"num_last_layers": 1})
    model = get_method("freeze").apply(make_model(), cfg)
    get_method("freeze").save(model, tmp_path, cfg)
    reloaded = get_method("freeze").load(make_model(), tmp_path, cfg)
    assert torch.equal(eval_logits(reloaded), eval_logits(model))
