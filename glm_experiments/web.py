"""A local web page: chat with any run, and judge two runs blind, side by side, with the verdicts in MLflow.

Needs the web extra: pip install -e ".[web]". The page is served on 127.0.0.1 (this machine only) unless
--host says otherwise; nothing is shared through a public link.

* Chat: streaming replies in the run's own template, with history, a system prompt (ChatGLM3 / GLM-4) and the
  generation settings; a selector picks the run.
* Compare (with two or more runs: the first two): the prompts of a data file one at a time, the two runs'
  replies in random left/right order, the reference hidden until the vote. Keys: a = A better, b = B better,
  t = tie, x = both bad, n = next prompt. Every verdict is appended to a JSON-lines session file beside the runs
  (``human_eval/``) and mirrored to a ``human_eval`` MLflow run linked to both runs (win rate with a Wilson 95 %
  interval, n, ties, both bad; see glm_experiments.human_eval). Starting the page again on the same runs and
  file continues at the first prompt without a verdict.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from glm_experiments.errors import UserError, cli_main

log = logging.getLogger("glm_experiments.web")

EXAMPLES = """examples:
  python -m glm_experiments.web --run outputs/2025-01-01/12-00-00_lora_tiny
  python -m glm_experiments.web --run multirun/2025-01-01/12-00-00/0_lora_tiny --run multirun/2025-01-01/12-00-00/1_lora_tiny
  python -m glm_experiments.web --run 3f2a...c9 --run 9b1e...07 --tracking-uri sqlite:///mlflow.db \\
      --input data/adgen_demo/dev.json --max-prompts 50 --port 7861
  python -m glm_experiments.web --run outputs/.../run --adapter finetune_demo/output/checkpoint-3000 \\
      --model-path /data/chatglm3-6b --family chatglm3      # one of ours against a THUDM adapter
