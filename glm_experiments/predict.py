"""Run a finished run (base + its adapter) on a data file and score the predictions.

    python -m glm_experiments.predict --run outputs/2025-01-01/12-00-00_lora_tiny --input data/adgen_demo/dev.json
    python -m glm_experiments.predict --run 3f2a...c9 --tracking-uri sqlite:///mlflow.db --input test.json \\
        --output preds.jsonl --batch-size 8 --max-new-tokens 128

The input is read in the run's data format (``data.format`` and its columns); the final reply of each
sample is the reference. Writes one JSON line per sample (input, reference, prediction and its
per-sample scores), the mean metrics (the run's ``data.metrics``) beside it as ``<output>.metrics.json``,
and prints a metrics line and, last on stdout, the same summary as one JSON line.
Generation settings are the run's ``eval`` settings (greedy by default) unless overridden.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from glm_experiments.errors import UserError, cli_main
from glm_experiments.run_loading import add_run_arguments

log = logging.getLogger("glm_experiments.predict")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m glm_experiments.predict", description=__doc__.split("\n\n")[0])
    add_run_arguments(p)
    p.add_argument("--input", required=True, help="data file in the run's data format (JSON lines or a JSON array)")
    p.add_argument("--output", default=None,
                   help="predictions file (.jsonl); default: <run>/predictions/predict-<input name>.jsonl")
    p.add_argument("--batch-size", type=int, default=None, help="generation batch size (default: the run's eval.batch_size)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval.max_new_tokens")
    p.add_argument("--max-samples", type=int, default=None, help="only the first N samples")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (generation, weight loading)")
    args = p.parse_args(argv)
    for name in ("batch_size", "max_new_tokens", "max_samples"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    return args


def predict(args: argparse.Namespace) -> dict:
    from omegaconf import OmegaConf

    from glm_experiments.data.formats import load_samples, resolve_data_path
    from glm_experiments.run_loading import check_adapter, find_run_dir, load_run, load_run_config

    # everything that can be checked without loading the model (or importing torch), first
    run_dir = find_run_dir(args.run, args.tracking_uri)
    cfg = load_run_config(run_dir)
    check_adapter(run_dir)
    input_path = resolve_data_path(args.input, "--input")
    samples, report = load_samples(input_path, cfg.data)
    if args.max_samples:
        samples = samples[: args.max_samples]

    from glm_experiments.data.dataset import eval_prompts
    from glm_experiments.evaluation import EvalSet, evaluate_generation, write_predictions

    if args.no_progress:  # also transformers' own bars ("Loading weights")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    loaded = load_run(run_dir, device=args.device)
    eval_cfg = OmegaConf.create(OmegaConf.to_container(cfg.eval, resolve=True))
    if args.batch_size:
        eval_cfg.batch_size = args.batch_size
    if args.max_new_tokens:
        eval_cfg.max_new_tokens = args.max_new_tokens
    prompts, inputs, references = eval_prompts(samples, loaded.tokenizer, loaded.template, cfg.data)
    if not prompts:
        raise UserError(f"{args.input}: no sample ends with a reply to compare against")
    metrics = list(cfg.data.metrics)
    means, rows = evaluate_generation(loaded.model, loaded.tokenizer, loaded.template,
                                      EvalSet(prompts, inputs, references), eval_cfg, metrics,
                                      show_progress=not args.no_progress)
    for row, sample in zip(rows, (s for s in samples if s.messages[-1]["role"] == "assistant")):
        row["source"] = sample.source

    output = Path(args.output) if args.output else run_dir / "predictions" / f"predict-{input_path.stem}.jsonl"
    write_predictions(rows, output)
    summary = {
        "run_dir": str(run_dir),
        "method": loaded.method,
        "input": str(input_path),
        "samples": len(rows),
        "skipped": report.skipped,
        "predictions": str(output),
        "generation": {k: eval_cfg[k] for k in ("max_new_tokens", "do_sample", "num_beams", "batch_size")},
        "metrics": {k: means[k] for k in metrics if k in means},
        "gen_seconds": means.get("gen_seconds"),
    }
    metrics_path = output.with_name(output.stem + ".metrics.json")
    metrics_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    summary["metrics_file"] = str(metrics_path)
    return summary


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    summary = predict(args)
    line = " | ".join(f"{k} {v:.2f}" for k, v in summary["metrics"].items())
    print(f"{summary['samples']} predictions -> {summary['predictions']}", file=sys.stderr)
    print(f"metrics ({summary['samples']} samples): {line}", file=sys.stderr)
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
