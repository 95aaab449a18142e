"""Mistakes Hydra would report with a traceback or a screenful, turned into one ``error:`` line and exit code 2.

* an output directory that cannot be created (a Hydra callback): Hydra creates ``hydra.run.dir``
  (``hydra.sweep.dir``) itself, before the task function runs, so a path under a file or in a read-only place
  would end in Hydra's traceback; checked here, before it tries;
* a group option that does not exist (``method=lorra``): Hydra lists every option of the group, the schema
  nodes ``base_*`` that are no options among them; checked on the command line before Hydra starts.
"""

from __future__ import annotations

import os
import re
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


# Hydra's sweep syntax (choice(...), range(...), glob(...), interval(...)): left to Hydra
_SWEEP_FUNCTION = re.compile(r"^\w+\(.*\)$")


def check_group_choices(argv: list[str], conf_dir: Path) -> None:
    """Every ``group=option[,option...]`` of the command line names an option file ``conf/<group>/<option>.yaml``.
    Hydra's own groups (``hydra/...``) and its sweep functions are left to Hydra."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~").split("@", 1)[0]
        if group.startswith("hydra") or not value or _SWEEP_FUNCTION.match(value):
            continue
        options_dir = conf_dir / group
        if "." in group or not options_dir.is_dir():
            continue
        options = sorted(p.stem for p in options_dir.glob("*.yaml"))
        for option in value.split(","):
            if option not in options and option != "null":
                raise UserError(f"{group}={option}: no such option (conf/{group}/ has {', '.join(options)})")


def exit_on_unknown_group_options(argv: list[str], conf_dir: Path) -> None:
    """:func:`check_group_choices`, as the CLI reports it: one line, exit 2."""
    try:
        check_group_choices(argv, conf_dir)
    except UserError as exc:
        print(one_line(exc), file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


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
