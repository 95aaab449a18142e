"""Errors that are the user's to fix: reported as one clear message, without a traceback.

:class:`UserError` is the one base type: DataError, CheckpointError, TokenizerError, CompareError ... derive
from it. Every entry point (train, worker, predict, merge, chat, convert, compare) reports through
:func:`cli_main` / :func:`as_user_error`: one ``error: ...`` line on stderr and exit code 2 (bad input).
``--debug`` or ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys

EXIT_BAD_INPUT = 2
DEBUG_FLAG = "--debug"


class UserError(Exception):
    pass


# What a user can cause raises a UserError (subclass); plain ValueError / RuntimeError are left for internal
# invariants (an adapter applied twice, a forward called without inputs): those are bugs and keep their traceback.
class SettingError(UserError, ValueError):
    """A setting, an adapter or a saved file that does not fit what it is used with."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user pointed at (directly or through a run) is not there."""


def debug_requested(argv: list[str] | None = None) -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or DEBUG_FLAG in (sys.argv[1:] if argv is None else argv)


def as_user_error(exc: BaseException) -> UserError | None:
    """``exc`` as a one-line UserError if it is the user's (or the machine's) to fix, else None (a bug: traceback)."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, OSError):  # unwritable directory, disk full, ...: the path and the reason
        where = f"{exc.filename}: " if exc.filename else ""
        return UserError(f"{where}{exc.strerror or exc}")
    database = sys.modules.get("sqlalchemy.exc")  # only loaded where an MLflow store was opened
    if database is not None and isinstance(exc, database.DBAPIError):  # a corrupt or locked mlflow.db
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return UserError(f"cannot use the MLflow store: {first} (pass another --tracking-uri / tracking.tracking_uri)")
    return None


def one_line(exc: BaseException) -> str:
    return f"error: {exc}"


def cli_main(main):
    """Wrap an argparse entry point ``main(argv) -> int``: user errors become one line and exit code 2."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = debug_requested(argv)
        argv = [a for a in argv if a != DEBUG_FLAG]
        try:
            return main(argv)
        except Exception as exc:  # noqa: BLE001 - sorted into user errors (one line) and bugs (traceback)
            error = as_user_error(exc)
            if debug or error is None:
                raise
            print(one_line(error), file=sys.stderr)
            return EXIT_BAD_INPUT

    return wrapped
