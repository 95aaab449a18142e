"""Blind side-by-side (A/B) human evaluation of two runs: the session log, the tally, its MLflow run.

A session judges run ``a`` against run ``b`` on the prompts of one data file, one prompt at a time. Which run's
reply is shown on the left is drawn per prompt from a seeded RNG (the seed is in the log), so nobody, not even
the order of the file, tells the judge which run wrote which reply. Every verdict is one JSON line appended to
the session file (flushed and fsynced before the page hears back), so a closed page or a killed server loses
nothing and reopening the same pair on the same file continues at the first prompt without a verdict.

The session file (JSON lines, append-only):

* ``{"type": "session", ...}`` first: both runs (label, directory, MLflow run id), the data file and its
  sha256, the number of prompts, the seed;
* ``{"type": "mlflow", "tracking_uri", "run_id"}``: the ``human_eval`` MLflow run the verdicts are mirrored to
  (a later line replaces an earlier one, e.g. after a move to another store);
* ``{"type": "verdict", "position", "left", "right", "choice", "winner", ...}`` per judged prompt: ``left`` /
  ``right`` are ``"a"`` or ``"b"`` (the run shown there), ``choice`` is what the judge pressed (``left``,
  ``right``, ``tie``, ``both_bad``), ``winner`` the unblinded run (``"a"``, ``"b"`` or null), with both runs'
  names and MLflow ids, the prompt, both replies, the reference, the comment and the time;
* ``{"type": "comment", "position", "comment", "time"}``: a comment typed after the verdict on ``position`` was
  saved; it replaces that verdict's ``comment`` when the file is read (the verdict line itself is never rewritten).

The tally: ``win_rate_a`` = wins of run a / (wins of a + wins of b). Ties and "both bad" are not in that
fraction (they say neither is better); they are counted apart (``ties``, ``both_bad``) and ``n`` counts every
verdict. ``ci_low`` / ``ci_high`` bound ``win_rate_a`` with the Wilson score interval at 95 % (sound for the
small n people judge, unlike the normal approximation); ``p_value`` is a two-sided sign (exact binomial) test of
"neither is preferred" over the decisive votes. The summary reads 'a preferred 14 of 20 decisive votes, 70 % [48,
85], p = 0.12, within noise': better / worse when the interval excludes 50 %, else within noise.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import random
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig

from glm_experiments.errors import UserError
from glm_experiments.study.votes import wilson_interval

log = logging.getLogger(__name__)

ROLE = "human_eval"  # value of the glm_experiments.role tag (compare leaves these runs out of its training runs)
TAG_RUN = "human_eval.run_{}"  # .run_a / .run_b: the MLflow run ids of the two runs judged
CHOICES = ("left", "right", "tie", "both_bad")
DEFINITION = (
    "win_rate_a = wins of run a / (wins of run a + wins of run b) in blind side-by-side votes; ties and "
    "'both bad' are left out of it and counted as ties / both_bad; n = all verdicts; ci_low / ci_high: "
    "Wilson score interval, 95 %; p_value: two-sided sign (binomial) test over the decisive votes"
)


# ------------------------------------------------------------------------------------------ the tally
@dataclass
class Tally:
    wins_a: int = 0
    wins_b: int = 0
    ties: int = 0
    both_bad: int = 0

    @property
    def n(self) -> int:
        return self.wins_a + self.wins_b + self.ties + self.both_bad

    @property
    def decisive(self) -> int:
        return self.wins_a + self.wins_b

    @property
    def win_rate_a(self) -> float | None:
        return self.wins_a / self.decisive if self.decisive else None

    def verdict(self):
        """The sign test over the decisive votes beside the Wilson interval (study.verdicts.VoteVerdict)."""
        from glm_experiments.study.votes import vote_verdict

        interval = wilson_interval(self.wins_a, self.decisive) if self.decisive else None
        return vote_verdict(self.wins_a, self.wins_b, interval)

    def metrics(self) -> dict[str, float]:
        """What the MLflow run logs: the win rate, its interval and the sign test's p once a verdict decided something."""
        out = {"n": self.n, "ties": self.ties, "both_bad": self.both_bad, "wins_a": self.wins_a, "wins_b": self.wins_b}
        if self.decisive:
            low, high = wilson_interval(self.wins_a, self.decisive)
            out.update(win_rate_a=self.win_rate_a, ci_low=low, ci_high=high, p_value=self.verdict().p_value)
        return {k: float(v) for k, v in out.items()}

    def summary(self, label_a: str = "a", label_b: str = "b") -> str:
        text = f"{self.n} verdicts: {label_a} {self.wins_a}, {label_b} {self.wins_b}, ties {self.ties}, both bad {self.both_bad}"
        if self.decisive:
            text += f"; {self.verdict().sentence(label_a, label_b)}"
        return text


def tally(verdicts: list[dict]) -> Tally:
    t = Tally()
    for v in verdicts:
        if v["choice"] == "tie":
            t.ties += 1
        elif v["choice"] == "both_bad":
            t.both_bad += 1
        elif v["winner"] == "a":
            t.wins_a += 1
        else:
            t.wins_b += 1
    return t


