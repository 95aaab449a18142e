"""The MLflow side of a blind A/B session (human_eval.py): its ``human_eval`` run, linked to both runs judged and
brought up to date after every verdict, and the win-rate columns ``compare`` shows beside BLEU/ROUGE."""

from __future__ import annotations

import datetime as _dt
import logging

from glm_experiments.errors import UserError
from glm_experiments.study.human_eval import DEFINITION, ROLE, TAG_RUN, ABSession
from glm_experiments.tracking.mlflow_tracker import ROLE_TAG

log = logging.getLogger(__name__)


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

        from glm_experiments.tracking.store import open_experiment

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
        commented = sum(bool(v.get("comment")) for v in session.verdicts.values())
        self.client.set_tag(self.run_id, "human_eval.comments", str(commented))  # the texts: in the artifact
        self.client.log_artifact(self.run_id, str(session.path), "human_eval")
        if session.done:
            self.client.set_terminated(self.run_id, "FINISHED")


# ------------------------------------------------------------------------------------------ compare
def human_eval_columns(client, rows: list[dict]) -> list[str]:
    """Adds the human-eval columns to ``compare``'s rows (dicts with ``run_id`` and ``label``) and returns their
    labels ([] when no human eval judged any of these runs). Per run: its win rate against the other run of the
    human eval with the most verdicts (one whose other run is in the table first), its Wilson 95 % interval, the
    sign test over the decisive votes (``better p=0.003``, ``noise p=0.12``: better / worse when the interval
    excludes 50 %, else within noise), the counts (wins-losses, ties, both bad) and the other run."""
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
    from glm_experiments.study.verdicts import WITHIN_NOISE
    from glm_experiments.study.votes import format_p, vote_verdict

    columns = ["human win %", "95% CI", "sign test", "W-L-tie-bad", "vs"]
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
            votes = vote_verdict(wins, losses, (low, high))  # this run's side: the sign test over decisive votes
            short = "noise" if votes.verdict == WITHIN_NOISE else votes.verdict  # narrow: the table fits 100 columns
            row["sign test"] = f"{short} p{format_p(votes.p_value).replace(' ', '')}"  # "noise p=0.12"
        row["W-L-tie-bad"] = f"{wins}-{losses}-{int(metrics.get('ties', 0))}-{int(metrics.get('both_bad', 0))}"
        row["vs"] = (
            by_id[other]["label"]
            if other in by_id
            else tags.get(f"human_eval.run_{'b' if side == 'a' else 'a'}_label", other or "?")
        )
    return columns
