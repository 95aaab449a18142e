"""The jobs of a ``--multirun`` in parallel: hydra-submitit-launcher's launchers, with what these sweeps need.

``hydra/launcher=parallel`` (conf/hydra/launcher/parallel.yaml): every job in its own process on this machine
through submitit's local executor, at most ``max_parallel`` at a time, each pinned to its own GPU(s).
``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml): every job a task of one sbatch job array
(``SlurmArray``, glm_experiments/scale/slurm_array.py).
docs/scaling.md shows both.

Everything about running a job is the plugin's and submitit's: pickling the launcher and the job's overrides,
the process (or sbatch script), composing the job's config in it and running it through Hydra's ``run_job`` (so
the job's callbacks, ``on_job_end`` included, run *in the job's process*), logs and results under
``<sweep dir>/.submitit/<job id>/``, timeouts. Added here, in ``launch`` (the launching process):

* parallel: a pool of slots, one per group of ``gpus_per_node`` GPUs (or ``max_parallel`` CPU slots); a job
  starts when a slot is free, with that slot's GPUs as CUDA_VISIBLE_DEVICES (submitit's ``visible_gpus``: the
  local executor otherwise gives every job the same first GPUs) and its share of the cores as OMP_NUM_THREADS;
* every job is waited for, also after one failed; a job whose process ended without a result (killed, out of
  memory, timed out) is recorded FAILED on the MLflow sweep parent here, since its own ``on_job_end`` never ran.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, env_override, filter_overrides

from glm_experiments.errors import EXIT_BAD_INPUT, UserError, debug_requested, one_line
from glm_experiments.recipe.interrupts import sigterm_as_interrupt

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often the parallel launcher looks for a finished job (a process poll: cheap)


def visible_gpus() -> list[int]:
    """The GPU indices jobs may be pinned to: CUDA_VISIBLE_DEVICES' entries (as many as CUDA sees), else all."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if listed is None:
        return list(range(count))
    items = [x.strip() for x in listed.split(",") if x.strip()]
    if not all(x.isdigit() for x in items):
        raise UserError(
            f"CUDA_VISIBLE_DEVICES={listed}: hydra/launcher=parallel pins jobs to GPUs by index; "
            "list indices (0,1,...), not UUIDs"
        )
    return [int(x) for x in items][:count]