"""
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m glm_experiments.web",
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--run",
        action="append",
        default=[],
        help="run directory or MLflow run id; repeat for more runs (Compare judges the first two)",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store of run ids and of the human_eval run (default: $MLFLOW_TRACKING_URI, "
        "else the store the first run was tracked in, else sqlite:///mlflow.db)",
    )
    foreign = p.add_argument_group("an adapter without a run (as predict takes it; compared after the --run entries)")
    foreign.add_argument(
        "--adapter", action="append", default=[], help="adapter directory: THUDM/PEFT or ours; repeatable"
    )
    foreign.add_argument("--model-path", default=None, help="base checkpoint directory of the adapters")
    foreign.add_argument("--family", default=None, choices=["chatglm", "chatglm2", "chatglm3", "glm4", "tiny"])
    foreign.add_argument("--data", default="adgen", help="data config of the adapters (format, generation settings)")
    p.add_argument(
        "--input", default=None, help="prompts to compare, in the first run's data format (default: its data.dev_file)"
    )
    p.add_argument("--max-prompts", type=int, default=None, help="compare only the first N prompts of --input")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="per reply (default: Chat: the run's eval.max_new_tokens; Compare: the larger of the two runs', the "
        "same for both so that neither is cut shorter)",
    )
    p.add_argument(
        "--session-dir",
        type=Path,
        default=None,
        help="where the verdict files go (default: human_eval/ in the folder holding both runs)",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the left/right order of a new session (default: random)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    args = p.parse_args(argv)
    if not args.run and not args.adapter:
        p.error("give at least one --run (or --adapter with --family and --model-path)")
    if args.adapter and (not args.family or (args.family != "tiny" and not args.model_path)):
        p.error("--adapter needs --family and --model-path")
    for name in ("max_prompts", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if not 0 < args.port < 65536:
        p.error(f"--port must be 1..65535, got {args.port}")
    return args


# ------------------------------------------------------------------------------------------ the runs
@dataclass
class Engine:
    """One run on the page: its contestant record, its config and (once loaded) model; one generation at a time."""

    contestant: Any
    cfg: Any
    spec: Any  # the run directory, or the --adapter namespace for a foreign adapter
    loaded: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def label(self) -> str:
        return self.contestant.label


def find_engines(args: argparse.Namespace) -> list[Engine]:
    """Every run named on the command line, found and checked; nothing loaded yet."""
    from glm_experiments.human_eval import Contestant, run_store
    from glm_experiments.run_loading import (
        RUN_ID_RE,
        check_adapter,
        find_run_dir,
        load_run_config,
    )

    engines, labels = [], set()

    def unique(label: str) -> str:
        base, n = label, 2
        while label in labels:
            label, n = f"{base} ({n})", n + 1
        labels.add(label)
        return label

    for run in args.run:
        run_dir = find_run_dir(run, args.tracking_uri)
        cfg = load_run_config(run_dir)
        check_adapter(run_dir)
        uri, run_id = run_store(run_dir, cfg)
        if RUN_ID_RE.match(str(run).strip()):  # named by its id: that store knows it
            from glm_experiments.run_loading import _tracking_uri

            uri, run_id = _tracking_uri(args.tracking_uri), str(run).strip()
        if any(e.contestant.run_dir == str(run_dir) for e in engines):
            raise UserError(f"--run {run}: {run_dir} is given twice")
        contestant = Contestant(unique(run_dir.name), str(run_dir), run_id, uri)
        engines.append(Engine(contestant, cfg, run_dir))
    if args.adapter:
        from glm_experiments.predict import _default_config

        cfg = _default_config(args)
        for adapter in args.adapter:
            path = Path(adapter).expanduser().resolve()
            if not path.is_dir():
                raise UserError(f"--adapter {adapter}: not a directory")
            name = f"{path.parent.name}/{path.name}" if path.name == "adapter" else path.name  # a run's adapter/
            spec = SimpleNamespace(
                adapter=str(path), family=args.family, model_path=args.model_path, device=args.device
            )
            engines.append(Engine(Contestant(unique(f"adapter:{name}"), str(path)), cfg, spec))
    return engines


def load_engines(engines: list[Engine], device: str | None, say=print) -> None:
    from glm_experiments.predict import _load_foreign
    from glm_experiments.run_loading import load_run

    for i, engine in enumerate(engines, 1):
        say(f"loading {i}/{len(engines)}: {engine.label} ({engine.contestant.run_dir})")
        if isinstance(engine.spec, Path):
            engine.loaded = load_run(engine.spec, device=device)
        else:
            engine.loaded = _load_foreign(engine.cfg, engine.spec)


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
        from glm_experiments.human_eval import (
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
        from glm_experiments.human_eval import HumanEvalRun

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
        from glm_experiments.chat import chat_generation_kwargs, stream_reply
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


# ------------------------------------------------------------------------------------------ the page
def _gradio():
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry, no version check: nothing leaves the machine
    try:
        import gradio as gr
    except ImportError:
        raise UserError('the web page needs gradio: pip install -e ".[web]"') from None
    return gr


def build_page(engines: list[Engine], comparison: Comparison | None, max_new_tokens: int | None = None):
    """The gradio Blocks of the page (not launched)."""
    gr = _gradio()
    from glm_experiments.chat import (
        chat_generation_kwargs,
        fit_prompt,
        model_max_length,
        stream_reply,
    )

    by_label = {e.label: e for e in engines}
    first = engines[0]

    def defaults(engine: Engine) -> dict:
        ev = engine.loaded.cfg.eval
        return {
            "max_new_tokens": int(max_new_tokens or ev.max_new_tokens),
            "greedy": not bool(ev.do_sample),
            "temperature": float(ev.temperature),
            "top_p": float(ev.top_p),
            "limit": max(1, model_max_length(engine.loaded.model) // 2),
        }

    def describe(engine: Engine) -> str:
        loaded = engine.loaded
        system = "" if loaded.template.has_system_role else " (no system role: the system prompt is not used)"
        return (
            f"**{engine.label}**: {loaded.method} on {loaded.cfg.model.name}, {loaded.template.name} template"
            f"{system}. `{engine.contestant.run_dir}`"
        )

    with gr.Blocks(title="glm_experiments", analytics_enabled=False) as page:
        gr.Markdown(f"## glm_experiments: {len(engines)} run{'s' if len(engines) > 1 else ''}")
        with gr.Tabs():
            # -------------------------------------------------------------------- chat
            with gr.Tab("Chat", id="chat"):
                d = defaults(first)
                with gr.Row():
                    run = gr.Dropdown(
                        [e.label for e in engines],
                        value=first.label,
                        label="run",
                        scale=1,
                        elem_id="chat-run",
                        interactive=len(engines) > 1,
                    )
                    about = gr.Markdown(describe(first), elem_id="chat-about")
                system = gr.Textbox(label="system prompt (optional)", lines=1, elem_id="chat-system")
                with gr.Accordion("generation settings", open=False), gr.Row():
                    max_new = gr.Slider(
                        1,
                        d["limit"],
                        value=min(d["max_new_tokens"], d["limit"]),
                        step=1,
                        label="max new tokens",
                        elem_id="chat-max-new",
                    )
                    greedy = gr.Checkbox(value=d["greedy"], label="greedy (off: sample)", elem_id="chat-greedy")
                    temperature = gr.Slider(0.05, 2.0, value=d["temperature"], step=0.05, label="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=d["top_p"], step=0.05, label="top-p")
                chatbot = gr.Chatbot(
                    label="conversation",
                    height=420,
                    elem_id="chat-box",
                    buttons=["copy"],
                    render_markdown=False,  # model output as written: "*" and "#" are text in ad tags
                )
                history = gr.State([])
                with gr.Row():
                    message = gr.Textbox(
                        placeholder="your message; Enter sends", show_label=False, scale=8, elem_id="chat-input"
                    )
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                    clear = gr.Button("Clear", scale=1, elem_id="chat-clear")
                chat_note = gr.Markdown("", elem_id="chat-note")

                def reply(label, text, past, system_text, n_new, is_greedy, temp, p):
                    engine = by_label[label]
                    loaded = engine.loaded
                    text = (text or "").strip()
                    if not text:
                        yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
                        return
                    system_text = (system_text or "").strip() or None
                    if system_text and not loaded.template.has_system_role:
                        system_text = None
                    gen = chat_generation_kwargs(
                        loaded.cfg.eval,
                        loaded.tokenizer,
                        loaded.template,
                        int(n_new),
                        sample=not is_greedy,
                        temperature=temp,
                        top_p=p,
                    )
                    budget = model_max_length(loaded.model) - gen["max_new_tokens"]
                    ids, kept, dropped = fit_prompt(loaded.template, loaded.tokenizer, system_text, past, text, budget)
                    shown = [dict(m) for m in kept] + [
                        {"role": "user", "content": text},
                        {"role": "assistant", "content": ""},
                    ]
                    note = f"(history too long: dropped the oldest {dropped} turn(s)) " if dropped else ""
                    yield shown, gr.skip(), "", note + "generating ..."
                    final = ""
                    with engine.lock:
                        for final in stream_reply(
                            loaded.model, loaded.tokenizer, loaded.template, ids, gen, tentative=True
                        ):
                            shown[-1] = {"role": "assistant", "content": final}
                            yield shown, gr.skip(), gr.skip(), gr.skip()
                    kept = kept + [{"role": "user", "content": text}, {"role": "assistant", "content": final}]
                    yield (
                        shown,
                        kept,
                        gr.skip(),
                        f"{note}{len(ids)} prompt tokens, {len(kept) // 2} turn(s) in history",
                    )

                chat_inputs = [run, message, history, system, max_new, greedy, temperature, top_p]
                chat_outputs = [chatbot, history, message, chat_note]
                send.click(reply, chat_inputs, chat_outputs, concurrency_id="chat", show_progress="minimal")
                message.submit(reply, chat_inputs, chat_outputs, concurrency_id="chat", show_progress="minimal")
                clear.click(lambda: ([], [], ""), None, [chatbot, history, chat_note])
                chatbot.clear(lambda: ([], ""), None, [history, chat_note])  # its own trash button

                def pick(label):
                    engine = by_label[label]
                    d = defaults(engine)
                    return (
                        describe(engine),
                        [],
                        [],
                        "",
                        gr.update(maximum=d["limit"], value=min(d["max_new_tokens"], d["limit"])),
                        d["greedy"],
                        d["temperature"],
                        d["top_p"],
                    )

                run.change(pick, run, [about, chatbot, history, chat_note, max_new, greedy, temperature, top_p])

            # -------------------------------------------------------------------- compare
            if comparison is not None:
                compare_tab(gr, comparison)
        if comparison is None:
            gr.Markdown("Give a second `--run` to compare two runs blind, side by side.")
    return page


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


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(
                f"--host {host} --port {port}: cannot serve there ({exc.strerror}); another server? pick another --port"
            ) from None


def serve(page, host: str, port: int, block: bool = True, say=print) -> str:
    """Launch ``page`` on host:port (no public link, no telemetry); returns the local URL, or blocks until Ctrl-C."""
    import json

    gr = _gradio()
    _check_port(host, port)
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )  # local fonts: the page works offline
    page.queue(default_concurrency_limit=1)
    page.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=True,
        quiet=True,
        show_error=True,
        theme=theme,
        head=KEYS_SCRIPT % json.dumps(KEYS),
        footer_links=[],
    )
    url = f"http://{host}:{port}/"
    say(f"serving on {url} (Ctrl-C stops)")
    if block:
        page.block_thread()
    return url


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    engines = find_engines(args)
    comparison = Comparison.prepare(engines[0], engines[1], args) if len(engines) > 1 else None
    _gradio()  # a missing extra, a taken port: one line before anything loads
    _check_port(args.host, args.port)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if comparison is not None:
        session = comparison.session
        position = session.next_position()
        where = (
            "all judged"
            if position is None
            else f"{'resuming' if session.verdicts else 'starting'} at prompt {position + 1}"
        )
        say(
            f"compare: {comparison.engines['a'].label} vs {comparison.engines['b'].label} on {comparison.data_file}, "
            f"{session.n_prompts} prompts ({where}); verdicts in {session.path}"
        )
        comparison.check_store()
        # a resumed session: bring its MLflow run up to date (it may have missed the last verdicts)
        if session.verdicts:
            say(f"MLflow: human_eval run {comparison.sync_mlflow()} in {comparison.tracking_uri}")
    load_engines(engines, args.device, say)
    page = build_page(engines, comparison, args.max_new_tokens)
    serve(page, args.host, args.port, block=True, say=say)
    return 0


if __name__ == "__main__":
    sys.exit(main())
