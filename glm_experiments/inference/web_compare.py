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
        from glm_experiments.tracking.store import store_lock

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
        """The whole context as one text (what a verdict records)."""
        context = self.samples[position].messages[:-1]
        if len(context) == 1:
            return context[0]["content"]
        return "\n\n".join(f"[{m['role']}] {m['content']}" for m in context)

    def question(self, position: int) -> tuple[str, str, int]:
        """What the judge reads first: (the final turn before the reply, in full; the earlier turns as text; how
        many earlier exchanges they hold, a system prompt not counted)."""
        *earlier, last = self.samples[position].messages[:-1]
        history = "\n\n".join(f"[{m['role']}] {m['content']}" for m in earlier)
        return last["content"], history, sum(m["role"] == "user" for m in earlier)

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
        """The verdict, on disk first, then in MLflow; an MLflow problem (the next verdict catches up) or None.
        A second verdict on a judged prompt raises UserError (the first one counts)."""
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
            return self._sync()

    def add_comment(self, position: int, comment: str) -> tuple[bool, str | None]:
        """A comment typed after the verdict on ``position``, added to it (a ``comment`` line in the session file,
        then MLflow's copy of the file): (whether anything changed, an MLflow problem or None)."""
        with self.lock:
            if not self.session.add_comment(position, comment):
                return False, None
            return True, self._sync()

    def _sync(self) -> str | None:
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


