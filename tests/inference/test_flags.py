"""Every flag of predict and chat is range-checked like the config (issue 31, part 4): one line, exit 2, before any
weight loads, and the run directory unchanged."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.common import ROOT
from tests.helpers.runs import call_cli, tree_hashes

DEV = str(ROOT / "data" / "adgen_demo" / "dev.json")
NO_CUDA = "CUDA is not available on this machine"

PREDICT = [
    (["--device", "banana"], "error: --device banana: not a device; use cpu, cuda or cuda:<index>"),
    (["--device", "cuda:99"], None),  # no CUDA here: not available; with CUDA: no device 99
    (["--max-new-tokens", "-5"], "error: --max-new-tokens must be > 0, got -5"),
    (["--max-new-tokens", "100000"], "error: --max-new-tokens 100000: data.max_source_length 64 + 100000 exceeds "
                                     "the model's 2048 positions (model.tiny.max_position_embeddings)"),
    (["--batch-size", "0"], "error: --batch-size must be > 0, got 0"),
]
CHAT = [
    (["--temperature", "-1"], "error: --temperature must be > 0, got -1.0"),
    (["--top-p", "5"], "error: --top-p must be in (0, 1], got 5.0"),
    (["--top-p", "0"], "error: --top-p must be in (0, 1], got 0.0"),
    (["--max-new-tokens", "-5"], "error: --max-new-tokens must be > 0, got -5"),
    (["--max-length", "0"], "error: --max-length must be > 0, got 0"),
    (["--max-length", "5000"], "error: --max-length 5000 exceeds the model's 2048 positions "
                               "(model.tiny.max_position_embeddings)"),
    (["--max-new-tokens", "100", "--max-length", "100"], "error: --max-new-tokens 100: 100 exceeds --max-length 100; "
                                                         "leave room for the prompt"),
    (["--device", "banana"], "error: --device banana: not a device; use cpu, cuda or cuda:<index>"),
]


@pytest.mark.parametrize("flags,line", PREDICT, ids=[" ".join(f) for f, _ in PREDICT])
def test_predict_flags(flags, line, small_run, tmp_path, capsys):
    from glm_experiments.predict import main

    before = tree_hashes(small_run)
    code, said = call_cli(main, ["--run", str(small_run), "--input", DEV, "--output", str(tmp_path / "p.jsonl"),
                                 *flags], capsys)
    if line is None:
        line = (f"error: --device cuda:99: {NO_CUDA}" if not torch.cuda.is_available() else
                f"error: --device cuda:99: this machine has {torch.cuda.device_count()} CUDA device(s)")
    assert code == 2 and said.startswith(line), said
    assert tree_hashes(small_run) == before and not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_predict_device_cuda_without_cuda(small_run, tmp_path, capsys):
    from glm_experiments.predict import main

    code, said = call_cli(main, ["--run", str(small_run), "--input", DEV, "--device", "cuda"], capsys)
    assert code == 2 and said.startswith(f"error: --device cuda: {NO_CUDA}"), said


@pytest.mark.parametrize("flags,line", CHAT, ids=[" ".join(f) for f, _ in CHAT])
def test_chat_flags(flags, line, small_run, capsys, monkeypatch):
    from glm_experiments.chat import main

    monkeypatch.setattr("sys.stdin", open(os.devnull))
    before = tree_hashes(small_run)
    code, said = call_cli(main, ["--run", str(small_run), *flags], capsys)
    assert code == 2 and said == line, said
    assert tree_hashes(small_run) == before


def test_web_max_new_tokens_within_the_models_positions(small_run, capsys):
    from glm_experiments.web import main

    before = tree_hashes(small_run)
    code, said = call_cli(main, ["--run", str(small_run), "--max-new-tokens", "100000"], capsys)
    assert code == 2 and said.startswith("error: --max-new-tokens 100000: ") and "exceeds the model's 2048 positions" \
        " (model.tiny.max_position_embeddings)" in said, said
    assert tree_hashes(small_run) == before
