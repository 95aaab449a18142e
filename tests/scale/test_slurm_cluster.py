"""``hydra/launcher=slurm`` against a real SLURM cluster: the one-node cluster of scripts/local_slurm.sh
(Debian's slurm-wlm and munge; .ci/run installs them), started here when it is not running.

* a 2-job sweep through real sbatch, where job #0 is requeued twice, by ``scontrol requeue`` mid-training and
  by its time limit (brought near while it trains; submitit's signal 20 s before it), and job #1 runs uninterrupted:
  one FINISHED parent, one FINISHED child run per job, job #0's final loss equal to job #1's, every step trained
  and logged once (each interruption checkpointed the step it was at), the scheduler reports both COMPLETED;
* ``scancel`` of the array mid-training: children and parent KILLED, nothing RUNNING, the launching process
  names the cancelled jobs;
* one time limit more than ``max_num_timeout`` allows: the run FAILED, the one-line reason on the FAILED parent;
* neither prints a sacct warning per poll (this cluster has no accounting daemon).

Slow by nature (a requeued job waits ``cred_expire`` = 10 s, SLURM checks time limits every 30 s): 4-8 min on
the project's loaded 2-core VM.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.common import ROOT, TINY_SWEEP_JOB, checkout_env

SCRIPT = ROOT / "scripts" / "local_slurm.sh"
# the tiny job on one core each (two jobs side by side on a 2-core node: the same arithmetic in both)
SLURM_JOB = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
             'hydra.launcher.setup=["export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1"]', "train.save_total_limit=0",
             "train.lr_scheduler_type=constant", "eval.before_training=false",
             *[o for o in TINY_SWEEP_JOB if not o.startswith("eval.max_new_tokens")]]
# two jobs that train identically (they differ in evaluation only): #1 is #0's uninterrupted twin
TWINS = "eval.max_new_tokens=4,5"


@pytest.fixture(scope="module")
def slurm_conf() -> str:
    """SLURM_CONF of the running local cluster (started here, and stopped after, if it was not running)."""
    missing = [exe for exe in ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged", "/usr/bin/sbatch")
               if not Path(exe).exists()]
    if missing:
        pytest.skip(f"no local SLURM cluster: {', '.join(missing)} missing (apt-get install -y slurm-wlm munge)")
    started = False
    if subprocess.run([str(SCRIPT), "status"], capture_output=True, text=True).returncode != 0:
        out = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"scripts/local_slurm.sh start failed:\n{out.stdout}\n{out.stderr}"
        started = True
    env = subprocess.run([str(SCRIPT), "env"], capture_output=True, text=True, check=True).stdout
    conf = re.search(r"SLURM_CONF=(\S+)", env).group(1)
    yield conf
    if started:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120)


class Sweep:
    """``python -m glm_experiments --multirun ...`` in the background, its output in a file."""

    def __init__(self, args: list[str], cwd: Path, conf: str):
        self.cwd, self.dir = cwd, cwd / "sweep"
        self.log = cwd / "sweep.log"
        env = checkout_env({**os.environ, "PYTHONUNBUFFERED": "1", "SLURM_CONF": conf})
        env.pop("HYDRA_FULL_ERROR", None)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "glm_experiments", "--multirun", *args,
                                          f"hydra.sweep.dir={self.dir}"], cwd=cwd, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, text=True)
        self.env = env

    def output(self) -> str:
        return self.log.read_text()

    def array_id(self, timeout: float = 120) -> str:
        """The array's id (a sweep of one job: the job's)."""
        return self._wait(lambda: (re.search(r"SLURM job array (\d+)", self.output()) or [None, None])[1], timeout,
                          "the array's id")

    def job_log(self, task: int) -> Path:
        return self.dir / ".submitit" / f"{self.array_id()}_{task}" / f"{self.array_id()}_{task}_0_log.out"

    def wait_for_step(self, task: int, step: int, timeout: float = 240, log: Path | None = None) -> None:
        def reached():
            path = log or self.job_log(task)
            return path.exists() and re.search(rf"^step {step}/", path.read_text(), re.M)

        self._wait(reached, timeout, f"job #{task} at step {step}")

    def _wait(self, ready, timeout: float, what: str, launcher_ends_first: bool = False):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = ready()
            if found:
                return found
            if self.proc.poll() is not None and not launcher_ends_first:
                raise AssertionError(f"the sweep ended (rc {self.proc.returncode}) before {what}:\n"
                                     f"{self.output()[-4000:]}")
            time.sleep(0.3)
        raise AssertionError(f"no {what} after {timeout} s:\n{self.output()[-4000:]}")

    def finish(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the sweep did not end in {timeout} s:\n{self.output()[-4000:]}") from None

    def job_dir(self, num: int) -> Path:
        return next(d for d in self.dir.iterdir() if d.name.startswith(f"{num}_"))

    def close(self) -> None:
        """Whatever happened: the launching process and the array end."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        array = re.search(r"SLURM job array (\d+)", self.output())
        if array:
            subprocess.run(["scancel", array[1]], env=self.env, capture_output=True)

    def slurm(self, *args: str) -> str:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def sweeps():
    started: list[Sweep] = []

    def start(args: list[str], cwd: Path, conf: str) -> Sweep:
        started.append(Sweep(args, cwd, conf))
        return started[-1]

    yield start
    for sweep in started:
        sweep.close()


