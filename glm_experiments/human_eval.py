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
  names and MLflow ids, the prompt, both replies, the reference, the comment and the time.

The tally: ``win_rate_a`` = wins of run a / (wins of a + wins of b). Ties and "both bad" are not in that
fraction (they say neither is better); they are counted apart (``ties``, ``both_bad``) and ``n`` counts every
verdict. ``ci_low`` / ``ci_high`` bound ``win_rate_a`` with the Wilson score interval at 95 % (sound for the
small n people judge, unlike the normal approximation).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import random
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from glm_experiments.errors import UserError

log = logging.getLogger(__name__)

ROLE = "human_eval"  # value of the glm_experiments.role tag (compare leaves these runs out of its training runs)
ROLE_TAG = "glm_experiments.role"
TAG_RUN = "human_eval.run_{}"  # .run_a / .run_b: the MLflow run ids of the two runs judged
CHOICES = ("left", "right", "tie", "both_bad")
Z95 = 1.959963984540054  # two-sided 95 %
DEFINITION = (
    "win_rate_a = wins of run a / (wins of run a + wins of run b) in blind side-by-side votes; ties and "
    "'both bad' are left out of it and counted as ties / both_bad; n = all verdicts; ci_low / ci_high: "
    "Wilson score interval, 95 %"
)


# ------------------------------------------------------------------------------------------ the tally
def wilson_interval(wins: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``wins / trials`` (``(0, 1)`` when there are no trials)."""
    if trials <= 0:
        return 0.0, 1.0
    p = wins / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


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

    def metrics(self) -> dict[str, float]:
        """What the MLflow run logs: the win rate and its interval only once a verdict decided something."""
        out = {"n": self.n, "ties": self.ties, "both_bad": self.both_bad, "wins_a": self.wins_a, "wins_b": self.wins_b}
        if self.decisive:
            low, high = wilson_interval(self.wins_a, self.decisive)
            out.update(win_rate_a=self.win_rate_a, ci_low=low, ci_high=high)
        return {k: float(v) for k, v in out.items()}

    def summary(self, label_a: str = "a", label_b: str = "b") -> str:
        text = f"{self.n} verdicts: {label_a} {self.wins_a}, {label_b} {self.wins_b}, ties {self.ties}, both bad {self.both_bad}"
        if self.decisive:
            low, high = wilson_interval(self.wins_a, self.decisive)
            text += f"; {label_a} wins {100 * self.win_rate_a:.1f} % of decided votes (95 % CI {100 * low:.1f}–{100 * high:.1f})"
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
        """Short and unique per directory: names the session file."""
        digest = hashlib.sha1(self.run_dir.encode()).hexdigest()[:6]
        return f"{slug(self.label)[:40]}-{digest}"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def run_store(run_dir: Path, cfg) -> tuple[str | None, str | None]:
    """(tracking URI, MLflow run id) a run directory was tracked in, or Nones. A relative SQLite URI in the saved
    config is taken relative to the directory the run was started from (``.hydra/hydra.yaml``)."""
    run_id = None
    result = Path(run_dir) / "result.json"
    if result.is_file():
        try:
            run_id = json.loads(result.read_text(encoding="utf-8")).get("run_id") or None
        except (OSError, ValueError):
            run_id = None
    tracking = cfg.get("tracking") if hasattr(cfg, "get") else None
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


# ------------------------------------------------------------------------------------------ MLflow
class HumanEvalRun:
    """The ``human_eval`` MLflow run of a session: tags linking both runs, the tally as metrics (step = number of
    verdicts) and the session file as an artifact, brought up to date by :meth:`sync` after every verdict."""

    def __init__(self, session: ABSession, tracking_uri: str):
        self.session, self.tracking_uri = session, tracking_uri
        self.client = None
        self.run_id: str | None = None

    def open(self) -> str:
        """The session's run in this store (the one its file names, else a new one); its id."""
        from mlflow.exceptions import MlflowException

        from glm_experiments.tracking.mlflow_tracker import open_experiment

        session = self.session
        try:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            known = session.mlflow
            if known and known.get("tracking_uri") == self.tracking_uri:
                try:
                    if self.client.get_run(known["run_id"]).info.lifecycle_stage == "active":
                        self.run_id = known["run_id"]
                        return self.run_id
                except MlflowException:
                    pass  # deleted from the store: a new one
            experiment_id = self._experiment_of_run_a()
            if experiment_id is None:
                from omegaconf import OmegaConf

                _, experiment_id = open_experiment(
                    OmegaConf.create(
                        {
                            "tracking_uri": self.tracking_uri,
                            "experiment_name": "human_eval",
                            "description": "blind side-by-side human evaluations (python -m glm_experiments.web)",
                        }
                    )
                )
            run = self.client.create_run(experiment_id, run_name=self._name(), tags=self._tags())
        except MlflowException as exc:
            raise UserError(
                f"--tracking-uri {self.tracking_uri}: cannot open the MLflow store ({exc.message.splitlines()[0]})"
            ) from None
        self.run_id = run.info.run_id
        session.set_mlflow(self.tracking_uri, self.run_id)
        return self.run_id

    def _experiment_of_run_a(self) -> str | None:
        """The human eval sits beside the runs it judges: the experiment of run a (or b) when it is in this store."""
        from mlflow.exceptions import MlflowException

        for side in ("a", "b"):
            c = self.session.contestant(side)
            if c.mlflow_run_id and (c.tracking_uri in (None, self.tracking_uri)):
                try:
                    return self.client.get_run(c.mlflow_run_id).info.experiment_id
                except MlflowException:
                    continue
        return None

    def _name(self) -> str:
        a, b = self.session.contestant("a"), self.session.contestant("b")
        return f"human_eval: {a.label} vs {b.label}"[:250]

    def _tags(self) -> dict[str, str]:
        h = self.session.header
        a, b = self.session.contestant("a"), self.session.contestant("b")
        tags = {
            ROLE_TAG: ROLE,
            "human_eval.definition": DEFINITION,
            "human_eval.session_file": str(self.session.path),
            "human_eval.data": h["data"],
            "human_eval.seed": str(h["seed"]),
            "mlflow.note.content": f"Blind side-by-side human evaluation of **{a.label}** (run a) against "
            f"**{b.label}** (run b) on `{h['data']}`. {DEFINITION}.",
        }
        for side, c in (("a", a), ("b", b)):
            tags[TAG_RUN.format(side)] = c.mlflow_run_id or ""
            tags[f"human_eval.run_{side}_label"] = c.label
            tags[f"human_eval.run_{side}_dir"] = c.run_dir
        return {k: v[:5000] for k, v in tags.items()}

    def sync(self) -> None:
        """Metrics, progress tag and the session file, as they are now; FINISHED once every prompt is judged."""
        from mlflow.entities import Metric

        session = self.session
        t = session.tally()
        now = int(_dt.datetime.now().timestamp() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, t.n) for k, v in t.metrics().items()])
        self.client.set_tag(self.run_id, "human_eval.progress", f"{t.n} of {session.n_prompts}")
        self.client.log_artifact(self.run_id, str(session.path), "human_eval")
        if session.done:
            self.client.set_terminated(self.run_id, "FINISHED")


