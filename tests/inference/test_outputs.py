"""Nothing a command reads is lost to what it writes (issue 31, part 1): merge --out, convert --dst and predict
--output are refused in one line (exit 2) when they are, lie inside or contain the run being read, ``--overwrite``
replaces only an earlier output of the same kind, outputs appear whole or not at all, and sizes are parsed
before anything is created. After every refusal the run directory's bytes are what they were."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers.common import ROOT
from tests.helpers.runs import call_cli, tree_hashes

DEV = str(ROOT / "data" / "adgen_demo" / "dev.json")


def merge(args, capsys):
    from glm_experiments.merge import main

    return call_cli(main, args, capsys)


def test_merge_out_equal_to_inside_or_above_the_run_is_refused(small_run, tmp_path, capsys):
    run = small_run
    before = tree_hashes(run.parent)
    for out, where in ((run, "is the run"), (run.parent, "contains the run"), (run / "adapter", "is inside the run"),
                       (run / "new", "is inside the run")):
        code, line = merge(["--run", str(run), "--out", str(out), "--overwrite"], capsys)
        assert code == 2 and line == f"error: --out {out} {where} {run}; nothing written: give --out a directory " \
                                      "outside it", line
        assert tree_hashes(run.parent) == before
    # any directory holding a run is never replaced, even when it is not the run being read
    other = tmp_path / "holder"
    shutil.copytree(run, other / "copied_run")
    code, line = merge(["--run", str(run), "--out", str(other), "--overwrite"], capsys)
    assert code == 2 and "contains a training run" in line, line
    # a non-empty directory that merge did not write is not replaced either
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, line = merge(["--run", str(run), "--out", str(foreign), "--overwrite"], capsys)
    assert code == 2 and "is not a merge output of glm_experiments" in line, line
    assert (foreign / "notes.txt").read_text() == "mine"
    assert tree_hashes(run.parent) == before


def test_merge_overwrite_replaces_only_its_own_output_atomically(small_run, tmp_path, capsys, monkeypatch):
    run, out = small_run, tmp_path / "merged"
    before = tree_hashes(run.parent)
    code, _ = merge(["--run", str(run), "--out", str(out)], capsys)
    assert code == 0 and (out / "model.safetensors").is_file() and (out / ".glm_experiments_output.json").is_file()
    first = tree_hashes(out)
    code, line = merge(["--run", str(run), "--out", str(out)], capsys)
    assert code == 2 and line.endswith("holds an earlier merge output (pass --overwrite to replace it)"), line

    # a failure while writing the new output leaves the old one as it was, and no temporary directory behind
    import glm_experiments.inference.merging as merging

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merging, "_merged_model", broken)
    code, line = merge(["--run", str(run), "--out", str(out), "--overwrite"], capsys)
    assert code == 2 and "No space left on device" in line
    assert tree_hashes(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    monkeypatch.undo()

    code, _ = merge(["--run", str(run), "--out", str(out), "--overwrite"], capsys)
    assert code == 0 and set(tree_hashes(out)) == set(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert tree_hashes(run.parent) == before


def test_sizes_are_parsed_before_anything_is_created(small_run, tmp_path, capsys):
    from glm_experiments.convert import main as convert

    out = tmp_path / "a" / "b"
    code, line = merge(["--run", str(small_run), "--out", str(out), "--max-shard-size", "banana"], capsys)
    assert code == 2 and line == "error: --max-shard-size 'banana': expected a size such as 2GB, 500MB or 1GiB"
    code, line = call_cli(convert, ["--family", "chatglm3", "--src", str(tmp_path / "src"), "--dst", str(out),
                                    "--shard-size", "banana"], capsys)
    assert code == 2 and line == "error: --shard-size 'banana': expected a size such as 2GB, 500MB or 1GiB"
    assert list(tmp_path.iterdir()) == []


def test_a_failed_merge_leaves_no_output_directory(small_run, tmp_path, capsys):
    """A corrupt run's merge used to leave an empty --out behind (which then blocked the rerun)."""
    broken = tmp_path / "broken"
    shutil.copytree(small_run, broken)
    (broken / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    out = tmp_path / "deep" / "merged"
    code, line = merge(["--run", str(broken), "--out", str(out)], capsys)
    assert code == 2 and line.startswith("error: "), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_convert_dst_inside_or_above_its_source_is_refused(tmp_path, capsys):
    from glm_experiments.convert import main as convert

    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text("{}")
    before = tree_hashes(tmp_path)
    for dst, where in ((src, "is"), (tmp_path, "contains"), (src / "hf", "is inside")):
        code, line = call_cli(convert, ["--family", "chatglm3", "--src", str(src), "--dst", str(dst), "--overwrite"],
                              capsys)
        assert code == 2 and line.startswith(f"error: --dst {dst} {where} the source checkpoint {src}"), line
    assert tree_hashes(tmp_path) == before


def test_predict_output_never_replaces_a_run_file(small_run, tmp_path, capsys):
    from glm_experiments.predict import main as predict

    run = small_run
    before = tree_hashes(run.parent)
    for target in (run / "result.json", run / "adapter" / "preds.jsonl", run / ".hydra" / "config.yaml",
                   run / "preds.jsonl", run / "adapter"):
        code, line = call_cli(predict, ["--run", str(run), "--input", DEV, "--output", str(target),
                                        "--max-samples", "1"], capsys)
        assert code == 2 and line.startswith(f"error: --output {target}"), line
    mine = tmp_path / "notes.jsonl"
    mine.write_text("keep me\n")
    code, line = call_cli(predict, ["--run", str(run), "--input", DEV, "--output", str(mine), "--max-samples", "1"],
                          capsys)
    assert code == 2 and "exists and was not written by this command" in line, line
    assert mine.read_text() == "keep me\n"
    assert tree_hashes(run.parent) == before


def test_parse_size():
    from glm_experiments.errors import UserError
    from glm_experiments.recipe.outputs import parse_size

    assert parse_size("2GB", "--s") == 2 * 10**9 and parse_size("500MiB", "--s") == 500 * 2**20
    assert parse_size("1024", "--s") == 1024
    for bad in ("banana", "0GB", "-1MB", ""):
        with pytest.raises(UserError):
            parse_size(bad, "--s")
