"""train.loss_chunk_size (chunked cross-entropy) and train.packing: same numbers as the plain path, clear refusals."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from datasets import Dataset
from omegaconf import OmegaConf
from tests.methods.test_methods import CASES, batch, make_model, make_v1_model

from glm_experiments.data.dataset import CausalCollator, PackingCollator, make_collator
from glm_experiments.errors import UserError
from glm_experiments.methods import get_method, lora
from glm_experiments.methods.lora import LoraMethodConfig
from glm_experiments.recipe.losses import chunked_causal_lm_loss, chunked_loss
from glm_experiments.recipe.checks import check_train_options
from glm_experiments.recipe.train import GlmTrainer
from tests.helpers.common import assert_close, compose, run_cli


def loss_and_grads(model, chunk_size: int, num_items=None):
    ids, mask, labels = batch()
    model.zero_grad(set_to_none=True)
    kwargs = {"num_items_in_batch": num_items} if num_items is not None else {}
    with chunked_loss(model, chunk_size) if chunk_size else contextlib.nullcontext():
        out = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", ["lora", "ptuning", "prompt_tuning", "full"])
def test_chunked_loss_equals_full_logits(case):
    cfg = CASES[case][0]
    # float64 model: only transformers' reference loss rounds (it upcasts logits with .float(), i.e. to float32),
    # so the two paths differ by float32 rounding of the loss, ~1e-7 relative, on any CPU and BLAS
    model = get_method(cfg.name).apply(make_model(), cfg).double()
    model.eval()  # no dropout: both passes see the same function
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    for num_items in (None, torch.tensor(13)):  # 13: as if more samples were accumulated
        ref_loss, ref_grads = loss_and_grads(model, 0, num_items)
        loss, grads = loss_and_grads(model, 3, num_items)  # 3 tokens a chunk: 3 chunks for this batch
        assert_close(loss, ref_loss, rel=1e-5, what="loss")
        assert ref_grads.keys() == grads.keys() and ref_grads
        for name in ref_grads:
            assert_close(grads[name], ref_grads[name], rel=1e-5, what=name)
    # the block leaves the model as it was: full logits again
    ids, mask, _ = batch()
    assert model(input_ids=ids, attention_mask=mask).logits.shape[-1] == 128
    assert "_loss_function" not in causal_lm.__dict__ and "forward" not in causal_lm.get_output_embeddings().__dict__


def test_chunked_loss_on_chatglm_v1():
    model = make_v1_model()
    model.eval()
    ids = torch.tensor([[20, 21, 22, 7, 4, 40, 41, 5], [30, 31, 7, 4, 50, 5, 3, 3]])
    labels = ids.clone()
    labels[:, :4] = -100
    ref = model(input_ids=ids, labels=labels).loss
    with chunked_loss(model, 2):
        assert_close(model(input_ids=ids, labels=labels).loss, ref, what="loss")


def test_chunked_loss_matches_cross_entropy_directly():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 7, 16), torch.randn(50, 16)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100
    expected = torch.nn.functional.cross_entropy((hidden[:, :-1] @ weight.t()).reshape(-1, 50), labels[:, 1:].reshape(-1))
    for chunk in (1, 4, 100):
        assert_close(chunked_causal_lm_loss(hidden, weight, labels, chunk), expected, what=f"chunk {chunk}")


def test_chunked_loss_refuses_an_adapted_head():
    model = lora.apply(make_model(), LoraMethodConfig(name="lora", r=2, target_modules=["lm_head"]))
    with pytest.raises(UserError, match="plain bias-free Linear output head"):
        with chunked_loss(model, 8):
            pass


def tiny_dataset() -> Dataset:
    g = torch.Generator().manual_seed(0)
    rows = {"input_ids": [], "labels": []}
    for n in [5, 9, 12, 7, 16, 6, 11, 8]:
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] * (n // 2) + ids[n // 2 :])
    return Dataset.from_dict(rows)


def trainer_losses(tmp_path, chunk_size: int, collator) -> tuple[list[float], int]:
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no",
                             report_to="none", remove_unused_columns=False, use_cpu=True, seed=0, disable_tqdm=True,
                             train_sampling_strategy="sequential")
    trainer = GlmTrainer(model=make_model(), args=args, train_dataset=tiny_dataset(), data_collator=collator,
                         loss_chunk_size=chunk_size)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer.tokens_seen


def test_trainer_with_chunked_loss_and_packing_matches_plain(tmp_path):
    """Gradient accumulation over uneven batches (num_items_in_batch) included: 4 optimizer steps, same losses."""
    plain, tokens = trainer_losses(tmp_path / "a", 0, CausalCollator(0))
    chunked, _ = trainer_losses(tmp_path / "b", 5, CausalCollator(0))
    packed, packed_tokens = trainer_losses(tmp_path / "c", 0, PackingCollator())
    assert len(plain) == 4 and plain[-1] < plain[0]
    assert chunked == pytest.approx(plain, abs=1e-5)
    assert packed == pytest.approx(plain, abs=1e-5)
    assert tokens == packed_tokens == 2 * sum(len(r) for r in tiny_dataset()["input_ids"])  # non-pad tokens, 2 epochs


def test_packing_collator_batch():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "length": 3}, {"input_ids": [8, 9], "labels": [-100, 9], "length": 2}]
    out = PackingCollator()(features)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert out["use_cache"] is False and "attention_mask" not in out
    assert isinstance(make_collator(OmegaConf.create({"packing": False}), 0), CausalCollator)


def test_refused_combinations_name_the_setting():
    with pytest.raises(UserError, match="train.packing=true does not work with method=ptuning"):
        check_train_options(compose(["method=ptuning", "train.packing=true"]))
    with pytest.raises(UserError, match="does not work under ZeRO-3"):
        check_train_options(compose(["deepspeed=zero3", "train.loss_chunk_size=256"]))
    from glm_experiments.config.schema import check_settings

    with pytest.raises(UserError, match=r"train.loss_chunk_size=-1: must be 0 \(off\) or >= 1"):
        check_settings(compose(["train.loss_chunk_size=-1"]))
    check_train_options(compose(["method=freeze", "train.packing=true", "train.loss_chunk_size=256"]))


@pytest.mark.slow
def test_cli_run_with_packing_and_chunked_loss(tmp_path):
    proc = run_cli(["train.packing=true", "train.loss_chunk_size=64", "train.max_steps=40", "train.save_steps=0",
                    "eval.before_training=false", "eval.max_samples=8", "tracking=none", f"hydra.run.dir={tmp_path}/run"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["train"]["loss"] < result["train"]["loss_run_mean"], result  # below the run's mean: it went down
    assert result["train"]["tokens_per_s"] > 0 and "rouge-l" in result["metrics_after"]


def test_trainer_gradient_checkpointing_trains_lora_like_without(tmp_path):
    """train.gradient_checkpointing=true with a frozen base: the adapters inside checkpointed layers still get
    gradients (a reentrant checkpoint whose inputs need no grad would silently give them none)."""
    from transformers import TrainingArguments

    results = []
    for checkpointing in (False, True):
        model = lora.apply(make_model(), LoraMethodConfig(name="lora", r=4, dropout=0.0))
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
        args = TrainingArguments(output_dir=str(tmp_path / str(checkpointing)), max_steps=3, per_device_train_batch_size=4,
                                 learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
                                 remove_unused_columns=False, use_cpu=True, seed=0, disable_tqdm=True,
                                 train_sampling_strategy="sequential", gradient_checkpointing=checkpointing)
        trainer = GlmTrainer(model=model, args=args, train_dataset=tiny_dataset(), data_collator=CausalCollator(0))
        trainer.train()
        assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_A" in n)
        results.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert results[1] == pytest.approx(results[0], abs=1e-5)