# ------------------------------------------------------------------------------------------ the runs
@dataclass
class Contestant:
    """One side of the comparison: a run (or a foreign adapter) and where MLflow knows it."""

    label: str
    run_dir: str  # the run directory (for a foreign adapter: the adapter directory)
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None  # the store that holds mlflow_run_id

    @property
    def key(self) -> str:
        """Short and unique per directory: names the session file. A run by its directory's name (not its label,
        which is its display name: a session file started before that changed is still found)."""
        digest = hashlib.sha1(self.run_dir.encode()).hexdigest()[:6]
        name = self.label if self.label.startswith("adapter:") else Path(self.run_dir).name
        return f"{slug(name)[:40]}-{digest}"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def run_store(run_dir: Path, cfg: DictConfig) -> tuple[str | None, str | None]:
    """(tracking URI, MLflow run id) a run directory was tracked in, or Nones. A relative SQLite URI in the saved
    config is taken relative to the directory the run was started from (``.hydra/hydra.yaml``)."""
    run_id = None
    result = Path(run_dir) / "result.json"
    if result.is_file():
        try:
            run_id = json.loads(result.read_text(encoding="utf-8")).get("run_id") or None
        except (OSError, ValueError):
            run_id = None
    tracking = cfg.get("tracking")  # the run's composed config (.hydra/config.yaml)
    if not run_id or tracking is None or not tracking.get("enabled", True):
        return None, run_id
    uri = str(tracking.get("tracking_uri") or "")
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        cwd = _hydra_cwd(Path(run_dir))
        if cwd is None:
            return None, run_id
        uri = prefix + str((cwd / uri[len(prefix) :]).resolve())
    return uri or None, run_id


def _hydra_cwd(run_dir: Path) -> Path | None:
    try:
        from omegaconf import OmegaConf

        return Path(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.cwd)
    except Exception:  # noqa: BLE001 - no or an odd hydra.yaml: the store cannot be told
        return None


# ------------------------------------------------------------------------------------------ the session
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def session_path(session_dir: Path, a: Contestant, b: Contestant, data_file: Path) -> Path:
    """The same file for the same pair (in either order) and data file: opening it again resumes."""
    first, second = sorted([a.key, b.key])
    digest = hashlib.sha1(str(Path(data_file).resolve()).encode()).hexdigest()[:6]
    return Path(session_dir) / f"{first}__vs__{second}__{slug(Path(data_file).stem)}-{digest}.jsonl"


def default_session_dir(a: Contestant, b: Contestant) -> Path:
    """``human_eval/`` beside the runs: in the folder holding both (a sweep's folder), else beside run a."""
    try:
        common = Path(os.path.commonpath([a.run_dir, b.run_dir]))
    except ValueError:  # different drives
        common = Path(a.run_dir).parent
    if common in (Path(a.run_dir), Path(b.run_dir)) or common == Path(common.anchor):
        common = Path(a.run_dir).parent
    return common / "human_eval"


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).astimezone().isoformat(timespec="seconds")


