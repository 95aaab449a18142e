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

from glm_experiments.errors import cli_main
from glm_experiments.inference.chat_session import COMMANDS, ChatSession, _nullcontext, chat_loop
from glm_experiments.inference.run_loading import add_run_arguments

log = logging.getLogger("glm_experiments.chat")


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


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from rich.console import Console

    from glm_experiments.inference.flags import check_device, check_generation_length, check_positive, check_sampling
    from glm_experiments.inference.run_loading import find_run_dir, load_run, load_run_config

    check_positive(args, "max_new_tokens", "max_length")
    check_sampling(args.temperature, args.top_p)
    check_device(args.device)
    run_dir = find_run_dir(args.run, args.tracking_uri)
    check_generation_length(load_run_config(run_dir).model, args.max_new_tokens, max_length=args.max_length)
    console = Console()
    with console.status("loading the run ...") if console.is_terminal else _nullcontext():
        loaded = load_run(run_dir, device=args.device)
    session = ChatSession(loaded, args, console)
    cfg = loaded.cfg
    console.print(f"[bold]{loaded.method}[/bold] on {cfg.model.name} ({loaded.template.name} template) from {loaded.run_dir}")
    console.print(f"[dim]{COMMANDS}; {'sampling' if args.sample else 'greedy'}, "
                  f"up to {session.gen_kwargs['max_new_tokens']} new tokens per reply[/dim]")
    chat_loop(session, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
