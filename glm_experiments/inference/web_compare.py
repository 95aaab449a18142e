"""The Compare tab of the web page (web.py): a blind A/B session of two runs on a data file (human_eval.py keeps its
log and tally), one prompt at a time, with keyboard shortcuts."""

from __future__ import annotations

import argparse
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from glm_experiments.errors import UserError

if TYPE_CHECKING:
    from glm_experiments.inference.engines import Engine

log = logging.getLogger("glm_experiments.web")

KEYS = {"a": "cmp-vote-left", "b": "cmp-vote-right", "t": "cmp-vote-tie", "x": "cmp-vote-bad", "n": "cmp-next"}
# keyboard shortcuts of the Compare tab; typing in a text box is left alone
KEYS_SCRIPT = """<script>
document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  const target = event.target, tag = ((target && target.tagName) || "").toLowerCase();
  if (tag === "input" || tag === "textarea" || tag === "select" || (target && target.isContentEditable)) return;
  const id = (%s)[event.key.toLowerCase()];
  const button = id && document.getElementById(id);
  if (!button || button.disabled || button.offsetParent === null) return;
  event.preventDefault();
  button.click();
});
</script>"""
CHOICE_LABELS = {"left": "A better", "right": "B better", "tie": "tie", "both_bad": "both bad"}



