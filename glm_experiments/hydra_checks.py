"""Hydra callback: an output directory that cannot be created is one ``error:`` line and exit code 2.

Hydra creates ``hydra.run.dir`` (``hydra.sweep.dir``) itself, before the task function runs, so a path
under a file or in a read-only place would end in Hydra's traceback; checked here, before it tries.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from glm_experiments.errors import EXIT_BAD_INPUT, UserError, one_line


def check_creatable(setting: str, directory: str | os.PathLike) -> None:
    """``directory`` exists as a writable directory or can be created (its nearest existing ancestor is one)."""
    path = Path(directory).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{setting}={directory}: cannot be created, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{setting}={directory}: {existing} is not writable")


class OutputDirCheck(Callback):
    def _check(self, setting: str, directory: Any) -> None:
        try:
            check_creatable(setting, str(directory))
        except UserError as exc:
            print(one_line(exc), file=sys.stderr)
            raise SystemExit(EXIT_BAD_INPUT) from None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check("hydra.sweep.dir", config.hydra.sweep.dir)