class ABSession:
    """The verdicts of one blind A/B session, backed by its append-only JSON-lines file."""

    def __init__(
        self, path: Path, header: dict, verdicts: dict[int, dict], mlflow_line: dict | None, written: bool = True
    ):
        self.path, self.header, self.verdicts, self.mlflow = (Path(path), header, verdicts, mlflow_line)
        self.written = written  # False until the first line of a new session is on disk

    # -------------------------------------------------------------------------------- opening
    @classmethod
    def open(
        cls, path: Path, a: Contestant, b: Contestant, data_file: Path, prompts: int, seed: int | None = None
    ) -> ABSession:
        """Resume the session in ``path`` or start it there. Refuses (one line) a file that belongs to other runs
        or to another version of the data file: its positions would point at other prompts."""
        data_file = Path(data_file).resolve()
        sha = file_sha256(data_file)
        path = Path(path)
        if path.exists():
            session = cls.read(path)
            h = session.header
            if {h["run_a"]["run_dir"], h["run_b"]["run_dir"]} != {a.run_dir, b.run_dir}:
                raise UserError(
                    f"{path}: this session judges {h['run_a']['run_dir']} against {h['run_b']['run_dir']}, "
                    f"not {a.run_dir} and {b.run_dir} (give another --session-dir)"
                )
            if h["data_sha256"] != sha:
                raise UserError(
                    f"{path}: its session was judged on another version of {data_file} (sha256 "
                    f"{h['data_sha256'][:12]}…, the file now has {sha[:12]}…); restore the file or give "
                    "another --session-dir"
                )
            if seed is not None and seed != h["seed"]:
                log.warning("%s: resuming with its own seed %s (--seed %s ignored)", path, h["seed"], seed)
            h["prompts"] = max(h["prompts"], prompts)  # more prompts asked for: the layout per position stays
            return session
        header = {
            "type": "session",
            "version": 1,
            "created": _now(),
            "seed": secrets.randbits(32) if seed is None else int(seed),
            "run_a": asdict(a),
            "run_b": asdict(b),
            "data": str(data_file),
            "data_sha256": sha,
            "prompts": int(prompts),
            "definition": DEFINITION,
        }
        # the file is written with the first verdict: opening the page alone leaves nothing behind
        return cls(path, header, {}, None, written=False)

    @classmethod
    def read(cls, path: Path) -> ABSession:
        header, mlflow_line, verdicts, bad = None, None, {}, 0
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash mid-write: nothing was confirmed for it
                    bad += 1
                    log.warning("%s:%d: not a complete JSON line (cut by a crash?): skipped", path, number)
                    continue
                kind = row.get("type")
                if kind == "session" and header is None:
                    header = row
                elif kind == "mlflow":
                    mlflow_line = row
                elif kind == "verdict":
                    verdicts.setdefault(int(row["position"]), row)  # the first verdict of a position counts
                elif kind == "comment" and int(row.get("position", -1)) in verdicts:
                    verdicts[int(row["position"])]["comment"] = str(row.get("comment", ""))
        if header is None:
            raise UserError(f"{path}: no session line (not a human-eval session file?)")
        return cls(path, header, verdicts, mlflow_line)

    # -------------------------------------------------------------------------------- what is shown
    @property
    def n_prompts(self) -> int:
        return int(self.header["prompts"])

    def contestant(self, side: str) -> Contestant:
        return Contestant(**self.header[f"run_{side}"])

    def sides(self, position: int) -> tuple[str, str]:
        """(left, right): which run is shown on each side at ``position``; a fixed function of the seed and
        the position, so a resumed session shows the same layout as before."""
        flip = random.Random(f"{self.header['seed']}:{position}").random() < 0.5
        return ("b", "a") if flip else ("a", "b")

    def next_position(self) -> int | None:
        return next((p for p in range(self.n_prompts) if p not in self.verdicts), None)

    @property
    def done(self) -> bool:
        return self.next_position() is None

    def tally(self) -> Tally:
        return tally([v for p, v in sorted(self.verdicts.items()) if p < self.n_prompts])

    # -------------------------------------------------------------------------------- judging
    def record(
        self,
        position: int,
        choice: str,
        replies: dict[str, str],
        comment: str = "",
        prompt: str = "",
        reference: str = "",
        source: str = "",
        settings: dict | None = None,
    ) -> dict:
        """Append the verdict on ``position`` (``choice`` as pressed: left / right / tie / both_bad) with the
        replies that were shown (``{"a": ..., "b": ...}``) and the generation ``settings``; durable on disk when
        this returns."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        if not 0 <= position < self.n_prompts:
            raise UserError(f"prompt {position + 1} is not in this session (1 to {self.n_prompts})")
        if position in self.verdicts:
            raise UserError(f"prompt {position + 1} already has a verdict")
        left, right = self.sides(position)
        winner = {"left": left, "right": right}.get(choice)
        a, b = self.header["run_a"], self.header["run_b"]
        runs = {"a": a, "b": b}
        row = {
            "type": "verdict",
            "position": position,
            "source": source,
            "left": left,
            "right": right,
            "left_run": runs[left]["label"],
            "right_run": runs[right]["label"],
            "choice": choice,
            "winner": winner,
            "winner_run": runs[winner]["label"] if winner else None,
            "winner_run_id": runs[winner]["mlflow_run_id"] if winner else None,
            "run_a_id": a["mlflow_run_id"],
            "run_b_id": b["mlflow_run_id"],
            "comment": comment.strip(),
            "time": _now(),
            "prompt": prompt,
            "reference": reference,
            "replies": {"a": replies.get("a", ""), "b": replies.get("b", "")},
            "settings": settings or {},
        }
        self._append(row)
        self.verdicts[position] = row
        return row

    def add_comment(self, position: int, comment: str) -> bool:
        """A comment on the verdict already given on ``position`` (typed after the vote): appended as a ``comment``
        line that replaces the verdict's comment when the file is read. False (nothing written) when it equals the
        verdict's comment already; durable on disk when this returns True."""
        if position not in self.verdicts:
            raise UserError(f"prompt {position + 1} has no verdict to add a comment to")
        comment = comment.strip()
        if comment == self.verdicts[position].get("comment", ""):
            return False
        self._append({"type": "comment", "position": position, "comment": comment, "time": _now()})
        self.verdicts[position]["comment"] = comment
        return True

    def set_mlflow(self, tracking_uri: str, run_id: str) -> None:
        self.mlflow = {"type": "mlflow", "tracking_uri": tracking_uri, "run_id": run_id, "time": _now()}
        self._append(self.mlflow)

    def _append(self, row: dict) -> None:
        if not self.written:
            self.written = True
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append(self.header)
            _fsync_dir(self.path.parent)  # the new file's entry survives a crash too
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():  # a line cut by a crash stays on its own line (and is skipped when read)
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
