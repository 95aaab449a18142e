"""Every damaged file is one line naming it, exit 2, and the run directory unchanged (issue 31, part 3).

A table: the kinds of damage a run's adapter can suffer x the commands that read it (predict, merge, chat; web
loads through the same ``load_run``); then the checkpoint files resume=auto reads, each of which makes it fall
back to the newest intact checkpoint (and resume=<step> of the damaged one is one line)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.common import ROOT
from tests.helpers.runs import call_cli, tree_hashes

DEV = str(ROOT / "data" / "adgen_demo" / "dev.json")


class Payload:  # what a hostile pickle would run
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/glm_experiments_pwned",))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def randomize(path: Path) -> None:
    path.write_bytes(os.urandom(max(path.stat().st_size, 64)))


def empty(path: Path) -> None:
    path.write_bytes(b"")


def pickled_bin(path: Path) -> None:  # adapter_model.safetensors replaced by a pickle .bin
    path.unlink()
    (path.parent / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))


def torch_saved_bin(path: Path) -> None:
    path.unlink()
    torch.save({"weight": torch.zeros(2), "x": Payload()}, path.parent / "adapter_model.bin")


def junk_json(path: Path) -> None:
    path.write_text("{not json")


def unknown_peft_type(path: Path) -> None:
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "peft_type": "BANANA"}))


def wrong_rank(path: Path) -> None:
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "r": 4}))


# (file in adapter/, damage, what the one line says)
DAMAGE = {
    "truncated safetensors": ("adapter_model.safetensors", truncate, "adapter_model.safetensors: "),
    "random safetensors": ("adapter_model.safetensors", randomize, "adapter_model.safetensors: not a safetensors"),
    "empty safetensors": ("adapter_model.safetensors", empty, "adapter_model.safetensors: empty file"),
    "pickle .bin": ("adapter_model.safetensors", pickled_bin, "adapter_model.bin: not a torch.save archive"),
    "torch.save .bin with a payload": ("adapter_model.safetensors", torch_saved_bin,
                                       "adapter_model.bin: refused: it holds Python objects"),
    "junk adapter_config.json": ("adapter_config.json", junk_json, "adapter_config.json: not valid JSON"),
    "unknown peft_type": ("adapter_config.json", unknown_peft_type, "unknown peft_type 'BANANA'"),
    "r not matching the weights": ("adapter_config.json", wrong_rank, "has rank 8, but adapter_config.json says r=4"),
    "junk method.json": ("method.json", junk_json, "method.json: not valid JSON"),
}


def predict(run: Path, out: Path):
    from glm_experiments.predict import main

    return main, ["--run", str(run), "--input", DEV, "--output", str(out), "--max-samples", "1", "--no-progress"]


def merge(run: Path, out: Path):
    from glm_experiments.merge import main

    return main, ["--run", str(run), "--out", str(out)]


def chat(run: Path, out: Path):
    from glm_experiments.chat import main

    return main, ["--run", str(run)]


COMMANDS = {"predict": predict, "merge": merge, "chat": chat}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_adapter_is_one_line_in_every_command(damage, small_run, tmp_path, capsys, monkeypatch):
    name, spoil, says = DAMAGE[damage]
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    spoil(run / "adapter" / name)
    before = tree_hashes(run)
    monkeypatch.setattr("sys.stdin", open(os.devnull))  # chat never gets as far as reading
    for command, build in COMMANDS.items():
        main, args = build(run, tmp_path / f"out-{command}")
        code, line = call_cli(main, args, capsys)
        assert code == 2, (command, line)
        assert line.startswith("error: ") and says in line, (command, line)
        assert tree_hashes(run) == before, command
        assert not (tmp_path / f"out-{command}").exists(), command
    assert not Path("/tmp/glm_experiments_pwned").exists()


# ------------------------------------------------------------------------------ checkpoints
def pickle_payload(path: Path) -> None:
    path.write_bytes(pickle.dumps(Payload()))


def torch_payload(path: Path) -> None:
    torch.save({"x": Payload()}, path)


CHECKPOINT_DAMAGE = {
    "truncated trainable.safetensors": ("trainable.safetensors", truncate, "trainable.safetensors: "),
    "random optimizer.pt": ("optimizer.pt", randomize, "optimizer.pt: not a torch.save archive"),
    "junk trainer_state.json": ("trainer_state.json", junk_json, "trainer_state.json: not valid JSON"),
    "pickle rng_state.pth": ("rng_state.pth", pickle_payload, "rng_state.pth: not a torch.save archive"),
    "torch.save payload in rng_state.pth": ("rng_state.pth", torch_payload, "rng_state.pth: refused"),
    "empty scheduler.pt": ("scheduler.pt", empty, "scheduler.pt: empty file"),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_resume_passes_over_a_damaged_checkpoint(damage, small_run, tmp_path, caplog):
    from glm_experiments.errors import UserError
    from glm_experiments.recipe.run_dirs import resolve_resume

    name, spoil, says = CHECKPOINT_DAMAGE[damage]
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(small_run / "checkpoints", checkpoints)
    spoil(checkpoints / "checkpoint-2" / name)
    for deep in (True, False):  # run() loads the torch files; the Hydra process checks their structure only
        if not deep and "refused" in says:
            continue  # a well-formed archive: only loading it (weights_only) can refuse its payload
        assert resolve_resume("auto", checkpoints, deep=deep) == str(checkpoints / "checkpoint-1")
        with pytest.raises(UserError) as refused:
            resolve_resume("2", checkpoints, deep=deep)
        assert str(refused.value).startswith("resume=2: ") and says in str(refused.value)
        assert "intact checkpoints: ['checkpoint-1']" in str(refused.value)
    assert "checkpoint-2 is damaged" in caplog.text and "resuming from checkpoint-1" in caplog.text
    assert not Path("/tmp/glm_experiments_pwned").exists()
