"""``hydra/launcher=slurm``: what a job does when SLURM interrupts it, and how the launching process follows jobs.

In the job's process (``JobInterruptions``, around the job by ``SlurmArray.__call__``, slurm_array.py):

* submitit starts every job with ``--signal=USR2@<signal_delay_s>`` and its own handler for USR2 (checkpoint the
  callable, ``scontrol requeue``, exit). Here USR2 and SIGTERM that arrive while the Trainer trains stop it at the
  end of the current step, with a checkpoint of that step (``interrupts.STOP``); the run ends KILLED.
* USR2 alone (the time limit is ``signal_delay_s`` away, or a preemption with ``preempt_send_user_signal``): the
  job requeues itself through submitit (its pickled callable dumped again with one timeout less, then
  ``scontrol requeue``), ``hydra.launcher.max_num_timeout`` times at most for time limits (preemptions do not
  count). One more time limit: the run ends FAILED with the reason (``TimeLimitReached``), the parent shows it.
* SIGTERM (``scontrol requeue``, a preemption, ``scancel``, the time limit itself): SLURM ends the job and requeues
  it or not; the job only stops cleanly.
* restarted (``SLURM_RESTART_COUNT`` > 0): the job continues its directory with ``resume=auto`` and its MLflow run
  (``CONTINUE_RUN_ENV``: same run id, RUNNING again, tag ``glm_experiments.restarts``).

In the launching process: submitit follows jobs through ``sacct``, which needs SLURM's accounting daemon; where
there is none (a small or local cluster) it would warn at every poll and never see a cancelled job end. Then
``SqueueWatcher`` reads the states from ``squeue`` instead (said once).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from glm_experiments.errors import UserError
from glm_experiments.recipe.interrupts import STOP

log = logging.getLogger(__name__)

RESTART_ENV = "SLURM_RESTART_COUNT"


class TimeLimitReached(UserError):
    """A job's time limit came once more than ``hydra.launcher.max_num_timeout`` allows: not requeued again."""


def restart_count() -> int:
    """How often SLURM started this job again (requeued): 0 for its first start."""
    value = os.environ.get(RESTART_ENV, "")
    return int(value) if value.isdigit() else 0


# ----------------------------------------------------------------------------------------- in the job's process
class JobInterruptions:
    """USR2 and SIGTERM of a SLURM job: training stops at a step's end; USR2 alone requeues the job (submitit)."""

    def __init__(self, max_num_timeout: int, job_dir_hint: str = "") -> None:
        self.max_num_timeout = max_num_timeout
        self.job_dir_hint = job_dir_hint
        self.requeue_countdown: int | None = None  # set when this job must requeue itself on the way out
        self.submitit = None  # submitit's SignalHandler (its DelayedSubmission, start time, job environment)

    def __enter__(self) -> JobInterruptions:
        from submitit.core.job_environment import JobEnvironment

        self.usr_sig = JobEnvironment._usr_sig()
        handler = signal.getsignal(self.usr_sig)
        self.submitit = getattr(handler, "__self__", None)  # SignalHandler.checkpoint_and_try_requeue
        self.previous = {sig: signal.getsignal(sig) for sig in (self.usr_sig, signal.SIGTERM)}
        signal.signal(self.usr_sig, self._on_signal)
        # SIGTERM outside training: submitit's (logs it); inside train.run: interrupts.raise_interrupt -> STOP
        signal.signal(signal.SIGTERM, self._on_sigterm_outside_run)
        STOP.reset(True, self._interruption)
        return self

    def __exit__(self, *exc) -> None:
        STOP.reset(False)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        STOP.handle(signum, frame)

    def _on_sigterm_outside_run(self, signum, frame) -> None:
        # composing the job or recording it on the parent: nothing to save; SLURM decides what follows
        STOP.received.append("SIGTERM")
        log.warning("SIGTERM outside the run: SLURM ends the job")

    def _interruption(self, name: str) -> BaseException:
        """What ends the run after ``name`` stopped it (called once training stopped, or at once outside it)."""
        usr = signal.Signals(self.usr_sig).name
        if "SIGTERM" in STOP.received or name != usr or self.submitit is None:
            # SLURM itself ends this job (scancel, scontrol requeue, a preemption, the time limit): it requeues it
            # or not; the run ends KILLED with its checkpoint
            return KeyboardInterrupt(name)
        delayed = self.submitit._delayed
        timed_out = self.submitit.has_timed_out()
        countdown = delayed._timeout_countdown - int(timed_out)
        if countdown < 0:
            return TimeLimitReached(
                f"SLURM job {job_id()} reached its time limit (hydra.launcher.timeout_min={delayed._timeout_min}) "
                f"{self.max_num_timeout + 1} time(s), more than hydra.launcher.max_num_timeout="
                f"{self.max_num_timeout} allows: not requeued again; its last checkpoint is kept (continue it with "
                f"hydra.run.dir=<its job dir> resume=auto, or a larger timeout_min)")
        self.requeue_countdown = countdown
        log.warning("%s (%s): the job requeues itself (%d time limit(s) left)", name,
                    "time limit" if timed_out else "preempted", countdown)
        return KeyboardInterrupt(name)

    def requeue_if_due(self) -> None:
        """After the run ended KILLED on USR2: submitit's checkpoint (the callable again, one timeout less) and
        ``scontrol requeue``; exits the process without a result (the launching process keeps waiting)."""
        if self.requeue_countdown is None or "SIGTERM" in STOP.received:
            return
        from submitit.core.job_environment import _checkpoint

        handler = self.submitit
        reason = _checkpoint(handler._delayed, handler._job_paths.submitted_pickle, self.requeue_countdown)
        if reason:
            log.error("not requeued: %s", reason)
            return
        try:
            handler.env._requeue(self.requeue_countdown)
        except (subprocess.SubprocessError, OSError) as exc:
            log.error("scontrol requeue failed (%s): the job ends here; continue it with resume=auto", exc)
            return
        log.info("requeued: SLURM starts this job again, which continues from its last checkpoint")
        sys.exit(-1)