def plan_slots(
    gpus: Sequence[int],
    gpus_per_job: int,
    max_parallel: int | None,
    cores: int,
    threads_per_job: int | None,
) -> tuple[list[tuple[int, ...]], int]:
    """(one tuple of GPU indices per concurrent job, torch threads per job). Without GPUs the tuples are empty."""
    if max_parallel is not None and max_parallel < 1:
        raise UserError(
            f"hydra.launcher.max_parallel={max_parallel}: expected >= 1 (or null)"
        )
    if threads_per_job is not None and threads_per_job < 1:
        raise UserError(
            f"hydra.launcher.cpus_per_task={threads_per_job}: expected >= 1 (or null)"
        )
    if gpus_per_job < 0:
        raise UserError(
            f"hydra.launcher.gpus_per_node={gpus_per_job}: expected >= 0 (0 = CPU jobs, GPUs hidden)"
        )
    if gpus and gpus_per_job:
        groups = len(gpus) // gpus_per_job
        if groups == 0:
            raise UserError(
                f"hydra.launcher.gpus_per_node={gpus_per_job} but {len(gpus)} GPU(s) are visible "
                f"({','.join(map(str, gpus))})"
            )
        if max_parallel is not None and max_parallel > groups:
            raise UserError(
                f"hydra.launcher.max_parallel={max_parallel} but {len(gpus)} GPU(s) at "
                f"{gpus_per_job} a job run at most {groups} job(s) at a time"
            )
        n = max_parallel or groups
        slots = [
            tuple(gpus[i * gpus_per_job : (i + 1) * gpus_per_job]) for i in range(n)
        ]
    else:
        n = max_parallel or 1
        slots = [()] * n
    return slots, threads_per_job or max(1, cores // n)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class SweepLauncher:
    """What both launchers add to the plugin's: mixed in before its LocalLauncher / SlurmLauncher by
    hydra_plugins/glm_experiments_launchers (Hydra instantiates launchers only from the hydra_plugins package)."""

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        assert self.config is not None and len(job_overrides) > 0
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info("%s sweep output dir: %s", type(self).__name__, sweep_dir)
        try:
            self._check()
        except UserError as exc:
            self._refuse(exc)
        jobs = [
            (initial_job_idx + i, list(overrides))
            for i, overrides in enumerate(job_overrides)
        ]
        for num, overrides in jobs:
            log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
        submitted = self._submit(jobs)
        return [
            self._result(num, overrides, job)
            for (num, overrides), job in zip(jobs, submitted)
        ]

    def _check(self) -> None:
        """The launcher's settings, before any job starts (UserError: one line, no job runs)."""

    def _refuse(self, error: UserError) -> None:
        callback = self._sweep_callback()
        if callback is not None:
            callback.abort(f"{error}")
        if debug_requested():
            raise error
        print(one_line(error), file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)

    def _submit(self, jobs: list[tuple[int, list[str]]]) -> list:
        raise NotImplementedError

    def _job_args(self, num: int, overrides: list[str]) -> tuple:
        # what the plugin's own launch hands each job (its __call__ composes and runs it in the job's process)
        return (
            overrides,
            "hydra.sweep.dir",
            num,
            f"job_id_for_{num}",
            Singleton.get_state(),
        )

    def _result(self, num: int, overrides: list[str], job) -> JobReturn:
        try:
            if self._ended_without_result(job):
                raise RuntimeError("its process ended and wrote no result")
            return job.results()[0]
        except Exception as exc:  # noqa: BLE001 - the job's process ended without handing back a JobReturn
            lines = [line for line in str(exc).splitlines() if line.strip()]
            error = RuntimeError(
                f"job #{num} ended without a result ({type(exc).__name__}: "
                f"{lines[0] if lines else ''}); its log: {job.paths.stdout}"
            )
            callback = self._sweep_callback()
            if callback is not None:
                callback.record_lost_job(num, overrides, error)
            log.error("%s", error)
            return JobReturn(
                overrides=overrides, status=JobStatus.FAILED, _return_value=error
            )

    def _ended_without_result(self, job) -> bool:
        """Known lost without waiting (submitit waits 15 s for a result file that a slow shared file system may
        not show yet)."""
        return False

    def _sweep_callback(self):
        from glm_experiments.tracking.sweep import MlflowSweepCallback

        callbacks = getattr(self.hydra_context.callbacks, "callbacks", [])
        return next((c for c in callbacks if isinstance(c, MlflowSweepCallback)), None)


class ParallelPool(SweepLauncher):
    """``hydra/launcher=parallel``: the jobs as local processes, ``max_parallel`` at a time, one slot each."""

    def _ended_without_result(self, job) -> bool:
        # a local job writes its result before its process exits, on a local disk
        return job.done() and not job.paths.result_pickle.exists()

    def _check(self) -> None:
        params = self.params
        gpus_per_job = params["gpus_per_node"]
        if gpus_per_job is None:
            gpus_per_job = self.config.launcher.nproc_per_node
        self._slots, self._threads = plan_slots(
            visible_gpus(),
            gpus_per_job,
            params["max_parallel"],
            available_cores(),
            params["cpus_per_task"],
        )

    def _submit(self, jobs: list[tuple[int, list[str]]]) -> list:
        from submitit import LocalExecutor

        params, slots, threads = self.params, self._slots, self._threads
        if not slots[0] and params["max_parallel"] is None:
            log.info(
                "no GPU: one job at a time; hydra.launcher.max_parallel=K runs K CPU jobs at once"
            )
        log.info(
            "%d job(s) at a time, %s, %d thread(s) each",
            len(slots),
            "GPUs " + " | ".join(",".join(map(str, s)) for s in slots)
            if slots[0]
            else "CPU only",
            threads,
        )
        executor = LocalExecutor(folder=params["submitit_folder"], max_num_timeout=0)
        executor.update_parameters(
            timeout_min=params["timeout_min"],
            tasks_per_node=params["tasks_per_node"],
            nodes=1,
            stderr_to_stdout=params["stderr_to_stdout"],
        )
        thread_env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        pending, running, done = deque(jobs), {}, {}
        free = list(range(len(slots)))
        # stopping the sweep (SIGTERM, Ctrl-C) stops its jobs: their runs end KILLED
        try:
            with sigterm_as_interrupt():
                while pending or running:
                    while pending and free:
                        slot, (num, overrides) = free.pop(0), pending.popleft()
                        gpus = list(slots[slot])
                        # submitit sets CUDA_VISIBLE_DEVICES from these; the job's process copies this environment
                        executor.update_parameters(
                            gpus_per_node=len(gpus), visible_gpus=gpus
                        )
                        with env_override(thread_env):
                            running[slot] = (
                                num,
                                executor.submit(self, *self._job_args(num, overrides)),
                            )
                        log.info(
                            "job #%d started (%s)",
                            num,
                            f"GPU {','.join(map(str, gpus))}" if gpus else "CPU",
                        )
                    time.sleep(POLL_SECONDS)
                    for slot, (num, job) in list(running.items()):
                        if job.done():
                            done[num] = job
                            del running[slot]
                            free.append(slot)
        except BaseException:
            stop([job for _, job in running.values()])
            raise
        return [done[num] for num, _ in jobs]


def stop(jobs: list, wait_seconds: float = 60) -> None:
    """SIGTERM to each job's submitit controller (a local job's id is its pid), which passes it on to the job:
    its MLflow run ends KILLED. submitit's own cancel() sends SIGINT, after which the controller SIGKILLs the
    job one second later, before it could end its run."""
    for job in jobs:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(job.job_id), signal.SIGTERM)
    deadline = time.monotonic() + wait_seconds
    while any(not job.done() for job in jobs) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
