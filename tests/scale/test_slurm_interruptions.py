"""What a hydra/launcher=slurm job decides when a signal comes, and how the launching process reads squeue,
without a cluster (glm_experiments/scale/slurm_jobs.py; the real cluster: test_slurm_cluster.py)."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from glm_experiments.recipe.interrupts import STOP
from glm_experiments.scale.slurm_jobs import (
    JobInterruptions,
    TimeLimitReached,
    squeue_watcher_class,
)


class FakeSubmititHandler:
    """What JobInterruptions reads of submitit's SignalHandler: the pickled job's countdown, timed out or not."""

    def __init__(self, countdown: int, timed_out: bool):
        self._delayed = SimpleNamespace(_timeout_countdown=countdown, _timeout_min=2)
        self.timed_out = timed_out

    def has_timed_out(self) -> bool:
        return self.timed_out

    def checkpoint_and_try_requeue(self, signum, frame=None):  # installed as submitit installs it
        raise AssertionError("submitit's handler must not run: JobInterruptions replaces it")


@pytest.fixture
def job(monkeypatch):
    """JobInterruptions entered over a fake submitit handler (restores the process's handlers after)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}

    def enter(countdown: int = 3, timed_out: bool = True, max_num_timeout: int = 3):
        handler = FakeSubmititHandler(countdown, timed_out)
        signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
        interruptions = JobInterruptions(max_num_timeout)
        interruptions.__enter__()
        entered.append(interruptions)
        return interruptions

    entered: list = []
    yield enter
    for interruptions in entered:
        interruptions.__exit__(None, None, None)
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_signal_during_training_stops_at_the_step_end(job):
    interruptions = job()
    STOP.training = True
    try:
        STOP.handle(signal.SIGUSR2, None)  # no exception: the step goes on
        STOP.handle(signal.SIGTERM, None)  # a second signal neither
        assert STOP.signal == "SIGUSR2" and STOP.received == ["SIGUSR2", "SIGTERM"]
    finally:
        STOP.training = False
    with pytest.raises(KeyboardInterrupt, match="SIGUSR2"):
        STOP.raise_if_stopped()
    # SIGTERM came too: SLURM itself ends the job (a preemption); it must not requeue itself on top
    assert interruptions.requeue_countdown is None
    interruptions.requeue_if_due()  # returns: nothing requeued, no exit


def test_time_limit_requeues_while_timeouts_are_left(job):
    interruptions = job(countdown=2)
    exc = STOP.exception("SIGUSR2")
    assert isinstance(exc, KeyboardInterrupt)
    assert interruptions.requeue_countdown == 1


def test_preemption_does_not_count_as_a_time_limit(job):
    interruptions = job(countdown=0, timed_out=False)
    assert isinstance(STOP.exception("SIGUSR2"), KeyboardInterrupt)
    assert interruptions.requeue_countdown == 0


def test_one_time_limit_too_many_fails_the_job_with_the_reason(job):
    job(countdown=0, timed_out=True, max_num_timeout=0)
    exc = STOP.exception("SIGUSR2")
    assert isinstance(exc, TimeLimitReached)
    assert "more than hydra.launcher.max_num_timeout=0 allows: not requeued again" in str(exc)
    assert "\n" not in str(exc)


def test_sigterm_is_left_to_slurm(job):
    interruptions = job()
    assert isinstance(STOP.exception("SIGTERM"), KeyboardInterrupt)
    assert interruptions.requeue_countdown is None


def test_outside_slurm_jobs_a_signal_interrupts_at_once():
    assert not STOP.enabled
    STOP.training = True
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            STOP.handle(signal.SIGTERM, None)
    finally:
        STOP.training = False


def test_squeue_watcher_reads_array_tasks_and_jobs_it_no_longer_holds():
    watcher = squeue_watcher_class()()
    for job_id in ("17_0", "17_1", "17_2", "17_3"):
        watcher.register_job(job_id)
    command = watcher._make_command()
    assert command[:2] == ["squeue", "-h"] and command[-1] == "17"
    info = watcher.read_info("17_0|RUNNING|vm\n17_1|COMPLETED|vm\n17_2|PENDING|\n")
    watcher._info_dict.update(info)
    assert not watcher.is_done("17_0", mode="cache")
    assert watcher.is_done("17_1", mode="cache")
    assert not watcher.is_done("17_2", mode="cache")
    assert watcher.is_done("17_3", mode="cache")  # purged after MinJobAge: ended
    watcher._info_dict["17_2"] = {"State": "REQUEUE_HOLD"}
    assert not watcher.is_done("17_2", mode="cache")