def job_id() -> str:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "?")


# ------------------------------------------------------------------------------- in the launching process
# squeue's states of a job that has not ended (it may run again: requeued, held, suspended)
NOT_ENDED = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "COMPLETING",
             "CONFIGURING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "PREEMPTED", "SPECIAL_EXIT",
             "UNKNOWN", "READY"}


def sacct_works(job_id: str) -> tuple[bool, str]:
    """(whether ``sacct`` answers, its error's first line). No accounting storage: "Slurm accounting storage is disabled"."""
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "State", "--parsable2"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, str(exc)
    first = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[0]
    return out.returncode == 0, first


def squeue_watcher_class():
    from submitit.slurm.slurm import SlurmInfoWatcher

    class SqueueWatcher(SlurmInfoWatcher):
        """submitit's watcher with ``squeue`` in place of ``sacct``: every job the controller still holds (ended
        ones for its MinJobAge, 300 s by default), one line per array task; a job it no longer holds has ended."""

        def __init__(self, delay_s: int = 60) -> None:
            super().__init__(delay_s=delay_s)
            self._asked: set[str] = set()

        def _make_command(self):
            to_check = {x.split("_")[0] for x in self._registered - self._finished}
            if not to_check:
                return None
            self._asked = {x for x in self._registered - self._finished}
            return ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%N", "-j", ",".join(sorted(to_check))]

        def read_info(self, string):
            if not isinstance(string, str):
                string = string.decode()
            info: dict[str, dict[str, str]] = {}
            for line in string.splitlines():
                parts = line.strip().split("|")
                if len(parts) == 3:
                    info[parts[0]] = {"JobID": parts[0], "State": parts[1], "NodeList": parts[2]}
            for job in self._asked - info.keys():  # no longer held by the controller: ended long ago
                info[job] = {"JobID": job, "State": "ENDED", "NodeList": ""}
            return info

        def is_done(self, job_id: str, mode: str = "standard") -> bool:
            return self.get_state(job_id, mode=mode).upper().split()[0] not in NOT_ENDED

    return SqueueWatcher


def follow_jobs(jobs: list) -> None:
    """Where ``sacct`` does not answer (no accounting storage): the jobs' states from ``squeue``, said once."""
    if not jobs:
        return
    works, error = sacct_works(jobs[0].job_id.split("_")[0])
    if works:
        return
    log.info("sacct does not answer here (%s): job states come from squeue", error)
    watcher = squeue_watcher_class()()
    for job in jobs:
        job.watcher = watcher
        watcher.register_job(job.job_id)


def cancelled(job) -> bool:
    """The scheduler ended ``job`` by ``scancel`` (sacct: 'CANCELLED by <uid>')."""
    try:
        return job.watcher.get_state(job.job_id, mode="cache").upper().startswith("CANCELLED")
    except Exception:  # noqa: BLE001 - no state: not known to be cancelled
        return False


def wait_all(jobs: list, poll_s: float = 1.0) -> None:
    """Until every job has ended (a result, or the scheduler says so), polling as submitit's ``wait`` does."""
    pending = list(jobs)
    while pending:
        pending = [job for job in pending if not job.done()]
        if pending:
            time.sleep(poll_s)


def state_summary(jobs: list) -> dict[str, Any]:
    return {job.job_id: job.watcher.get_state(job.job_id, mode="cache") for job in jobs}
