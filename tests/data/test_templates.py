"""ChatGLM3 template and loss mask on the tiny tokenizer: exact ids and labels, truncation, the collator."""

import torch

from glm_experiments.data.dataset import CausalCollator
from glm_experiments.data.templates import IGNORE_INDEX, get_template, truncate

IGN = IGNORE_INDEX


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_single_turn_ids_and_shifted_labels(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = {name: tok.convert_tokens_to_ids(name) for name in ["[gMASK]", "sop", "<|user|>", "<|assistant|>"]}
    q, a = "类型#上衣*颜色#白色", "这款上衣白色的配色干净清爽。"
    encoded = get_template("chatglm3").encode(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    prompt = [ids["[gMASK]"], ids["sop"], ids["<|user|>"], *enc(tok, "\n"), *enc(tok, q), ids["<|assistant|>"]]
    reply = [*enc(tok, "\n"), *enc(tok, a), tok.eos_token_id]
    assert encoded.input_ids == prompt + reply
    # the <|assistant|> token is not a target; the reply and the eos after it are
    assert encoded.labels == [IGN] * len(prompt) + reply
    assert encoded.source_len == len(prompt)
    assert (tok.eos_token_id, ids["[gMASK]"]) == (2, tok.convert_tokens_to_ids("[gMASK]"))


def test_multi_turn_loss_flags_and_observation(tiny_tokenizer):
    tok = tiny_tokenizer
    t = get_template("chatglm3")
    messages = [
        {"role": "system", "content": "系统"},
        {"role": "user", "content": "问一"},
        {"role": "assistant", "content": "答一", "loss": False},
        {"role": "user", "content": "问二"},
        {"role": "assistant", "content": "查询", "metadata": "stock"},
        {"role": "observation", "content": "结果"},
        {"role": "assistant", "content": "答二"},
    ]
    encoded = t.encode(tok, messages)
    pieces = [t.message_ids(tok, m["role"], m["content"], m.get("metadata", "")) for m in messages]
    assert encoded.input_ids == t.prefix(tok) + sum(pieces, []) + [tok.eos_token_id]
    # targets: for each assistant turn with loss, its tokens after the role token plus the next token
    expected = [IGN, IGN]
    for i, (m, piece) in enumerate(zip(messages, pieces)):
        prev_is_target = i > 0 and messages[i - 1]["role"] == "assistant" and messages[i - 1].get("loss", True)
        if m["role"] == "assistant" and m.get("loss", True):
            expected += [piece[0] if prev_is_target else IGN] + piece[1:]
        else:
            expected += [piece[0] if prev_is_target else IGN] + [IGN] * (len(piece) - 1)
    expected.append(tok.eos_token_id)
    assert encoded.labels == expected
    # the observation role token closes the tool call: it is a target
    obs_pos = len(t.prefix(tok)) + sum(len(p) for p in pieces[:5])
    assert encoded.labels[obs_pos] == tok.convert_tokens_to_ids("<|observation|>")


def test_truncation_keeps_head_cue_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    t = get_template("chatglm3")
    long_q = "类型#上衣*" * 40
    encoded = t.encode(tok, [{"role": "user", "content": long_q}, {"role": "assistant", "content": "这款上衣" * 30}])
    ids, labels, truncated = truncate(encoded, max_source_length=16, max_target_length=8)
    assert truncated and len(ids) == 24 and len(labels) == 24
    assert ids[:2] == t.prefix(tok)
    assert ids[15] == tok.convert_tokens_to_ids("<|assistant|>")  # the answer cue survives
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    assert labels[:16] == [IGN] * 16


def test_generation_prompt_matches_training_prefix(tiny_tokenizer):
    tok = tiny_tokenizer
    t = get_template("chatglm3")
    msgs = [{"role": "user", "content": "类型#裤子"}, {"role": "assistant", "content": "好"}]
    encoded = t.encode(tok, msgs)
    assert t.prompt(tok, msgs[:1]) == encoded.input_ids[: encoded.source_len]
    assert t.clean_response("\n这款裤子") == "这款裤子"
    assert set(t.stop_ids(tok)) == {tok.eos_token_id, tok.convert_tokens_to_ids("<|user|>"),
                                    tok.convert_tokens_to_ids("<|observation|>")}


def test_collator_pads_to_batch_longest():
    batch = CausalCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                            {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long
