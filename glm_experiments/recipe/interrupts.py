"""SIGTERM handled like Ctrl-C.

Schedulers (Slurm, Kubernetes), ``kill`` and torchrun's agent stop a process with SIGTERM, whose Python
default is to die on the spot: no ``finally``, the MLflow run left RUNNING forever. Inside these blocks it
raises KeyboardInterrupt instead (the run ends KILLED, the checkpoints already written stay for
``resume=auto``), or is passed on to a child process that must stop first.
"""

from __future__ import annotations

import contextlib
import signal
import threading


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


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def sigterm_as_interrupt():
    return on_sigterm(raise_interrupt)


def signal_name(exc: KeyboardInterrupt) -> str:
    return str(exc) or "SIGINT"  # Ctrl-C's KeyboardInterrupt carries no name


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal number: what a shell reports for a process the signal ended (143 for SIGTERM)."""
    return 128 + getattr(signal, signal_name(exc), signal.SIGINT)
