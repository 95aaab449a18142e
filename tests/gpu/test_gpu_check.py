"""bench/gpu_check.py cannot rot: its CPU dry run (tiny shapes, 1 layer, a few steps) runs every case, and the
pieces the GPU run relies on (carried-wheel install, traced column, fetch script) are checked here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest

from tests.helpers.common import ROOT

import gpu_check  # bench/, on pytest's pythonpath


@pytest.mark.slow
def test_cpu_dry_run_measures_or_skips_every_case(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--layers", "1", "--tiny",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]  # nothing else in $OUT
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["status"] == "done"
    assert list(report["cases"]) == [key for key, *_ in gpu_check.CASES]
    for key, case in report["cases"].items():
        assert case["status"] in ("measured", "skipped"), f"{key}: {case.get('error')}\n{case.get('traceback', '')}"
        if case["status"] == "skipped":
            assert case["reason"], key
    cases = report["cases"]
    for key in ("qlora", "qlora_lowmem"):
        assert cases[key]["status"] == "skipped" and "CUDA" in cases[key]["reason"]
    assert cases["pytest_gpu"]["status"] == "skipped"
    trained = [k for k, *_ in gpu_check.CASES if k not in ("cli", "pytest_gpu") and "qlora" not in k]
    for key in trained:
        case = cases[key]
        assert case["status"] == "measured", key
        assert case["loss_finite"] and case["samples_per_s"] > 0 and case["tokens_per_s"] > 0, key
        assert case["traced_peak_mib"] > 0, key  # the traced column's code path ran
        assert case["trainable_params"] > 0 and case["n_params"] > case["trainable_params"] or key == "full_4l"
    assert cases["lora_lowmem"]["gradient_checkpointing"] and cases["lora_lowmem"]["loss_chunk_size"] > 0
    assert not cases["lora"]["gradient_checkpointing"] and cases["lora"]["loss_chunk_size"] == 0
    assert cases["full_4l"]["trainable_params"] == cases["full_4l"]["n_params"]
    cli = cases["cli"]
    assert all(cli["checks"].values()), cli["checks"]
    assert cli["predictions_before"] > 0 and cli["checkpoints"]
    md = (out / "gpu_check.md").read_text()
    assert "| case | status | max allocated | max reserved | traced peak |" in md
    for key, title, *_ in gpu_check.CASES:
        assert f"| {title} |" in md, key


@pytest.mark.slow
def test_isolated_case_and_budget_skip(tmp_path):
    """On CUDA every train case runs in its own process (--isolate auto): that path, and a case skipped for the
    overall budget, with its reason."""
    script = str(ROOT / "bench" / "gpu_check.py")
    base = [sys.executable, script, "--device", "cpu", "--layers", "1", "--tiny"]
    proc = subprocess.run([*base, "--isolate", "yes", "--only", "lora_lowmem", "--out", str(tmp_path / "a")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    case = json.loads((tmp_path / "a" / "gpu_check.json").read_text())["cases"]["lora_lowmem"]
    assert case["status"] == "measured" and case["loss_finite"] and case["gradient_checkpointing"], case
    proc = subprocess.run([*base, "--budget", "0", "--only", "lora,cli", "--out", str(tmp_path / "b")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads((tmp_path / "b" / "gpu_check.json").read_text())["cases"]
    assert list(cases) == ["lora", "cli"]
    assert all(c["status"] == "skipped" and c["reason"].startswith("budget") for c in cases.values()), cases


def test_cuda_case_settings_come_from_the_project_config():
    """What the GPU run will train, composed from conf/ exactly as it will be there (no GPU needed to check it)."""
    from argparse import Namespace

    args = Namespace(tiny=False, device="cuda", warmup=2, steps=4, cli_steps=None)
    spec = {key: gpu_check.train_spec(key, overrides, layers or 28, args)
            for key, _t, overrides, layers, *_ in gpu_check.CASES if key not in ("cli", "pytest_gpu")}
    demo = {"batch": 4, "source": 256, "target": 512}
    for key in ("lora", "lora_lowmem", "ptuning", "ptuning_lowmem", "full_4l"):
        assert {k: spec[key][k] for k in demo} == demo, key
    for key in ("lora", "ptuning", "qlora", "lora_r32_lf"):
        assert not spec[key]["gradient_checkpointing"] and spec[key]["loss_chunk_size"] == 0, key
    for key in ("lora_lowmem", "ptuning_lowmem", "qlora_lowmem", "full_4l"):
        assert spec[key]["gradient_checkpointing"] and spec[key]["loss_chunk_size"] == 256, key
    assert spec["lora"]["method_cfg"]["r"] == 8 and spec["ptuning"]["method_cfg"]["pre_seq_len"] == 128
    assert spec["qlora"]["method_cfg"]["name"] == "qlora"
    assert (spec["qlora"]["batch"], spec["qlora"]["source"] + spec["qlora"]["target"]) == (1, 1024)
    for key in ("lora_r32_lf", "lora_r32_lf_ckpt"):  # LLaMA-Factory's setting
        assert spec[key]["method_cfg"]["r"] == 32 and (spec[key]["batch"], spec[key]["source"] + spec[key]["target"]) == (4, 1024)
    assert spec["lora_r32_lf_ckpt"]["gradient_checkpointing"] and spec["full_4l"]["layers"] == 4
    assert spec["lora"]["layers"] == 28 and spec["lora"]["shape"]["hidden_size"] == 4096
    # the CLI case's overrides on a GPU compose (hydra.* is the runtime's, not the config's)
    from tests.helpers.common import compose

    cli = [o for o in gpu_check.cli_overrides(args, ROOT / "unused") if not o.startswith("hydra.")]
    cfg = compose(cli)
    assert cfg.model.tiny.hidden_size == gpu_check.CLI_GPU_MODEL["hidden_size"] and cfg.train.max_steps == 300
    assert cfg.tracking.enabled is False and list(cfg.data.metrics) == ["accuracy"] and cfg.model.dtype == "auto"


def test_traced_column_covers_every_28_layer_case():
    """The GPU run finds a traced figure of the very same config (override list) for every train case."""
    traced = gpu_check.traced_figures()
    for key, _title, overrides, layers, *_ in gpu_check.CASES:
        if key in ("cli", "pytest_gpu"):
            continue
        assert key in traced, f"{key}: no traced figure (run python bench/gpu_check.py --trace-only)"
        assert traced[key]["overrides"] == overrides and traced[key]["peak_mib"] > 0
        if layers:
            assert traced[key]["layers"] == layers


def test_fetch_script_carries_every_needed_package():
    script = (ROOT / "scripts" / "fetch_gpu_wheels.sh").read_text()
    for dist in {**gpu_check.NEEDED, **gpu_check.NEEDED_CUDA}.values():
        assert f'"{dist}==' in script, dist
    assert "torch" not in script.split("pip download")[1].split("pip wheel")[0].replace("torch/CUDA", "")
    assert "gpu_wheels/" in (ROOT / ".gitignore").read_text().splitlines()


def _fake_wheel(folder, name: str = "glm_fake_pkg", version: str = "1.0") -> None:
    dist_info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist_info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{dist_info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def test_missing_module_is_installed_from_carried_wheels(tmp_path, monkeypatch):
    """What the GPU machine lacks is installed offline (pip --no-index --find-links) into a site-packages dir
    that this process and the case processes (PYTHONPATH) import from."""
    wheels, site = tmp_path / "wheels", tmp_path / "site" / "site-packages"
    wheels.mkdir()
    _fake_wheel(wheels)
    monkeypatch.setattr(gpu_check, "NEEDED", {"glm_fake_pkg": "glm_fake_pkg"})
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    report = gpu_check.ensure_packages("cpu", wheels=wheels, site=site)
    assert report["missing_before"] == ["glm_fake_pkg"] and report["installed"] == ["glm_fake_pkg"], report
    assert "--no-index" in report["how"]
    import glm_fake_pkg

    assert glm_fake_pkg.VALUE == 42
    assert str(site) in os.environ["PYTHONPATH"].split(os.pathsep)
    sys.modules.pop("glm_fake_pkg", None)