def runs(tmp_path: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("glm_experiments")
    everything = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in everything if r.data.tags.get("glm_experiments.role") == "sweep_parent"]
    assert len(parents) == 1, [r.info.run_name for r in everything]
    children = [r for r in everything if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return client, parents[0], children


def assert_no_sacct_warning_per_poll(output: str) -> None:
    assert "Bypassing sacct error" not in output, output[-3000:]
    assert output.count("job states come from squeue") == 1, output[-3000:]


def elapsed_s(sweep: Sweep, job: str) -> int:
    """Seconds the job's current start has run (squeue's [days-][hours:]minutes:seconds)."""
    text = sweep.slurm("squeue", "-h", "-j", job, "-o", "%M").strip()
    days, _, clock = text.rpartition("-")
    seconds = 0
    for part in clock.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds + int(days or 0) * 86400


def wait_for_restart(sweep: Sweep, job: str, restarts: int, timeout: float = 120) -> None:
    """Until SLURM holds ``job`` PENDING for its ``restarts``-th start."""
    def pending():
        shown = sweep.slurm("scontrol", "show", "job", job)
        return "JobState=PENDING" in shown and f"Restarts={restarts}" in shown

    sweep._wait(pending, timeout, f"job {job} pending for restart {restarts}")


def seconds_per_step() -> float:
    """About what one training step of the tiny job takes here, on one thread (LoRA on the tiny GLM, a batch of
    8 x 64 tokens): the time-limit requeue needs the job still training 30 s after the limit is brought near."""
    import torch

    from glm_experiments.methods import get_method
    from glm_experiments.models.loading import load_model_and_tokenizer
    from tests.helpers.common import compose

    cfg = compose(["model=tiny"])
    model, _ = load_model_and_tokenizer(cfg.model)
    model = get_method(cfg.method.name).apply(model, cfg.method)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (8, 64))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(13):
            if i == 3:
                start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    return (time.perf_counter() - start) / 10


@pytest.mark.slow
def test_sweep_requeued_by_scontrol_and_time_limit_resumes_in_the_same_run(slurm_conf, tmp_path, sweeps):
    # ~60 s of training after step 150, where the time limit is brought near (its signal comes within 30 s)
    steps = 150 + math.ceil(60 / seconds_per_step())
    sweep = sweeps([*SLURM_JOB, "hydra.launcher.timeout_min=10", "hydra.launcher.signal_delay_s=20",
                    f"train.max_steps={steps}", TWINS], tmp_path, slurm_conf)
    array = sweep.array_id()
    job0 = f"{array}_0"
    # 1. an administrator's requeue (SIGTERM): training stops at the step's end, checkpointed
    sweep.wait_for_step(0, 50)
    sweep.slurm("scontrol", "requeue", job0)
    # 2. restarted, it reaches its time limit: the limit is brought to 45 s from now, so that SLURM's next time
    # check (every 30 s) sends submitit's USR2 (signal_delay_s=20, plus that check's 30 s); the job checkpoints
    # and requeues itself; the limit is then set back for its third start
    sweep.wait_for_step(0, 150)
    limit = elapsed_s(sweep, job0) + 45
    sweep.slurm("scontrol", "update", f"JobId={job0}", f"TimeLimit={limit // 60}:{limit % 60:02d}")
    wait_for_restart(sweep, job0, 2)
    sweep.slurm("scontrol", "update", f"JobId={job0}", "TimeLimit=10")
    rc = sweep.finish()
    output = sweep.output()
    assert rc == 0, output[-4000:]
    assert "ended FINISHED (2 jobs, 0 failed)" in output, output[-3000:]
    assert_no_sacct_warning_per_poll(output)
    # the scheduler's word (a job's process may still be exiting when its result is there)
    sweep._wait(lambda: "RUNNING" not in sweep.slurm("squeue", "-h", "-r", "-t", "all", "-o", "%T", "-j", array),
                60, "both jobs ended in squeue", launcher_ends_first=True)
    states = sweep.slurm("squeue", "-h", "-r", "-t", "all", "-o", "%i %T", "-j", array).split("\n")
    assert sorted(s for s in states if s) == [f"{job0} COMPLETED", f"{array}_1 COMPLETED"], states
    log0 = sweep.job_log(0).read_text()
    assert "SIGTERM: training stops at the end of this step" in log0, log0[-3000:]  # scontrol requeue
    assert "SIGUSR2 (time limit): the job requeues itself" in log0, log0[-3000:]

    client, parent, children = runs(tmp_path)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["job.0.status"] == parent.data.tags["job.1.status"] == "FINISHED"
    assert len(children) == 2, [c.info.run_name for c in children]  # one run per job, restarts included
    by_job = {c.data.tags["hydra.overrides"].count("eval.max_new_tokens=5"): c for c in children}
    requeued, twin = by_job[0], by_job[1]
    assert requeued.info.status == twin.info.status == "FINISHED"
    assert requeued.data.tags["glm_experiments.restarts"] == "2", requeued.data.tags
    assert "glm_experiments.restarts" not in twin.data.tags
    assert "error" not in requeued.data.tags
    # every step trained and logged once: each start began at the step its interruption checkpointed
    history = client.get_metric_history(requeued.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))
    checkpoints = sorted(int(p.name.split("-")[1]) for p in sweep.job_dir(0).glob("checkpoints/checkpoint-*"))
    assert len(checkpoints) == 2 and 50 <= checkpoints[0] < 150 <= checkpoints[1] < steps, (checkpoints, steps)
    assert requeued.data.tags["resumed_from_checkpoint"] == f"checkpoint-{checkpoints[1]}"
    assert requeued.data.metrics["train/loss"] == pytest.approx(twin.data.metrics["train/loss"], rel=1e-4)


