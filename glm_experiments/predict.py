"""Run a finished run (base + its adapter) on a data file and score the predictions.

    python -m glm_experiments.predict --run outputs/2025-01-01/12-00-00_lora_tiny --input data/adgen_demo/dev.json
    python -m glm_experiments.predict --run 3f2a...c9 --tracking-uri sqlite:///mlflow.db --input test.json \\
        --output preds.jsonl --batch-size 8 --max-new-tokens 128

The input is read in the run's data format (``data.format`` and its columns); the final reply of each
sample is the reference. Writes one JSON line per sample (input, reference, prediction and its
per-sample scores), the mean metrics (the run's ``data.metrics``) beside it as ``<output>.metrics.json``,
and prints a metrics line and, last on stdout, the same summary as one JSON line.
Generation settings are the run's ``eval`` settings (greedy by default) unless overridden.

An adapter trained elsewhere (THUDM's ptuning/main.py, ChatGLM3's finetune_demo LoRA or PREFIX_TUNING, or one of
ours) is evaluated without a run, on a base checkpoint; the data format and generation settings are the project's
defaults for ``--data`` (converted once into the cache, see ``glm_experiments.migration.thudm_adapters``):

    python -m glm_experiments.predict --model-path /data/chatglm3-6b --family chatglm3 \
        --adapter output/adgen-lora/checkpoint-3000 --input AdvertiseGen/dev.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from glm_experiments.errors import cli_main
from glm_experiments.inference.prediction import predict
from glm_experiments.inference.run_loading import add_run_arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m glm_experiments.predict", description=__doc__.split("\n\n")[0])
    add_run_arguments(p, required=False)
    foreign = p.add_argument_group("an adapter without a run (instead of --run)")
    foreign.add_argument("--adapter", default=None, help="adapter directory: THUDM/PEFT (converted on the fly) or ours")
    foreign.add_argument("--model-path", default=None, help="base checkpoint directory (THUDM layout or converted)")
    foreign.add_argument("--family", default=None, choices=["chatglm", "chatglm2", "chatglm3", "glm4", "tiny"])
    foreign.add_argument("--data", default="adgen", help="data config naming the input format and metrics (default adgen)")
    p.add_argument("--input", required=True, help="data file in the run's data format (JSON lines or a JSON array)")
    p.add_argument("--output", default=None,
                   help="predictions file (.jsonl); default: <run>/predictions/predict-<input name>.jsonl")
    p.add_argument("--batch-size", type=int, default=None, help="generation batch size (default: the run's eval.batch_size)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval.max_new_tokens")
    p.add_argument("--max-samples", type=int, default=None, help="only the first N samples")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (generation, weight loading)")
    args = p.parse_args(argv)
    if args.run and args.adapter:
        p.error("give either --run or --adapter (with --model-path and --family), not both")
    if not args.run and (not args.adapter or not args.family or (args.family != "tiny" and not args.model_path)):
        p.error("give --run, or --adapter with --family and --model-path")
    return args


def check_args(args: argparse.Namespace) -> None:
    from glm_experiments.inference.flags import check_device, check_positive

    check_positive(args, "batch_size", "max_new_tokens", "max_samples")
    check_device(args.device)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    summary = predict(args)
    line = " | ".join(f"{k} {v:.2f}" for k, v in summary["metrics"].items())
    print(f"{summary['samples']} predictions -> {summary['predictions']}", file=sys.stderr)
    print(f"metrics ({summary['samples']} samples): {line}", file=sys.stderr)
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
