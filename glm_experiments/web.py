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
import sys
from pathlib import Path

from glm_experiments.errors import cli_main
from glm_experiments.inference.engines import find_engines, load_engines
from glm_experiments.inference.web_compare import Comparison
from glm_experiments.inference.web_page import _check_port, _gradio, build_page, serve

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


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from glm_experiments.inference.flags import check_device, check_generation_length

    check_device(args.device)
    engines = find_engines(args)
    for engine in engines:  # a reply within each model's positions (the prompt box is limited to what is left)
        check_generation_length(engine.cfg.model, args.max_new_tokens)
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
