"""Chat with a finished run (base + adapter) in the terminal.

    python -m glm_experiments.chat --run outputs/2025-01-01/12-00-00_lora_chatglm3
    python -m glm_experiments.chat --run 3f2a...c9 --tracking-uri sqlite:///mlflow.db --sample --temperature 0.8

The conversation is kept across turns and rendered with the model family's own template (the one the
run trained with), so turn N sees turns 1..N-1 exactly as a multi-turn training sample would. When the
prompt would exceed ``--max-length`` the oldest turns are dropped (and it says so).
Commands: ``/reset`` clears the history, ``/exit`` (or ``/quit``, Ctrl-D) ends. Replies stream as they
are generated (``--no-stream`` prints them whole). Reads from a pipe too: one message per line.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from glm_experiments.errors import UserError, cli_main
from glm_experiments.run_loading import add_run_arguments

log = logging.getLogger("glm_experiments.chat")

COMMANDS = "/reset clears the history, /exit ends"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m glm_experiments.chat", description=__doc__.split("\n\n")[0])
    add_run_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=None, help="per reply (default: the run's eval.max_new_tokens)")
    p.add_argument("--max-length", type=int, default=None,
                   help="prompt + reply token budget; older turns are dropped beyond it (default: the model's maximum)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="with --sample (default: the run's eval.temperature)")
    p.add_argument("--top-p", type=float, default=None, help="with --sample (default: the run's eval.top_p)")
    p.add_argument("--system", default=None, help="a system message (ChatGLM3 / GLM-4 templates)")
    p.add_argument("--no-stream", action="store_true", help="print each reply when it is complete")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    return p.parse_args(argv)


class ChatSession:
    """The history and one reply at a time; printing goes through ``console``."""

    def __init__(self, loaded, args, console):
        from omegaconf import OmegaConf

        from glm_experiments.evaluation import generation_kwargs

        self.model, self.tokenizer, self.template = loaded.model, loaded.tokenizer, loaded.template
        self.console, self.stream = console, not args.no_stream
        eval_cfg = OmegaConf.create(OmegaConf.to_container(loaded.cfg.eval, resolve=True))
        if args.max_new_tokens:
            eval_cfg.max_new_tokens = args.max_new_tokens
        eval_cfg.num_beams = 1
        eval_cfg.do_sample = bool(args.sample)
        if args.temperature is not None:
            eval_cfg.temperature = args.temperature
        if args.top_p is not None:
            eval_cfg.top_p = args.top_p
        self.gen_kwargs = generation_kwargs(eval_cfg, self.tokenizer, self.template)
        model_max = getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config, "seq_length", 2048)
        self.max_length = args.max_length or int(model_max)
        self.system = args.system
        if self.system and not self.template.has_system_role:
            raise UserError(f"--system: the {self.template.name} template has no system role (ChatGLM3 / GLM-4 have one)")
        self.history: list[dict] = []
        # ChatGLM3 / GLM-4 replies start with a metadata line (empty for plain text): not shown
        self.skip_first_line = self.template.reply_starts_with_metadata_line

    def reset(self) -> None:
        self.history = []

    def _prompt_ids(self, query: str) -> tuple[list[int], int]:
        """Prompt ids for ``query`` after the history, dropping the oldest turns to fit; (ids, dropped turns)."""
        budget = self.max_length - self.gen_kwargs["max_new_tokens"]
        dropped = 0
        while True:
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
            messages = messages + [{"role": "user", "content": query}]
            ids = self.template.prompt(self.tokenizer, messages)
            if len(ids) <= budget or not self.history:
                break
            self.history = self.history[2:]  # one user + one assistant message
            dropped += 1
        if len(ids) > budget:  # the query alone is too long: keep its end (and the template's head)
            head = self.template.prefix(self.tokenizer)
            ids = ids[: len(head)] + ids[len(ids) - (budget - len(head)):]
        return ids, dropped

    def reply(self, query: str) -> str:
        import torch
        from transformers import TextIteratorStreamer

        ids, dropped = self._prompt_ids(query)
        if dropped:
            self.console.print(f"[dim](history too long for {self.max_length} tokens: dropped the oldest {dropped} turn(s))[/dim]")
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        self.console.print("[bold green]assistant>[/bold green] ", end="")
        if self.stream:
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            errors: list[BaseException] = []

            def work():
                try:
                    with torch.no_grad():
                        self.model.generate(**inputs, **self.gen_kwargs, streamer=streamer)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    errors.append(exc)
                    streamer.end()

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            text, shown = "", 0
            for piece in streamer:
                text += piece
                visible = self._visible(text)
                if visible is not None and len(visible) > shown:
                    self.console.print(visible[shown:], end="", markup=False, highlight=False, soft_wrap=True)
                    shown = len(visible)
            thread.join()
            if errors:
                raise errors[0]
            final = self.template.clean_response(text)
            if final.startswith(self._visible(text) or "") and len(final) > shown:
                self.console.print(final[shown:], end="", markup=False, highlight=False, soft_wrap=True)
        else:
            with torch.no_grad():
                out = self.model.generate(**inputs, **self.gen_kwargs)
            final = self.template.clean_response(self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
            self.console.print(final, end="", markup=False, highlight=False, soft_wrap=True)
        self.console.print()
        self.history += [{"role": "user", "content": query}, {"role": "assistant", "content": final}]
        self.console.print(f"[dim]({len(ids)} prompt tokens, {len(self.history) // 2} turn(s) in history)[/dim]")
        return final

    def _visible(self, text: str) -> str | None:
        """The part of a partial reply to show: after the metadata line for ChatGLM3-style templates."""
        if not self.skip_first_line:
            return text.lstrip()
        if "\n" not in text:
            return None
        return text.split("\n", 1)[1].lstrip()


def chat_loop(session: ChatSession, console, read=None) -> int:
    read = read or (lambda: console.input("[bold cyan]you>[/bold cyan] "))
    turns = 0
    while True:
        try:
            line = read()
        except (EOFError, KeyboardInterrupt):
            console.print()
            break
        query = line.strip()
        if not query:
            continue
        if query.lower() in ("/exit", "/quit"):
            break
        if query.lower() == "/reset":
            session.reset()
            console.print("[dim](history cleared)[/dim]")
            continue
        if query.startswith("/"):
            console.print(f"[yellow]unknown command {query.split()[0]}: {COMMANDS}[/yellow]")
            continue
        session.reply(query)
        turns += 1
    console.print("bye")
    return turns


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from rich.console import Console

    from glm_experiments.run_loading import load_run

    console = Console()
    with console.status("loading the run ...") if console.is_terminal else _nullcontext():
        loaded = load_run(args.run, args.tracking_uri, device=args.device)
    session = ChatSession(loaded, args, console)
    cfg = loaded.cfg
    console.print(f"[bold]{loaded.method}[/bold] on {cfg.model.name} ({loaded.template.name} template) from {loaded.run_dir}")
    console.print(f"[dim]{COMMANDS}; {'sampling' if args.sample else 'greedy'}, "
                  f"up to {session.gen_kwargs['max_new_tokens']} new tokens per reply[/dim]")
    chat_loop(session, console)
    return 0


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