# ------------------------------------------------------------------------------------------ compare
class Comparison:
    """The blind A/B session of the first two engines on a data file: prompts, replies shown, verdicts."""

    def __init__(
        self,
        a: Engine,
        b: Engine,
        data_file: Path,
        samples: list,
        session,
        tracking_uri: str,
        max_new_tokens: int,
    ):
        self.engines = {"a": a, "b": b}
        self.data_file, self.samples, self.session = data_file, samples, session
        self.tracking_uri, self.max_new_tokens = tracking_uri, max_new_tokens
        self.replies: dict[int, dict[str, str]] = {}  # position -> the replies shown (what a verdict judged)
        self.mlflow = None
        self.lock = threading.Lock()

    @classmethod
    def prepare(cls, a: Engine, b: Engine, args: argparse.Namespace) -> Comparison:
        """Reads the prompts and opens (or resumes) the session, before any model loads."""
        from glm_experiments.data.formats import load_samples, resolve_data_path
        from glm_experiments.study.human_eval import (
            ABSession,
            default_session_dir,
            session_path,
        )

        setting = "--input" if args.input else "data.dev_file of the first run"
        source = args.input or a.cfg.data.get("dev_file")
        if not source:
            raise UserError(f"{a.label} has no data.dev_file: give the prompts to compare with --input")
        data_file = resolve_data_path(source, setting)
        samples, _ = load_samples(data_file, a.cfg.data, setting)
        samples = [s for s in samples if s.messages[-1]["role"] == "assistant" and len(s.messages) > 1]
        if not samples:
            raise UserError(f"{data_file}: no sample ends with a reply (nothing to compare against)")
        samples = samples[: args.max_prompts] if args.max_prompts else samples
        session_dir = args.session_dir or default_session_dir(a.contestant, b.contestant)
        path = session_path(session_dir, a.contestant, b.contestant, data_file)
        session = ABSession.open(path, a.contestant, b.contestant, data_file, len(samples), args.seed)
        # run a / run b are the session's (its first opening's) order, whatever the order given now
        if session.header["run_a"]["run_dir"] != a.contestant.run_dir:
            a, b = b, a
        uri = (
            args.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or a.contestant.tracking_uri
            or b.contestant.tracking_uri
            or "sqlite:///mlflow.db"
        )
        max_new = args.max_new_tokens or max(int(a.cfg.eval.max_new_tokens), int(b.cfg.eval.max_new_tokens))
        return cls(a, b, data_file, samples[: session.n_prompts], session, uri, max_new)

    def check_store(self) -> None:
        """A store that cannot be used fails now, in one line (and MLflow's import is paid before the first vote)."""
        from glm_experiments.tracking.mlflow_tracker import store_lock

        try:
            from mlflow import MlflowClient

            with store_lock(self.tracking_uri):  # a fresh SQLite store gets its tables once
                MlflowClient(tracking_uri=self.tracking_uri).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - not a database, unreachable server, ...: one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"--tracking-uri {self.tracking_uri}: cannot open the MLflow store ({first})") from None

    def sync_mlflow(self) -> str:
        """The human_eval run (made on the first verdict of a new session), brought up to date with the file."""
        from glm_experiments.study.human_eval_tracking import HumanEvalRun

        if self.mlflow is None:
            self.mlflow = HumanEvalRun(self.session, self.tracking_uri)
            self.mlflow.open()
        self.mlflow.sync()
        return self.mlflow.run_id

    # -------------------------------------------------------------------------------- one prompt
    def prompt_text(self, position: int) -> str:
        context = self.samples[position].messages[:-1]
        if len(context) == 1:
            return context[0]["content"]
        return "\n\n".join(f"[{m['role']}] {m['content']}" for m in context)

    def reference(self, position: int) -> str:
        return self.samples[position].messages[-1]["content"]

    def stream(self, side: str, position: int):
        """The reply of run ``side`` to the prompt at ``position``, streamed (the run's own template and eval
        settings, one beam; greedy unless the run evaluated by sampling)."""
        from glm_experiments.inference.chat_session import chat_generation_kwargs, stream_reply
        from glm_experiments.data.dataset import eval_prompts

        engine = self.engines[side]
        loaded = engine.loaded
        [ids], _, _ = eval_prompts([self.samples[position]], loaded.tokenizer, loaded.template, loaded.cfg.data)
        gen = chat_generation_kwargs(
            loaded.cfg.eval,
            loaded.tokenizer,
            loaded.template,
            self.max_new_tokens,
            sample=bool(loaded.cfg.eval.do_sample),
        )
        with engine.lock:
            yield from stream_reply(loaded.model, loaded.tokenizer, loaded.template, ids, gen, tentative=True)

    def record(self, position: int, choice: str, comment: str) -> str | None:
        """The verdict, on disk first, then in MLflow; an MLflow problem (the next verdict catches up) or None."""
        with self.lock:
            replies = self.replies.get(position)
            if replies is None or "a" not in replies or "b" not in replies:
                raise UserError("both replies must be shown before a verdict")
            self.session.record(
                position,
                choice,
                replies,
                comment,
                self.prompt_text(position),
                self.reference(position),
                self.samples[position].source,
                {"max_new_tokens": self.max_new_tokens},
            )
            try:
                self.sync_mlflow()
                return None
            except Exception as exc:  # noqa: BLE001 - the verdict is safe on disk; the next sync catches up
                problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                log.warning("MLflow update failed (the verdict is saved in %s): %s", self.session.path, problem)
                self.mlflow = None
                return problem

    def results(self) -> str:
        a, b = self.engines["a"].label, self.engines["b"].label
        return self.session.tally().summary(a, b)


