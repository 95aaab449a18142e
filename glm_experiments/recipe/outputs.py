"""The one rule for every command that writes an output (merge --out, convert --dst, predict --output).

Nothing a command reads is ever deleted, emptied or rewritten by what it writes:

* ``check_out`` refuses, in one line and before anything is created, an output that is equal to, inside or
  above a path the command reads (the run directory, the checkpoint converted, the adapter), that contains a
  run directory anywhere below it, or that is a non-empty directory not written by this project as an output
  of the same kind. ``--overwrite`` replaces only a directory holding this project's marker file
  (``OUTPUT_MARKER``) of the same kind.
* ``atomic_output_dir`` writes into a sibling temporary directory and renames it into place when (and only
  when) everything was written: a failure leaves the old output, or nothing, and never a partial directory.
* ``atomic_write_text`` / ``atomic_file`` do the same for one file (predictions, metrics, result.json).
* ``parse_size`` reads ``--shard-size`` / ``--max-shard-size`` before anything is created.

This module imports no torch: a refusal is immediate.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from glm_experiments.errors import UserError

OUTPUT_MARKER = ".glm_experiments_output.json"
# what a training run writes into its directory (run_dirs.RUN_PRODUCTS): any of them marks a run directory
RUN_MARKERS = (".hydra", "result.json", "checkpoints")


# ----------------------------------------------------------------------------- sizes
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int, flag: str) -> int:
    """``"2GB"`` -> 2_000_000_000 (transformers' units: KB/MB/GB decimal, KiB/MiB/GiB binary); a UserError
    naming ``flag`` otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise UserError(f"{flag} {text!r}: expected a size such as 2GB, 500MB or 1GiB")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower() or None])
    if value <= 0:
        raise UserError(f"{flag} {text!r}: must be > 0")
    return value


# ----------------------------------------------------------------------------- the rule
def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser().resolve()))


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def holds_run(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_MARKERS)


def _run_below(path: Path, limit: int = 20000) -> Path | None:
    """A run directory at or below ``path`` (None: none found among the first ``limit`` entries)."""
    if holds_run(path):
        return path
    for count, (root, dirs, _) in enumerate(os.walk(path)):
        if count > limit:
            return None
        for name in dirs:
            if holds_run(Path(root) / name):
                return Path(root) / name
        dirs[:] = [d for d in dirs if d not in (".hydra", "checkpoints")]
    return None


# outputs written before the marker existed: the provenance file each command has always written
LEGACY_MARKERS = {"glm_experiments_merge.json": "merge", "conversion.json": "convert"}


def read_marker(path: Path) -> dict | None:
    """What this project wrote ``path`` as (``{"kind": ...}``), or None."""
    for name, kind in ((OUTPUT_MARKER, None), *LEGACY_MARKERS.items()):
        try:
            payload = json.loads((Path(path) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(payload, dict):
            return payload if kind is None else {"kind": kind}
    return None


def check_out(out: Path, kind: str, reads: Iterable[tuple[str, Path]] = (), overwrite: bool = False,
              flag: str = "--out") -> Path:
    """Refuse (UserError, nothing touched) an output directory that would delete, empty or rewrite anything
    read or any run; ``reads``: (what, path) pairs the command reads. Returns ``out`` resolved."""
    target = _resolved(out)
    for what, path in reads:
        if path is None:
            continue
        source = _resolved(path)
        if _is_within(target, source) or _is_within(source, target):
            where = "is" if target == source else "is inside" if _is_within(target, source) else "contains"
            raise UserError(f"{flag} {out} {where} {what} {path}; nothing written: give {flag} a directory "
                            f"outside it")
    if target.exists() and not target.is_dir():
        raise UserError(f"{flag} {out} is a file, not a directory")
    if target.is_dir():
        run = _run_below(target)
        if run is not None:
            raise UserError(f"{flag} {out} {'holds' if run == target else 'contains'} a training run ({run}); "
                            "it is never replaced: give another directory")
        if any(target.iterdir()):
            marker = read_marker(target)
            if marker is None or marker.get("kind") != kind:
                wrote = f"a {marker.get('kind')} output" if marker else "nothing there"
                raise UserError(f"{flag} {out} is not empty and is not a {kind} output of glm_experiments "
                                f"({wrote}); only such a directory is replaced: give an empty or new directory")
            if not overwrite:
                raise UserError(f"{flag} {out} holds an earlier {kind} output (pass --overwrite to replace it)")
    return target


@contextlib.contextmanager
def atomic_output_dir(out: Path, kind: str, info: dict | None = None) -> Iterator[Path]:
    """Yield an empty sibling temporary directory; when the block succeeds, write the marker into it and
    swap it into ``out`` (an earlier output there is removed only after the new one is in place). On any
    failure the temporary directory, and any parent this created, is removed: ``out`` is as it was."""
    out = _resolved(out)
    created = []
    for parent in reversed(out.parents):
        if not parent.exists():
            created.append(parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        marker = {"kind": kind, **(info or {})}
        (tmp / OUTPUT_MARKER).write_text(json.dumps(marker, indent=2, ensure_ascii=False, default=str) + "\n",
                                         encoding="utf-8")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):  # deepest first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


# ----------------------------------------------------------------------------- single files
def check_out_file(out: Path, replaceable=None, flag: str = "--output") -> Path:
    """Refuse an output file that is a directory, lies in a run directory other than under its
    ``predictions/``, or would replace a file that ``replaceable(path)`` does not accept."""
    target = _resolved(out)
    if target.is_dir():
        raise UserError(f"{flag} {out} is a directory; give a file name")
    for parent in target.parents:
        if holds_run(parent):
            inside = target.relative_to(parent).parts[0]
            if inside in (".hydra", "adapter", "checkpoints") or target.parent == parent:
                raise UserError(f"{flag} {out} would write into the run {parent} ({inside}); give a file "
                                "outside it, or under its predictions/")
            break
    if target.exists() and (replaceable is None or not replaceable(target)):
        raise UserError(f"{flag} {out} exists and was not written by this command; not replacing it")
    return target


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
