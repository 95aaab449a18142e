"""The project's own tiny GLM: a native ``GlmForCausalLM`` with ChatGLM3's block structure (GQA, partial
interleaved RoPE, RMSNorm, SwiGLU, qkv bias) and a byte-level BPE tokenizer trained on the demo corpus.

So that fine-tuning means something on a CPU, the base is pre-trained once on the demo corpus
(attribute strings and copy texts as separate documents: it learns the language, not the mapping)
and cached under ``$GLM_EXPERIMENTS_CACHE`` (default ~/.cache/glm_experiments), keyed by its config
and the corpus, so every later run and every sweep job reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GlmConfig, GlmForCausalLM, PreTrainedTokenizerFast

from glm_experiments.config.schema import TinyModelConfig
from glm_experiments.constants import PROJECT_ROOT, build_once, cache_root

log = logging.getLogger(__name__)

DEMO_CORPUS = PROJECT_ROOT / "data" / "adgen_demo" / "train.json"

# ids 0-2 as in ChatGLM2/3 (pad/unk 0, bos 1, eos 2); GLM specials appended after the learned pieces
# in ChatGLM3's order, so the layout mirrors the real tokenizer.
BASE_SPECIALS = ["<unk>", "<s>", "</s>"]
GLM_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def tokenizer_corpus() -> list[str]:
    """Every string of the shipped demo training sets, so that all of them tokenise without <unk>."""
    texts = []
    for path in sorted((PROJECT_ROOT / "data").glob("*/train.json")):
        raw = path.read_text(encoding="utf-8").strip()
        records = json.loads(raw) if raw.startswith("[") else [json.loads(line) for line in raw.splitlines() if line.strip()]
        texts += _strings(records)
    return texts


def read_corpus(path: Path = DEMO_CORPUS) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                docs += [record["content"], record["summary"]]
    return docs


def train_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Character-level BPE: a few hundred merges on top of the corpus's characters.

    Characters rather than bytes, and few merges, so attribute words ("针织", "连衣裙") stay tokens of
    their own in both the source and the copy text: a small model can then learn the mapping by copying.
    Characters the corpus never saw become <unk>.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[#*，。、！？：；,.!?:;\s]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=BASE_SPECIALS,
        max_token_length=2,
        initial_alphabet=[chr(i) for i in range(32, 127)] + ["\n"],  # printable ASCII (JSON of tool calls)
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(GLM_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=GLM_SPECIALS,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,  # role tokens come from the template only, never from a sample's text
    )


def build_model(cfg: TinyModelConfig, tokenizer) -> GlmForCausalLM:
    config = GlmConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-5,
        attention_bias=True,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return GlmForCausalLM(config)


def pretrain(model: GlmForCausalLM, tokenizer, corpus: list[str], cfg: TinyModelConfig, seed: int = 0) -> list[float]:
    """Short causal-LM run on packed documents (eos-separated). Returns the loss curve."""
    gen = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    for doc in corpus:
        stream += tokenizer.encode(doc, add_special_tokens=False) + [tokenizer.eos_token_id]
    n = len(stream) // cfg.pretrain_seq_len
    blocks = torch.tensor(stream[: n * cfg.pretrain_seq_len]).view(n, cfg.pretrain_seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    warmup = max(1, cfg.pretrain_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.pretrain_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    losses = []
    for step in range(cfg.pretrain_steps):
        batch = blocks[torch.randint(0, n, (cfg.pretrain_batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def tiny_key(cfg: TinyModelConfig, corpus_path: Path = DEMO_CORPUS) -> str:
    digest = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode())
    digest.update(b"tokenizer: split_special_tokens")  # tokenizer behaviour changes re-key the cache
    digest.update(corpus_path.read_bytes())
    for path in sorted((PROJECT_ROOT / "data").glob("*/train.json")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def ensure_tiny_checkpoint(cfg: TinyModelConfig, corpus_path: Path = DEMO_CORPUS) -> Path:
    """Directory of the pre-trained tiny model + tokenizer, building it on first use (once, whoever asks first:
    parallel sweep jobs and ranks wait for it)."""
    out = cache_root() / "tiny" / tiny_key(cfg, corpus_path)

    def pretrain_into(staging: Path) -> None:
        log.info("pre-training the tiny base model once (cached in %s)", out)
        start = time.perf_counter()
        torch.manual_seed(0)
        corpus = read_corpus(corpus_path)
        # documents shuffled: sources and their copy texts are never adjacent, so the base learns the
        # language of both but not the mapping between them (that is what fine-tuning must add)
        random.Random(0).shuffle(corpus)
        tokenizer = train_tokenizer(tokenizer_corpus(), cfg.vocab_size)
        model = build_model(cfg, tokenizer)
        losses = pretrain(model, tokenizer, corpus, cfg)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        stats = {"loss_first": losses[0], "loss_last": sum(losses[-10:]) / 10, "seconds": time.perf_counter() - start}
        (staging / "pretrain.json").write_text(json.dumps(stats, indent=2))
        (staging / "done").write_text("ok\n")
        log.info("tiny base pre-trained: loss %.2f -> %.2f in %.0f s", stats["loss_first"], stats["loss_last"], stats["seconds"])

    return out if (out / "done").exists() else build_once(out, "done", pretrain_into)