def compare_tab(gr, comparison: Comparison) -> None:
    session = comparison.session
    with gr.Tab("Compare (blind)", id="compare") as tab:
        gr.Markdown(
            f"Which reply is better? **A** and **B** are the two runs in a random order per prompt; the runs "
            f"are named when the session ends. Prompts: `{comparison.data_file}`. "
            f"Verdicts: `{session.path}`. Keys: **a** A better, **b** B better, **t** tie, "
            f"**x** both bad, **n** next."
        )
        progress = gr.Markdown("", elem_id="cmp-progress")
        prompt = gr.Textbox(label="prompt", lines=2, interactive=False, elem_id="cmp-prompt")
        with gr.Row():
            left = gr.Textbox(label="A", lines=8, interactive=False, elem_id="cmp-left")
            right = gr.Textbox(label="B", lines=8, interactive=False, elem_id="cmp-right")
        with gr.Row():
            vote_buttons = {
                "left": gr.Button("A better (a)", interactive=False, elem_id="cmp-vote-left"),
                "right": gr.Button("B better (b)", interactive=False, elem_id="cmp-vote-right"),
                "tie": gr.Button("tie (t)", interactive=False, elem_id="cmp-vote-tie"),
                "both_bad": gr.Button("both bad (x)", interactive=False, elem_id="cmp-vote-bad"),
            }
        comment = gr.Textbox(label="comment (optional, saved with the verdict)", lines=1, elem_id="cmp-comment")
        reference = gr.Textbox(label="reference", lines=3, interactive=False, visible=False, elem_id="cmp-reference")
        status = gr.Markdown("", elem_id="cmp-status")
        next_button = gr.Button("next prompt (n)", interactive=False, elem_id="cmp-next")
        shown = gr.State(None)  # the position on screen
        outputs = [
            shown,
            progress,
            prompt,
            left,
            right,
            reference,
            comment,
            status,
            next_button,
            *vote_buttons.values(),
        ]

        def view(position, next_on=False, votes_on=False, **changes):
            """The outputs: ``changes`` (prompt, left, right, reference, comment, status) set, the rest kept."""
            kept = [
                changes.get(name, gr.skip()) for name in ("prompt", "left", "right", "reference", "comment", "status")
            ]
            heading = (
                gr.skip()
                if position is None
                else (f"**Prompt {position + 1} of {session.n_prompts}** ({len(session.verdicts)} judged)")
            )
            return [
                position,
                heading,
                *kept,
                gr.update(interactive=next_on),
                *[gr.update(interactive=votes_on) for _ in vote_buttons],
            ]

        def show(current):
            position = session.next_position()
            if position is None:
                yield [
                    None,
                    f"**Done: {session.n_prompts} of {session.n_prompts}**",
                    "",
                    "",
                    "",
                    gr.update(visible=False),
                    "",
                    f"**All prompts judged.** {comparison.results()}",
                    gr.update(interactive=False),
                    *[gr.update(interactive=False) for _ in vote_buttons],
                ]
                return
            sides = session.sides(position)
            texts = dict(comparison.replies.get(position, {}))
            yield view(
                position,
                prompt=comparison.prompt_text(position),
                left=texts.get(sides[0], ""),
                right=texts.get(sides[1], ""),
                reference=gr.update(visible=False, value=""),
                comment="",
                status="" if len(texts) == 2 else "generating the replies ...",
            )
            for box, side in zip(("left", "right"), sides):
                if side not in texts:
                    for text in comparison.stream(side, position):
                        yield view(position, **{box: text})
                    texts[side] = text
            comparison.replies[position] = texts
            yield view(position, status="", votes_on=True)

        def vote(choice):
            def handler(position, comment_text):
                if position is None or position != session.next_position():
                    return view(session.next_position(), status="that prompt already has a verdict: press next")
                problem = comparison.record(position, choice, comment_text or "")
                where = f"`{session.path.name}`" + (
                    "" if problem else f" and MLflow run `{comparison.mlflow.run_id[:8]}`"
                )
                status = (
                    f"saved: {CHOICE_LABELS[choice]} (verdict {len(session.verdicts)} of {session.n_prompts}) "
                    f"in {where}" + (f"; MLflow update failed: {problem}" if problem else "")
                )
                return view(
                    position,
                    reference=gr.update(visible=True, value=comparison.reference(position)),
                    status=status,
                    next_on=True,
                )

            return handler

        for choice, button in vote_buttons.items():
            button.click(
                vote(choice), [shown, comment], outputs, concurrency_id="compare-vote", show_progress="minimal"
            )
        next_button.click(show, shown, outputs, concurrency_id="compare", show_progress="minimal")

        def opened(current):
            if current is None:  # first opened since the page loaded; else it shows what it showed
                yield from show(current)

        # generated when the tab is opened, not on page load: chatting first does not wait for the comparison
        tab.select(opened, shown, outputs, concurrency_id="compare", show_progress="minimal")
