"""Methods on a quantized base (model.quantization), on the CPU with the real bitsandbytes: the project's tiny GLM
loaded by its own loader with the BitsAndBytesConfig the run would use, then trained, saved, reloaded, merged."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.common import ROOT, assert_close, compose

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e '.[qlora]')")

from glm_experiments.errors import UserError  # noqa: E402
from glm_experiments.methods import get_method  # noqa: E402
from glm_experiments.models.loading import load_model_and_tokenizer  # noqa: E402
from glm_experiments.methods.quantized_base import check, quantization_config  # noqa: E402
from glm_experiments.models.quantization import is_quantized  # noqa: E402

TEXTS = [json.loads(line)["summary"] for line in (ROOT / "data/adgen_demo/dev.json").read_text(encoding="utf-8")
         .splitlines()[:2]]


def _cfg(*overrides: str):
    return compose(["tracking=none", *overrides])


def _load(cfg, quantized: bool = True):
    model, tokenizer = load_model_and_tokenizer(cfg.model, quantization_config(cfg) if quantized else None)
    return model, tokenizer


def _batch(tokenizer):
    """Two demo prompts, each followed by a reply the pre-trained tiny model has never seen (a fixed random draw):
    a loss well above zero that fine-tuning brings down."""
    g = torch.Generator().manual_seed(0)
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:8] + torch.randint(10, len(tokenizer), (12,), generator=g).tolist()
            for t in TEXTS]
    ids = torch.tensor(rows)
    labels = ids.clone()
    labels[:, :8] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _train(model, inputs, steps: int = 8, lr: float = 1e-2) -> list[float]:
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def _logits(model, inputs) -> torch.Tensor:
    model.eval()
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()


def _layer_kinds(model) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for module in model.modules():
        name = type(module).__name__
        if name in ("Linear4bit", "Linear8bitLt"):
            kinds[name] = kinds.get(name, 0) + 1
    return kinds


def test_qlora_on_4bit_trains_saves_reloads_and_merges_into_full_precision(tmp_path):
    cfg = _cfg("method=qlora", "method.dropout=0")
    assert cfg.model.quantization is None  # qlora implies 4bit through its Method record
    base, tokenizer = _load(cfg)
    assert is_quantized(base) and _layer_kinds(base) == {"Linear4bit": 24}  # 4 layers x q/k/v/o/gate_up/down
    method = get_method("qlora")
    model = method.apply(base, cfg.method)
    inputs = _batch(tokenizer)
    losses = _train(model, inputs)
    assert losses[-1] < 0.7 * losses[0], losses
    method.save(model, tmp_path, cfg.method)
    trained = _logits(model, inputs)

    reloaded = method.load(_load(cfg)[0], tmp_path, cfg.method)
    assert_close(_logits(reloaded, inputs), trained, rel=1e-6, what="4-bit base + reloaded adapter")

    # merging: into a full-precision base (a 4-bit one is refused), equal to that base with the adapter unmerged
    with pytest.raises(ValueError, match="refusing to merge into a quantised base"):
        method.merge(reloaded)
    full = method.load(_load(cfg, quantized=False)[0], tmp_path, cfg.method)
    assert not is_quantized(full) and _layer_kinds(full) == {}
    unmerged = _logits(full, inputs)
    merged = method.merge(full)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert_close(_logits(merged, inputs), unmerged, rel=1e-5, what="merged vs unmerged on the bf16/fp32 base")
    # the 4-bit model computes nearly the same function (the quantization error only)
    assert (_logits(merged, inputs).softmax(-1) - trained.softmax(-1)).abs().max() < 0.1


@pytest.mark.parametrize("projection", [False, True])
def test_ptuning_v2_on_4bit_trains_saves_and_reloads(projection, tmp_path):
    cfg = _cfg("method=ptuning", "method.pre_seq_len=4", f"method.prefix_projection={projection}",
               "method.prefix_hidden_size=32", "method.prefix_dropout=0", "model.quantization=4bit")
    base, tokenizer = _load(cfg)
    method = get_method("ptuning")
    model = method.apply(base, cfg.method)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())  # the prefix in full precision
    assert _layer_kinds(model) == {"Linear4bit": 24}
    inputs = _batch(tokenizer)
    losses = _train(model, inputs, lr=5e-2)  # P-Tuning v2's rate is high (the seeds': 2e-2)
    assert losses[-1] < 0.8 * losses[0], losses
    method.save(model, tmp_path, cfg.method)
    trained = _logits(model, inputs)
    reloaded = method.load(_load(cfg)[0], tmp_path, cfg.method)
    assert_close(_logits(reloaded, inputs), trained, rel=1e-6, what="4-bit base + reloaded prefix encoder")


def test_prompt_tuning_and_freeze_on_4bit_train_in_full_precision():
    cfg = _cfg("method=prompt_tuning", "method.num_virtual_tokens=4", "model.quantization=4bit")
    base, tokenizer = _load(cfg)
    model = get_method("prompt_tuning").apply(base, cfg.method, tokenizer=tokenizer)
    inputs = _batch(tokenizer)
    losses = _train(model, inputs, steps=6, lr=5e-2)
    assert losses[-1] < losses[0], losses

    # freeze trains its layers: those are loaded unquantized, the others stay 4-bit
    cfg = _cfg("method=freeze", "method.num_last_layers=1", "model.quantization=4bit")
    base, _ = _load(cfg)
    model = get_method("freeze").apply(base, cfg.method)
    assert _layer_kinds(model) == {"Linear4bit": 18}  # layers 0-2; layer 3 is plain nn.Linear
    assert {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad} == {"3"}
    losses = _train(model, inputs, steps=4, lr=1e-3)
    assert losses[-1] < losses[0], losses


def test_8bit_base_for_ptuning():
    cfg = _cfg("method=ptuning", "method.pre_seq_len=4", "model.quantization=8bit")
    base, tokenizer = _load(cfg)
    assert _layer_kinds(base) == {"Linear8bitLt": 24}
    model = get_method("ptuning").apply(base, cfg.method)
    losses = _train(model, _batch(tokenizer), steps=4)
    assert losses[-1] < losses[0], losses


def test_refusals_are_one_line():
    with pytest.raises(UserError) as err:
        check(_cfg("method=full", "model.quantization=4bit"))
    assert str(err.value) == ("method=full cannot train on a quantized base (model.quantization=4bit): full fine-tuning "
                              "trains every base weight, and 4-bit/8-bit weights cannot be trained; use "
                              "model.quantization=null or a method that freezes the base")
    with pytest.raises(UserError, match=r"^model.quantization=4bit with deepspeed=zero2: a bitsandbytes base under "
                                        r"DeepSpeed is not supported here"):
        check(_cfg("method=qlora", "deepspeed=zero2"))
    with pytest.raises(UserError, match=r"model.quantization=2bit: expected one of 4bit, 8bit"):
        from glm_experiments.config.schema import check_settings

        check_settings(_cfg("model.quantization=2bit"))
    # a freeze pattern that maps onto its module is loaded in full precision ...
    cfg = _cfg("method=freeze", "method.trainable_patterns=[layers.0.mlp.down_proj.weight]", "model.quantization=4bit")
    model = get_method("freeze").apply(_load(cfg)[0], cfg.method)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.layers.0.mlp.down_proj.weight"]
    # ... and a quantized weight chosen to train (a base quantized for another method) is refused, not trained
    all_4bit, _ = _load(_cfg("method=lora", "model.quantization=4bit"))
    with pytest.raises(UserError, match="method=freeze: model.layers.0.mlp.down_proj.weight is quantized"):
        get_method("freeze").apply(all_4bit, cfg.method)


def test_without_a_usable_bitsandbytes_one_line_says_what_to_install(monkeypatch):
    import importlib.metadata
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(UserError) as missing:
        check(_cfg("method=qlora"))
    assert str(missing.value) == ("model.quantization=4bit needs bitsandbytes, which is not installed "
                                  "(pip install -e '.[qlora]'), or use model.quantization=null")
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.45.5" if name == "bitsandbytes" else real_version(name))
    with pytest.raises(UserError) as old:
        check(_cfg("method=ptuning", "model.quantization=8bit"))
    assert str(old.value) == ("model.quantization=8bit: no CUDA GPU here and bitsandbytes 0.45.5 has no CPU path "
                              "(>= 0.50 runs 4-bit and 8-bit layers on the CPU): pip install -U bitsandbytes, or use "
                              "model.quantization=null")
