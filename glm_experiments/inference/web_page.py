"""The gradio page of ``python -m glm_experiments.web``: engines (a loaded run each), the Chat and Compare tabs, serving on a local port."""

from __future__ import annotations

import logging
import os
import socket

from glm_experiments.errors import UserError
from glm_experiments.inference.engines import Engine
from glm_experiments.inference.web_compare import KEYS, KEYS_SCRIPT, Comparison, compare_tab

log = logging.getLogger("glm_experiments.web")


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
    from glm_experiments.inference.chat_session import (
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
                    # only sampling reads them: inactive (greyed) under greedy decoding
                    temperature = gr.Slider(0.05, 2.0, value=d["temperature"], step=0.05, label="temperature",
                                            interactive=not d["greedy"], elem_id="chat-temperature")
                    top_p = gr.Slider(0.05, 1.0, value=d["top_p"], step=0.05, label="top-p",
                                      interactive=not d["greedy"], elem_id="chat-top-p")
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

                def sampling(is_greedy):
                    return gr.update(interactive=not is_greedy), gr.update(interactive=not is_greedy)

                greedy.change(sampling, greedy, [temperature, top_p], queue=False)

                def pick(label, past):
                    engine = by_label[label]
                    d = defaults(engine)
                    cleared = (
                        f"switched to **{label}**: the conversation so far ({len(past) // 2} turn(s), another "
                        "run's replies) was cleared; the generation settings are this run's"
                        if past
                        else f"switched to **{label}** (its own template and settings)"
                    )
                    return (
                        describe(engine),
                        [],
                        [],
                        cleared,
                        gr.update(maximum=d["limit"], value=min(d["max_new_tokens"], d["limit"])),
                        d["greedy"],
                        gr.update(value=d["temperature"], interactive=not d["greedy"]),
                        gr.update(value=d["top_p"], interactive=not d["greedy"]),
                    )

                run.change(
                    pick, [run, history], [about, chatbot, history, chat_note, max_new, greedy, temperature, top_p]
                )

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
