"""A local web page: chat with any run, and judge two runs blind, side by side, with the verdicts in MLflow.

Needs the web extra: pip install -e ".[web]". The page is served on 127.0.0.1 (this machine only) unless
--host says otherwise; nothing is shared through a public link.

* Chat: streaming replies in the run's own template, with history, a system prompt (ChatGLM3 / GLM-4) and the
  generation settings; a selector picks the run.
* Compare (with two or more runs: the first two): the prompts of a data file one at a time, the two runs'
  replies in random left/right order, the reference hidden until the vote. Keys: a = A better, b = B better,
  t = tie, x = both bad, n = next prompt. Every verdict is appended to a JSON-lines session file beside the runs
  (``human_eval/``) and mirrored to a ``human_eval`` MLflow run linked to both runs (win rate with a Wilson 95 %
  interval, n, ties, both bad; see glm_experiments.study.human_eval). Starting the page again on the same runs and
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
from glm_experiments.inference.web_compare import KEYS, KEYS_SCRIPT, Comparison, compare_tab

log = logging.getLogger("glm_experiments.web")

EXAMPLES = """examples:
  python -m glm_experiments.web --run outputs/2025-01-01/12-00-00_lora_tiny
  python -m glm_experiments.web --run multirun/2025-01-01/12-00-00/0_lora_tiny --run multirun/2025-01-01/12-00-00/1_lora_tiny
  python -m glm_experiments.web --run 3f2a...c9 --run 9b1e...07 --tracking-uri sqlite:///mlflow.db \\
      --input data/adgen_demo/dev.json --max-prompts 50 --port 7861
  python -m glm_experiments.web --run outputs/.../run --adapter finetune_demo/output/checkpoint-3000 \\
      --model-path /data/chatglm3-6b --family chatglm3      # one of ours against a THUDM adapter
"""
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
    from glm_experiments.study.human_eval import Contestant, run_store
    from glm_experiments.inference.run_loading import (
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
            from glm_experiments.inference.run_loading import _tracking_uri

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
    from glm_experiments.inference.run_loading import load_run

    for i, engine in enumerate(engines, 1):
        say(f"loading {i}/{len(engines)}: {engine.label} ({engine.contestant.run_dir})")
        if isinstance(engine.spec, Path):
            engine.loaded = load_run(engine.spec, device=device)
        else:
            engine.loaded = _load_foreign(engine.cfg, engine.spec)


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