# ------------------------------------------------------------------------------------------ compare
def human_eval_columns(client, rows: list[dict]) -> list[str]:
    """Adds the human-eval columns to ``compare``'s rows (dicts with ``run_id`` and ``label``) and returns their
    labels ([] when no human eval judged any of these runs). Per run: its win rate against the other run of the
    human eval with the most verdicts (one whose other run is in the table first), its Wilson 95 % interval, the
    counts (wins-losses, ties, both bad) and the other run."""
    by_id = {row["run_id"]: row for row in rows}
    evals = []
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    for run in client.search_runs(experiment_ids, filter_string=f"tags.`{ROLE_TAG}` = '{ROLE}'", max_results=5000):
        tags, metrics = run.data.tags, run.data.metrics
        a, b = tags.get(TAG_RUN.format("a")), tags.get(TAG_RUN.format("b"))
        if (a in by_id or b in by_id) and metrics.get("n"):
            evals.append((tags, metrics, a, b))
    if not evals:
        return []
    columns = ["human win %", "95% CI", "W-L-tie-bad", "vs"]
    for run_id, row in by_id.items():
        mine = [e for e in evals if run_id in (e[2], e[3])]
        if not mine:
            continue
        tags, metrics, a, b = max(mine, key=lambda e: ((e[3] if e[2] == run_id else e[2]) in by_id, e[1]["n"]))
        side, other = ("a", b) if a == run_id else ("b", a)
        wins, losses = (int(metrics.get(f"wins_{side}", 0)), int(metrics.get(f"wins_{'b' if side == 'a' else 'a'}", 0)))
        if "win_rate_a" in metrics:
            rate, low, high = (metrics["win_rate_a"], metrics["ci_low"], metrics["ci_high"])
            if side == "b":
                rate, low, high = 1 - rate, 1 - high, 1 - low
            row["human win %"] = round(100 * rate, 1)
            row["95% CI"] = f"{100 * low:.0f}–{100 * high:.0f}"
        row["W-L-tie-bad"] = f"{wins}-{losses}-{int(metrics.get('ties', 0))}-{int(metrics.get('both_bad', 0))}"
        row["vs"] = (
            by_id[other]["label"]
            if other in by_id
            else tags.get(f"human_eval.run_{'b' if side == 'a' else 'a'}_label", other or "?")
        )
    return columns
