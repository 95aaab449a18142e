"""Helpers for tests that check a command changed nothing: every file's hash, and a command called in-process."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_hashes(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ones included): a file's sha256, "dir" for a directory."""
    root = Path(root)
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def call_cli(main, args: list[str], capsys) -> tuple[int, str]:
    """``main(args)`` of a ``cli_main`` entry point in this process: (exit code, last stderr line)."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err[-3000:]
    return code, (lines[-1] if lines else "")