COMMENT_BEFORE = "comment (optional, saved with the verdict)"
COMMENT_AFTER = "comment on this verdict: added to it on Enter, on leaving the box or on next"
VOTE_IDS = [KEYS[key] for key in "abtx"]
# runs in the browser the moment a vote is pressed, before the server hears of it: the vote buttons are disabled,
# so a second press (key or click) while the first vote is being saved does nothing
DISABLE_VOTES_JS = (
    "(position, comment) => { for (const id of %s) { const b = document.getElementById(id); if (b) b.disabled = true; }"
    " return [position, comment]; }" % VOTE_IDS
)


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
        prompt = gr.Textbox(
            label="prompt (the last turn before the replies)", lines=2, max_lines=40, interactive=False,
            elem_id="cmp-prompt",
        )
        with gr.Accordion("history", open=False, visible=False, elem_id="cmp-history") as history:
            history_text = gr.Textbox(show_label=False, lines=4, max_lines=40, interactive=False,
                                      elem_id="cmp-history-text")
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
        comment = gr.Textbox(label=COMMENT_BEFORE, lines=1, elem_id="cmp-comment")
        reference = gr.Textbox(label="reference", lines=3, interactive=False, visible=False, elem_id="cmp-reference")
        status = gr.Markdown("", elem_id="cmp-status")
        next_button = gr.Button("next prompt (n)", interactive=False, elem_id="cmp-next")
        shown = gr.State(None)  # the position on screen
        outputs = [shown, progress, prompt, history, history_text, left, right, reference, comment, status,
                   next_button, *vote_buttons.values()]

        def heading(position: int) -> str:
            return f"**Prompt {position + 1} of {session.n_prompts}** ({len(session.verdicts)} judged)"

        def controls(next_on: bool, votes_on: bool) -> dict:
            return {next_button: gr.update(interactive=next_on, visible=True),
                    **{b: gr.update(interactive=votes_on, visible=True) for b in vote_buttons.values()}}

        def question(position: int) -> dict:
            """The last turn first, in full; the earlier ones folded away under "history (N turns)"."""
            text, earlier, turns = comparison.question(position)
            label = f"history ({turns} turn{'' if turns == 1 else 's'})" if turns else "history (system prompt)"
            return {prompt: gr.update(value=text, visible=True),
                    history: gr.update(label=label, visible=bool(earlier), open=False),
                    history_text: earlier}

        def saved_status(position: int) -> str:
            verdict = session.verdicts[position]
            where = f"`{session.path.name}`" + (f" and MLflow run `{comparison.mlflow.run_id[:8]}`"
                                               if comparison.mlflow is not None else "")
            text = (f"saved: {CHOICE_LABELS[verdict['choice']]} (verdict {len(session.verdicts)} of "
                    f"{session.n_prompts}) in {where}")
            return text + ("; comment saved with it" if verdict.get("comment") else "")

        def judged(position: int, status_text: str) -> dict:
            """A judged prompt as it was saved: the replies judged, the reference, the comment box (still editable:
            what is typed is added to the verdict), the votes off and Next on."""
            verdict = session.verdicts[position]
            return {
                shown: position,
                progress: heading(position),
                **question(position),
                left: gr.update(value=verdict["replies"][verdict["left"]], visible=True),
                right: gr.update(value=verdict["replies"][verdict["right"]], visible=True),
                reference: gr.update(visible=True, value=comparison.reference(position)),
                # the box keeps what is in it: typed before the vote it is the verdict's comment; typed while the
                # vote was saved it is added to the verdict (Enter, leaving the box, next)
                comment: gr.update(label=COMMENT_AFTER, interactive=True, visible=True),
                status: status_text,
                **controls(next_on=True, votes_on=False),
            }

        def finished() -> dict:
            """Every prompt judged: the tally, and nothing left to type into or press."""
            hidden = gr.update(visible=False, value="")
            return {
                shown: None,
                progress: f"**Done: {session.n_prompts} of {session.n_prompts}**",
                prompt: hidden, history: gr.update(visible=False), history_text: "", left: hidden, right: hidden,
                reference: hidden, comment: gr.update(visible=False, value="", interactive=False),
                status: f"**All prompts judged.** {comparison.results()}",
                next_button: gr.update(interactive=False, visible=False),
                **{b: gr.update(interactive=False, visible=False) for b in vote_buttons.values()},
            }

        def add_comment(position, comment_text) -> str | None:
            """What was typed after the vote on ``position``, added to its verdict: a status line, or None when
            nothing changed."""
            if position is None or position not in session.verdicts:
                return None
            changed, problem = comparison.add_comment(position, comment_text or "")
            if not changed:
                return None
            return (f"comment added to the verdict on prompt {position + 1} in `{session.path.name}`"
                    + (f"; MLflow update failed: {problem}" if problem else ""))

        def show(current, comment_text=None):
            note = add_comment(current, comment_text) if comment_text is not None else None
            position = session.next_position()
            if position is None:
                yield finished()
                return
            sides = session.sides(position)
            texts = dict(comparison.replies.get(position, {}))
            yield {
                shown: position,
                progress: heading(position),
                **question(position),
                left: gr.update(value=texts.get(sides[0], ""), visible=True),
                right: gr.update(value=texts.get(sides[1], ""), visible=True),
                reference: gr.update(visible=False, value=""),
                comment: gr.update(value="", label=COMMENT_BEFORE, interactive=True, visible=True),
                status: (f"{note}. " if note else "") + ("" if len(texts) == 2 else "generating the replies ..."),
                **controls(next_on=False, votes_on=False),
            }
            for box, side in zip((left, right), sides):
                if side not in texts:
                    text = ""
                    for text in comparison.stream(side, position):
                        yield {box: text}
                    texts[side] = text
            comparison.replies[position] = texts
            yield {status: f"{note}." if note else "", **controls(next_on=False, votes_on=True)}

        def vote(choice):
            def handler(position, comment_text):
                if position is None:
                    return {status: "no prompt on screen: press next", **controls(next_on=True, votes_on=False)}
                if position in session.verdicts:  # a second press while or after the first was saved
                    first = CHOICE_LABELS[session.verdicts[position]["choice"]]
                    return judged(position, f"prompt {position + 1} already has a verdict ({first}): it stands. "
                                            "Press next for the next prompt.")
                try:
                    problem = comparison.record(position, choice, comment_text or "")
                except UserError as exc:
                    if position in session.verdicts:  # the other press won the race
                        return judged(position, saved_status(position))
                    return {status: f"not saved: {exc}. Press next to show the prompt again.",
                            **controls(next_on=True, votes_on=False)}
                text = saved_status(position) + (f"; MLflow update failed: {problem}" if problem else "")
                return judged(position, text)

            return handler

        def comment_done(position, comment_text):
            note = add_comment(position, comment_text)
            return {status: gr.skip() if note is None else f"{saved_status(position)}; {note}"}

        for choice, button in vote_buttons.items():
            button.click(vote(choice), [shown, comment], outputs, js=DISABLE_VOTES_JS, concurrency_id="compare-vote",
                         show_progress="minimal")
        next_button.click(show, [shown, comment], outputs, concurrency_id="compare", show_progress="minimal")
        # a comment typed after the vote: added to the verdict on Enter or when the box loses focus (and on next)
        comment.submit(comment_done, [shown, comment], outputs, concurrency_id="compare-vote", show_progress="hidden")
        comment.blur(comment_done, [shown, comment], outputs, concurrency_id="compare-vote", show_progress="hidden")

        def opened(current):
            if current is None:  # first opened since the page loaded; else it shows what it showed
                yield from show(current)

        # generated when the tab is opened, not on page load: chatting first does not wait for the comparison
        tab.select(opened, shown, outputs, concurrency_id="compare", show_progress="minimal")
