"""hydra/launcher=parallel and hydra/launcher=slurm (glm_experiments/scale/submitit_pool.py, docs/scaling.md)."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
from tests.helpers.common import CONF_DIR, ROOT, TINY_SWEEP_JOB, demo_data_slice, run_cli

from glm_experiments.errors import UserError
from glm_experiments.scale.submitit_pool import plan_slots, visible_gpus


def hydra_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import glm_experiments.config.schema  # noqa: F401  (the schema)

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def launcher_params(cfg) -> dict:
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    return params


# ------------------------------------------------------------------ fast: slots and configs
def test_plan_slots():
    # GPUs: disjoint groups, as many jobs at a time as groups unless fewer are asked for
    assert plan_slots([0, 1, 2, 3], 1, None, 16, None) == ([(0,), (1,), (2,), (3,)], 4)
    assert plan_slots([0, 1, 2, 3, 4], 2, None, 16, None) == ([(0, 1), (2, 3)], 8)
    assert plan_slots([4, 5, 6, 7], 2, 1, 16, 3) == ([(4, 5)], 3)
    # no GPU (or gpus_per_node=0): max_parallel CPU slots, the cores split between them
    assert plan_slots([], 1, 3, 2, None) == ([(), (), ()], 1)
    assert plan_slots([], 1, None, 8, None) == ([()], 8)
    assert plan_slots([0, 1], 0, 2, 8, None) == ([(), ()], 4)
    for args, message in [
        (([0, 1], 4, None, 8, None), r"gpus_per_node=4 but 2 GPU\(s\) are visible"),
        (
            ([0, 1, 2, 3], 2, 3, 8, None),
            r"max_parallel=3 but 4 GPU\(s\) at 2 a job run at most 2",
        ),
        (([], 1, 0, 8, None), r"max_parallel=0: expected >= 1"),
        (([], 1, 2, 8, 0), r"cpus_per_task=0: expected >= 1"),
        (([0], -1, None, 8, None), r"gpus_per_node=-1: expected >= 0"),
    ]:
        with pytest.raises(UserError, match=r"^hydra\.launcher\." + message):
            plan_slots(*args)


def test_visible_gpus_are_indices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f6e1c2a,GPU-1b2c3d4e")
    with pytest.raises(
        UserError, match=r"^CUDA_VISIBLE_DEVICES=GPU-8f6e1c2a,GPU-1b2c3d4e: .* by index"
    ):
        visible_gpus()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_launcher_configs_compose_with_their_schema():
    from hydra.errors import ConfigCompositionException

    cfg = hydra_cfg(["hydra/launcher=parallel", "hydra.launcher.max_parallel=3"])
    assert (
        cfg.hydra.launcher._target_
        == "hydra_plugins.glm_experiments_launchers.launchers.ParallelLauncher"
    )
    assert (
        cfg.hydra.launcher.max_parallel == 3
        and cfg.hydra.launcher.gpus_per_node is None
    )
    assert cfg.hydra.launcher.timeout_min == 7 * 24 * 60
    cfg = hydra_cfg(["hydra/launcher=slurm"])
    assert (
        cfg.hydra.launcher._target_
        == "hydra_plugins.glm_experiments_launchers.launchers.SlurmSweepLauncher"
    )
    assert (cfg.hydra.launcher.cpus_per_task, cfg.hydra.launcher.timeout_min) == (
        8,
        1440,
    )
    for typo in ("hydra.launcher.max_paralel=2", "hydra.launcher.max_parallel=abc"):
        with pytest.raises(ConfigCompositionException):
            hydra_cfg(["hydra/launcher=parallel", typo])
    from hydra.core.plugins import (
        Plugins,  # Hydra finds the launchers in the hydra_plugins package
    )

    assert (
        "hydra_plugins.glm_experiments_launchers.launchers.ParallelLauncher"
        in Plugins.instance().class_name_to_class
    )


# ------------------------------------------------------------------ SLURM: what sbatch gets is what the docs show
def _docs_slurm_example() -> tuple[list[str], list[str]]:
    """(the overrides of docs/scaling.md's SLURM command, the lines its sbatch block shows)."""
    text = (ROOT / "docs" / "scaling.md").read_text()
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.DOTALL)
    command = next(b for b in blocks if "hydra/launcher=slurm" in b and "\\\n" in b)
    args = shlex.split(
        command.replace("\\\n", " ").split("\n", 1)[1]
    )  # after `export MLFLOW_TRACKING_URI=...`
    assert args[:4] == ["python", "-m", "glm_experiments", "--multirun"], args
    sbatch = next(b for b in blocks if "#SBATCH" in b)
    return args[4:], [line for line in sbatch.splitlines() if line.strip()]


