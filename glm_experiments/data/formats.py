"""Read the data formats users have into one message list per sample, validating every record first.

Formats (``data.format``):

* ``adgen`` -- AdvertiseGen ``{"content": ..., "summary": ...}``; the prompt/response columns are
  configurable (``prompt_column``, ``response_column``) and an optional ``history_column`` holds
  earlier turns as ``[[query, response], ...]`` (ChatGLM-6B's ptuning/main.py convention).
* ``conversations`` -- ChatGLM3's multi-turn format ``{"conversations": [{"role", "content", ...}],
  "tools": [...]}``, converted as ChatGLM3's finetune_demo does:

  - ``tools`` (a list) are dumped with ``json.dumps(tools, ensure_ascii=False)`` (finetune_demo
    README; compact, to keep prompts short -- preprocess_utils.py also passed indent=4) into the
    first system message, after its content and a newline (ChatGLM3's tokenizer joins a system
    prompt and its tools this way); without a system message one is created whose content is
    ChatGLM3's tool preamble ``"Answer the following questions as best as you can. You have access
    to the following tools:\\n"`` followed by the dump (finetune_demo/preprocess_utils.py).
  - a ``tool`` message ``{"role": "tool", "name", "parameters": {...}, "observation"?}`` becomes an
    assistant message with ``metadata`` = the tool name and content = the call written as Python,
    ``"```python\\ntool_call(key='value', ...)\\n```"``, followed by an ``observation`` message
    (``loss`` false) holding its ``observation`` (non-strings dumped as JSON). A tool message
    without an ``observation`` field must be followed by an ``observation`` message.
  - a message's ``loss`` flag (true/false) is kept; the template decides the default
    (loss on assistant messages only).
* ``instruction`` -- ``{"instruction", "input"?, "output"}`` (Alpaca / LLaMA-Factory, triple
  extraction): one user message ``instruction + "\\n" + input`` (just the instruction when input is
  empty) and the assistant output.

A file is JSON lines, or a single JSON array when its first non-space character is ``[``. Every
record is checked before any training; each bad one is reported as ``path:line: reason``.
With ``on_error: raise`` all of them are collected and raised as one :class:`DataError`; with
``on_error: skip`` they are dropped and counted in the :class:`LoadReport`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm_experiments.constants import PROJECT_ROOT
from glm_experiments.data.converters import (  # noqa: F401  (TOOL_DEFINITION_PREFIX, format_tool_call: part of this module's API)
    CONVERTERS,
    TOOL_DEFINITION_PREFIX,
    BadRecord,
    check_unicode,
    format_tool_call,
)
from glm_experiments.errors import UserError

log = logging.getLogger(__name__)

FORMATS = ("adgen", "conversations", "instruction")
ON_ERROR = ("raise", "skip")
MAX_LISTED_ERRORS = 20

# JSON lines or a JSON array; anything else (.csv, .parquet, ...) is refused by name instead of parsed as JSON
DATA_SUFFIXES = (".json", ".jsonl", ".jsonlines", ".ndjson")


@dataclass
class Sample:
    """One training/eval example: messages as the templates consume them (data/templates.py)."""

    messages: list[dict]
    tools: list | None
    source: str  # "path:line" of the record

    @property
    def prompt_messages(self) -> list[dict]:
        """Everything before the final reply (what generation is conditioned on)."""
        return self.messages[:-1]

    @property
    def response(self) -> str:
        """The final assistant reply (the reference for generation metrics)."""
        return self.messages[-1]["content"]


@dataclass
class LoadReport:
    path: str
    format: str
    records: int = 0  # records read, good and bad
    skipped: int = 0  # bad records dropped (on_error=skip)
    errors: list[str] = field(default_factory=list)  # "path:line: reason", one per bad record

    @property
    def loaded(self) -> int:
        return self.records - self.skipped

    def summary(self) -> str:
        text = f"{self.path}: {self.loaded} samples from {self.records} records ({self.format})"
        return text + (f", {self.skipped} bad records skipped" if self.skipped else "")


class DataError(UserError, ValueError):
    """Bad data; the message lists each bad record as ``path:line: reason`` (at most 20 lines)."""

    def __init__(self, message: str, errors: list[str] | None = None):
        self.errors = list(errors or [])
        super().__init__(message)


def format_errors(errors: list[str], limit: int = MAX_LISTED_ERRORS) -> str:
    lines = errors[:limit]
    if len(errors) > limit:
        lines.append(f"... and {len(errors) - limit} more")
    return "\n".join("  " + line for line in lines)


# ------------------------------------------------------------------------------------ paths
def _existing_data_file(candidate: Path, label: str) -> Path | None:
    if candidate.is_dir():
        raise DataError(f"{label}: is a directory, expected a data file (JSON lines or a JSON array)")
    if not candidate.is_file():
        return None
    if candidate.suffix.lower() not in DATA_SUFFIXES:
        raise DataError(f"{label}: unknown data file type {candidate.suffix or '(no suffix)'!r} "
                        f"(expected JSON lines or a JSON array: {', '.join(DATA_SUFFIXES)})")
    return candidate


def resolve_data_path(path: str | Path, setting: str | None = None) -> Path:
    """An absolute path as is; a relative one against the cwd, Hydra's original cwd, then the project root.
    ``setting`` (e.g. ``data.train_file``) is named in the messages."""
    label = f"{setting}={path}" if setting else str(path)
    where = f"{setting}; " if setting else ""
    path = Path(path).expanduser()
    if path.is_absolute():
        if _existing_data_file(path, label):
            return path
        raise DataError(f"data file not found: {path} ({where}cwd {Path.cwd()})")
    bases = [Path.cwd()]
    try:  # Hydra may have changed into the run directory (hydra.job.chdir=true)
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            bases.append(Path(HydraConfig.get().runtime.cwd))
    except Exception:  # noqa: BLE001 - hydra missing or not running: nothing to add
        pass
    bases.append(PROJECT_ROOT)
    tried: list[Path] = []
    for base in bases:
        candidate = (base / path).resolve()
        if candidate in tried:
            continue
        tried.append(candidate)
        if _existing_data_file(candidate, label):
            return candidate
    also = "; also looked in " + ", ".join(str(p.parent) for p in tried[1:]) if len(tried) > 1 else ""
    raise DataError(f"data file not found: {path} ({where}cwd {Path.cwd()}{also})")


# -------------------------------------------------------------------------------- reading
def _json_error(err: json.JSONDecodeError) -> str:
    # reported at the line of the error, so only the column is added
    return f"malformed JSON: {err.msg} (column {err.colno})"


def read_records(path: Path, shown: str | None = None) -> tuple[list[tuple[int, Any]], list[str], bool]:
    """Parse a JSON-lines file or a JSON array into ``[(line, value)]``, ``path:line: reason`` errors
    and whether an error was fatal (the rest of the file could not be read).

    In an array a record's line is the line where its element starts. A syntax error inside an
    array ends parsing (the following elements cannot be located) and is reported at its own
    line; in JSON lines each bad line is one bad record and the others still load.
    """
    shown = str(path) if shown is None else shown
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        return [], [f"{shown}:{line}: not UTF-8 text ({err.reason} at byte {err.start})"], True
    stripped = text.lstrip()
    if stripped.startswith("["):
        records, errors = _read_array(shown, text, len(text) - len(stripped))
        return records, errors, bool(errors)
    records, errors = _read_lines(shown, text)
    return records, errors, False


def _read_lines(shown: str, text: str) -> tuple[list[tuple[int, Any]], list[str]]:
    records, errors = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            if not records and not errors:
                # maybe one pretty-printed object rather than JSON lines
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    pass
                else:
                    return [(number, value)], []
            errors.append(f"{shown}:{number}: {_json_error(err)}")
    return records, errors


def _read_array(shown: str, text: str, start: int) -> tuple[list[tuple[int, Any]], list[str]]:
    decoder = json.JSONDecoder()
    records: list[tuple[int, Any]] = []

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def fail(pos: int, reason: str):
        return records, [f"{shown}:{line_of(pos)}: {reason}"]

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_ws(start + 1)
    if pos < len(text) and text[pos] == "]":
        pos = skip_ws(pos + 1)
        return (records, []) if pos == len(text) else fail(pos, "malformed JSON: extra data after the array")
    while True:
        if pos >= len(text):
            return fail(pos, "malformed JSON: the array is not closed with ']'")
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            return fail(err.pos, _json_error(err))
        records.append((line_of(pos), value))
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            pos = skip_ws(pos + 1)
            if pos != len(text):
                return fail(pos, "malformed JSON: extra data after the array")
            return records, []
        if pos >= len(text):
            return fail(pos, "malformed JSON: the array is not closed with ']'")
        return fail(pos, _json_error(json.JSONDecodeError("Expecting ',' delimiter", text, pos)))


# ---------------------------------------------------------------------------------- entry
def load_samples(path: str | Path, cfg, setting: str | None = None) -> tuple[list[Sample], LoadReport]:
    """Read and validate one data file.

    ``cfg`` is DataConfig-like (attributes ``format``, ``prompt_column``, ``response_column``,
    ``history_column``, ``on_error``). Raises :class:`DataError` for a missing file, an unknown
    format, bad records with ``on_error: raise`` (all of them listed), a file whose rest cannot be
    parsed (a broken JSON array, not UTF-8) or a file with no usable record.
    """
    fmt = getattr(cfg, "format", None)
    if fmt not in CONVERTERS:
        raise DataError(f"unknown data format {fmt!r}; known: {', '.join(FORMATS)}")
    on_error = getattr(cfg, "on_error", None) or "raise"
    if on_error not in ON_ERROR:
        raise DataError(f"unknown data.on_error {on_error!r}; known: {', '.join(ON_ERROR)}")
    shown = str(path)  # as the user wrote it: recognisable in messages
    records, errors, fatal = read_records(resolve_data_path(path, setting), shown)
    if fatal:
        raise DataError(f"cannot read {shown} (format {fmt}):\n" + format_errors(errors), errors)
    n_records = len(records) + len(errors)  # a line of broken JSON is a (bad) record too
    convert = CONVERTERS[fmt]
    samples: list[Sample] = []
    for line, record in records:
        try:
            check_unicode(record)
            messages, tools = convert(record, cfg)
        except BadRecord as bad:
            errors.append(f"{shown}:{line}: {bad}")
            continue
        samples.append(Sample(messages=messages, tools=tools, source=f"{shown}:{line}"))
    errors.sort(key=lambda e: _error_line(e, shown))  # syntax and record errors in file order
    report = LoadReport(path=shown, format=fmt, records=n_records, errors=errors)
    if errors and on_error == "raise":
        raise DataError(
            f"{len(errors)} bad record(s) of {n_records} in {shown} (format {fmt}; "
            f"data.on_error=skip drops them):\n" + format_errors(errors),
            errors,
        )
    if errors:
        report.skipped = len(errors)
        log.warning("skipping %d bad record(s) of %d in %s:\n%s", len(errors), n_records, shown, format_errors(errors))
    if not samples:
        detail = f": all {n_records} records are bad" if errors else ": the file has no records"
        raise DataError(f"no usable records in {shown}{detail}", errors)
    return samples, report


def _error_line(error: str, shown: str) -> int:
    """The line of a ``{shown}:{line}: reason`` error."""
    number = error[len(shown) + 1 :].split(":", 1)[0]
    return int(number) if number.isdigit() else 0


__all__ = [
    "DataError",
    "FORMATS",
    "LoadReport",
    "Sample",
    "format_errors",
    "format_tool_call",
    "load_samples",
    "read_records",
    "resolve_data_path",
]
