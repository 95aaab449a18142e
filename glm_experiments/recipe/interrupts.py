"""SIGTERM handled like Ctrl-C.

Schedulers (Slurm, Kubernetes), ``kill`` and torchrun's agent stop a process with SIGTERM, whose Python
default is to die on the spot: no ``finally``, the MLflow run left RUNNING forever. Inside these blocks it
raises KeyboardInterrupt instead (the run ends KILLED, the checkpoints already written stay for
``resume=auto``), or is passed on to a child process that must stop first.

``STOP`` (off unless a launcher enables it: the jobs of ``hydra/launcher=slurm``): a signal that arrives while
the Trainer trains does not interrupt it at once; training stops at the end of the current step with a
checkpoint of that step (``stop_at_step_callback``), and ``raise_if_stopped`` then raises what the launcher
chose (KeyboardInterrupt: the run ends KILLED and the job is requeued). A requeued job so loses no step.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

log = logging.getLogger(__name__)


@contextlib.contextmanager
def on_sigterm(handler):
    """``handler(signum, frame)`` runs on SIGTERM inside the block (main thread only: elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopAtStep:
    """Where a signal during training becomes "stop at this step's end, checkpoint it" (one per process)."""

    def __init__(self) -> None:
        self.enabled = False  # set by a launcher for the job it runs in this process
        self.training = False  # between the Trainer's on_train_begin and on_train_end
        self.signal: str | None = None  # the first signal received while training
        self.received: list[str] = []  # every signal handled while enabled, in order
        # the signal's name -> the exception that ends the run (None: KeyboardInterrupt); set by the launcher
        self.interruption = None

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.enabled:
            self.received.append(name)
        if self.enabled and self.training:
            if self.signal is None:
                self.signal = name
                log.warning("%s: training stops at the end of this step, with a checkpoint of it", name)
            else:
                log.warning("%s: still finishing the step (stopping for %s)", name, self.signal)
            return
        raise self.exception(name)

    def reset(self, enabled: bool, interruption=None) -> None:
        self.enabled, self.interruption, self.signal, self.received = enabled, interruption, None, []

    def exception(self, name: str) -> BaseException:
        return (self.interruption or KeyboardInterrupt)(name)

    def raise_if_stopped(self) -> None:
        """After the Trainer returned: a signal stopped training early (the checkpoint of that step is saved)."""
        if self.signal is not None:
            raise self.exception(self.signal)


STOP = StopAtStep()


def stop_at_step_callback():
    """The Trainer callback of ``STOP``: saves and stops at the end of the step during which a signal came."""
    from transformers import TrainerCallback

    class StopAtStepCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            STOP.training = True

        def on_step_end(self, args, state, control, **kwargs):
            if STOP.signal is not None:
                control.should_save = control.should_training_stop = True

        def on_train_end(self, args, state, control, **kwargs):
            STOP.training = False

    return StopAtStepCallback()


def raise_interrupt(signum, frame):
    STOP.handle(signum, frame)  # KeyboardInterrupt, unless STOP is on and training can stop at its step's end


def sigterm_as_interrupt():
    return on_sigterm(raise_interrupt)


def signal_name(exc: KeyboardInterrupt) -> str:
    return str(exc) or "SIGINT"  # Ctrl-C's KeyboardInterrupt carries no name


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal number: what a shell reports for a process the signal ended (143 for SIGTERM)."""
    return 128 + getattr(signal, signal_name(exc), signal.SIGINT)