@pytest.mark.slow
def test_scancel_ends_children_and_parent_killed(slurm_conf, tmp_path, sweeps):
    sweep = sweeps([*SLURM_JOB, "train.max_steps=2000", TWINS], tmp_path, slurm_conf)
    array = sweep.array_id()
    sweep.wait_for_step(0, 20)
    sweep.slurm("scancel", array)
    rc = sweep.finish(timeout=180)
    output = sweep.output()
    assert rc == 143, output[-4000:]
    assert f"SLURM cancelled job(s) #0 ({array}_0), #1 ({array}_1)" in output, output[-3000:]
    assert_no_sacct_warning_per_poll(output)
    client, parent, children = runs(tmp_path)
    assert parent.info.status == "KILLED"
    assert parent.data.tags["job.0.status"] == parent.data.tags["job.1.status"] == "KILLED"
    started = list(children)
    assert started, "no job had started its run"
    assert all(c.info.status == "KILLED" for c in started), [(c.info.run_name, c.info.status) for c in started]
    # the job that was training checkpointed the step it was at (resume=auto continues it by hand)
    assert list(sweep.job_dir(0).glob("checkpoints/checkpoint-*")), list(sweep.job_dir(0).iterdir())


@pytest.mark.slow
def test_one_time_limit_too_many_fails_the_job_with_the_reason(slurm_conf, tmp_path, sweeps):
    """max_num_timeout=0: the first time-limit signal (sent as submitit's own tests send it: USR2 to the job's
    step, which a job of under 10 minutes takes for its time limit) ends the run FAILED, the reason on the parent."""
    sweep = sweeps([*SLURM_JOB, "hydra.launcher.timeout_min=5", "hydra.launcher.max_num_timeout=0",
                    "train.max_steps=2000"], tmp_path, slurm_conf)
    job = sweep.array_id()  # one job: a plain job id
    sweep.wait_for_step(0, 20, log=sweep.dir / ".submitit" / job / f"{job}_0_log.out")
    sweep.slurm("scancel", "--signal=USR2", job)
    rc = sweep.finish(timeout=180)
    output = sweep.output()
    assert rc == 2, output[-4000:]  # a failed sweep ends with its job's one error line, exit 2 (bad input or limits)
    assert "ended FAILED (1 jobs, 1 failed)" in output, output[-3000:]
    assert "\nerror: SLURM job " in output and "max_num_timeout=0 allows: not requeued again" in output
    _, parent, children = runs(tmp_path)
    assert parent.info.status == "FAILED"
    error = parent.data.tags["job.0.error"]
    assert error.startswith(f"TimeLimitReached: SLURM job {job} reached its time limit") and "\n" not in error, error
    assert "max_num_timeout=0 allows: not requeued again" in error
    assert [c.info.status for c in children] == ["FAILED"]
    assert list(sweep.job_dir(0).glob("checkpoints/checkpoint-*")), "no checkpoint of the step it stopped at"


def test_local_slurm_script_refuses_without_packages(tmp_path):
    """Without slurm-wlm and munge the script installs nothing and names the apt command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "id", "dirname", "basename", "cat", "readlink", "sed", "head", "hostname"):
        path = shutil.which(tool)
        if path:
            (bin_dir / tool).symlink_to(path)
    script = tmp_path / "local_slurm.sh"
    script.write_text(SCRIPT.read_text().replace("SBIN=/usr/sbin", f"SBIN={tmp_path / 'nowhere'}")
                      .replace("/usr/bin/sbatch", str(tmp_path / "nowhere" / "sbatch")))
    out = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True,
                         env={"PATH": str(bin_dir), "LOCAL_SLURM_DIR": str(tmp_path / "state")})
    assert out.returncode == 1
    assert "missing Debian package(s) slurm-wlm munge" in out.stderr and "apt-get install -y slurm-wlm munge" in out.stderr
    assert not (tmp_path / "state").exists()