def test_slurm_launcher_submits_what_the_docs_show(tmp_path, monkeypatch):
    """The docs' command, composed and submitted by the real launcher to an sbatch stand-in that keeps the script."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(
        '#!/bin/sh\ncp "$1" "$SBATCH_CAPTURE"\necho "Submitted batch job 4242"\n'
    )
    (fake / "srun").write_text(
        "#!/bin/sh\nexit 0\n"
    )  # submitit looks for srun before it builds an executor
    for tool in fake.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_CAPTURE", str(tmp_path / "script.sh"))

    args, expected = _docs_slurm_example()
    overrides = OverridesParser.create().parse_overrides(args)
    swept = [
        list(o.sweep_string_iterator()) for o in overrides if o.is_sweep_override()
    ]
    first = [
        o.input_line
        if not o.is_sweep_override()
        else f"{o.key_or_group}={o.sweep_string_iterator().__next__()}"
        for o in overrides
    ]
    cfg = hydra_cfg([*first, f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    from hydra_plugins.glm_experiments_launchers.launchers import SlurmSweepLauncher

    launcher = SlurmSweepLauncher(**launcher_params(cfg))
    launcher.config = cfg
    jobs = [(n, list(combo)) for n, combo in enumerate(itertools.product(*swept))]
    assert len(jobs) == 2
    submitted = launcher._submit(jobs)
    assert [job.job_id for job in submitted] == ["4242_0", "4242_1"]
    script = (tmp_path / "script.sh").read_text()
    assert [line for line in expected if line not in script.splitlines()] == [], script
    assert re.search(
        r"^srun .* -u -m submitit\.core\._submit ", script, flags=re.MULTILINE
    ), script


# ------------------------------------------------------------------ parallel: slots with real processes
def test_parallel_pool_pins_gpus_limits_jobs_and_records_a_lost_job(
    tmp_path, monkeypatch
):
    """Real submitit processes running a 2-second stand-in job (tests/helpers/scale_fakes.py): 4 pretend GPUs, 2 a job,
    so 2 jobs at a time on disjoint GPU pairs; a job killed before it could report is recorded FAILED on the
    MLflow sweep parent by the launching process."""
    from mlflow import MlflowClient
    from tests.helpers.scale_fakes import EnvReportingLauncher

    import glm_experiments.scale.submitit_pool
    from glm_experiments.tracking.mlflow_tracker import PARENT_RUN_ENV
    from glm_experiments.tracking.sweep import MlflowSweepCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = hydra_cfg(
        [
            "hydra/launcher=parallel",
            "hydra.launcher.gpus_per_node=2",
            f"hydra.sweep.dir={tmp_path}",
            f"tracking.tracking_uri={uri}",
            "tracking.experiment_name=pool",
        ]
    )
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    callback = MlflowSweepCallback()
    callback.on_multirun_start(cfg)
    monkeypatch.setattr(glm_experiments.scale.submitit_pool, "visible_gpus", lambda: [0, 1, 2, 3])
    monkeypatch.setenv(
        "PYTHONPATH", str(ROOT)
    )  # the jobs import tests.helpers.scale_fakes
    launcher = EnvReportingLauncher(**launcher_params(cfg))
    launcher.config = cfg
    launcher.hydra_context = SimpleNamespace(
        callbacks=SimpleNamespace(callbacks=[callback])
    )

    results = launcher.launch([["a"], ["b"], ["die"], ["c"], ["d"]], initial_job_idx=0)
    callback.on_multirun_end(cfg)

    done = [r for r in results if isinstance(r, dict)]
    assert [r["num"] for r in done] == [0, 1, 3, 4]
    assert {r["cuda"] for r in done} == {"0,1", "2,3"}
    assert {r["threads"] for r in done} == {
        str(max(1, glm_experiments.scale.submitit_pool.available_cores() // 2))
    }
    for x, y in itertools.combinations(
        done, 2
    ):  # jobs that ran at the same time had different GPUs
        if x["began"] < y["ended"] and y["began"] < x["ended"]:
            assert x["cuda"] != y["cuda"], (x, y)
    for x, y, z in itertools.combinations(done, 3):  # never 3 at once
        assert not (
            max(x["began"], y["began"], z["began"])
            < min(x["ended"], y["ended"], z["ended"])
        )
    lost = results[2]
    assert lost.status.name == "FAILED" and "job #2 ended without a result" in str(
        lost._return_value
    )
    parent = MlflowClient(tracking_uri=uri).get_run(callback.parent_run_id)
    assert (
        parent.info.status == "FAILED" and parent.data.tags["job.2.status"] == "FAILED"
    )
    assert (
        parent.data.tags["job.2.overrides"] == "die"
        and "ended without a result" in parent.data.tags["job.2.error"]
    )
    assert parent.data.tags["sweep.failed_jobs"] == "1"


def test_parallel_launcher_refuses_bad_settings_before_any_job(
    tmp_path, monkeypatch, capsys
):
    """One line naming the setting, exit 2, the reason on the sweep parent (FAILED), no job started."""
    from mlflow import MlflowClient
    from tests.helpers.scale_fakes import EnvReportingLauncher

    from glm_experiments.tracking.mlflow_tracker import PARENT_RUN_ENV
    from glm_experiments.tracking.sweep import MlflowSweepCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = hydra_cfg(
        [
            "hydra/launcher=parallel",
            "hydra.launcher.max_parallel=0",
            f"hydra.sweep.dir={tmp_path}",
            f"tracking.tracking_uri={uri}",
            "tracking.experiment_name=refused",
        ]
    )
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    callback = MlflowSweepCallback()
    callback.on_multirun_start(cfg)
    launcher = EnvReportingLauncher(**launcher_params(cfg))
    launcher.config = cfg
    launcher.hydra_context = SimpleNamespace(
        callbacks=SimpleNamespace(callbacks=[callback])
    )
    with pytest.raises(SystemExit) as exit_info:
        launcher.launch([["a"]], initial_job_idx=0)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # (after MLflow's own log lines)
    assert err.endswith(
        "\nerror: hydra.launcher.max_parallel=0: expected >= 1 (or null)\n"
    ), err
    parent = MlflowClient(tracking_uri=uri).get_run(callback.parent_run_id)
    assert parent.info.status == "FAILED" and parent.data.tags["error"].startswith(
        "hydra.launcher.max_parallel=0"
    )
    assert not list(tmp_path.glob(".submitit/*"))


# ------------------------------------------------------------------ parallel: a real sweep
TINY = ["train.max_steps=2", *TINY_SWEEP_JOB, "tracking.log_adapter=false"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_parallel_sweep_three_jobs_at_once_one_failing(tmp_path):
    """3 jobs at once in their own processes on a fresh ./mlflow.db, one failing, finishing in any order: one
    parent, every child linked and completely recorded, the failure on the parent, compare lists all three."""
    train, dev = demo_data_slice(tmp_path)
    missing = tmp_path / "missing.json"
    sweep_dir = tmp_path / "multirun"
    proc = run_cli(
        ["--multirun", "hydra/launcher=parallel", "hydra.launcher.max_parallel=3",
         f"data.train_file={train},{missing}", "train.learning_rate=1e-3,2e-3", f"data.dev_file={dev}", *TINY,
         "tracking.experiment_name=parallel", f"hydra.sweep.dir={sweep_dir}"],
        tmp_path, timeout=540,
        env_changes={"GLM_EXPERIMENTS_PARENT_RUN_ID": None, "MLFLOW_TRACKING_URI": None, "OMP_NUM_THREADS": None},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "data file not found" in proc.stderr, out[
        -5000:
    ]  # Hydra names the failed job
    cores = __import__("glm_experiments.scale.submitit_pool", fromlist=["x"]).available_cores()
    assert f"3 job(s) at a time, CPU only, {max(1, cores // 3)} thread(s) each" in out
    assert out.count("started (CPU)") == 4

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("parallel").experiment_id], max_results=100
    )
    parents = [
        r for r in runs if r.data.tags.get("glm_experiments.role") == "sweep_parent"
    ]
    children = [r for r in runs if r not in parents]
    assert len(parents) == 1 and len(children) == 4, [
        (r.info.run_name, r.info.status) for r in runs
    ]
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert (
        parent.info.status == "FAILED" and parent.data.tags["sweep.failed_jobs"] == "2"
    )
    assert parent.data.tags["sweep.jobs"] == "4"
    assert (
        parent.data.metrics["sweep/jobs_completed"] == 2
        and parent.data.metrics["sweep/jobs_failed"] == 2
    )
    # job numbers: train_file is the outer sweep, so jobs 2 and 3 read the missing file
    assert [parent.data.tags[f"job.{n}.status"] for n in range(4)] == [
        "FINISHED",
        "FINISHED",
        "FAILED",
        "FAILED",
    ]
    assert (
        "missing.json" in parent.data.tags["job.2.error"]
        and "missing.json" in parent.data.tags["job.3.overrides"]
    )
    assert {
        int(m.step)
        for m in client.get_metric_history(parent.info.run_id, "sweep/objective")
    } == {0, 1}
    # the two jobs that trained ran at the same time (each started before the other ended)
    a, b = (c.info for c in children if c.info.status == "FINISHED")
    assert a.start_time < b.end_time and b.start_time < a.end_time, (a, b)
    for child in children:
        failed = child.data.params["data.train_file"] == str(missing)
        assert child.info.status == ("FAILED" if failed else "FINISHED")
        assert (
            Path(child.data.tags["glm_experiments.run_dir"]).parent
            == sweep_dir.resolve()
        )
        if failed:
            assert "missing.json" in child.data.tags["error"]
            continue
        # every job completely recorded while the others wrote to the same SQLite file
        assert len(child.data.params) > 80
        assert [
            m.step for m in client.get_metric_history(child.info.run_id, "train/loss")
        ] == [1, 2]
        assert sorted(
            m.step for m in client.get_metric_history(child.info.run_id, "eval/rouge-l")
        ) == [0, 2]
        assert {"result.json", "hydra", "predictions", "predictions_jsonl"} <= {
            a.path for a in client.list_artifacts(child.info.run_id)
        }
        result = json.loads(
            (
                Path(child.data.tags["glm_experiments.run_dir"]) / "result.json"
            ).read_text()
        )
        assert result["run_id"] == child.info.run_id
    assert len(list(sweep_dir.glob("[0-3]_*"))) == 4 and list(
        sweep_dir.glob(".submitit/*/*_log.out")
    )

    from glm_experiments.study.comparison import compare_runs

    rows = compare_runs(tracking_uri=uri, parent=parent.info.run_id)
    assert sorted(r["status"] for r in rows) == [
        "FAILED",
        "FAILED",
        "FINISHED",
        "FINISHED",
    ]
