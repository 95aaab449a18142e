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
from pathlib import Path

from glm_experiments.errors import UserError, cli_main
from glm_experiments.inference.run_loading import add_run_arguments

log = logging.getLogger("glm_experiments.predict")


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
    for name in ("batch_size", "max_new_tokens", "max_samples"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    return args


def predict(args: argparse.Namespace) -> dict:
    from omegaconf import OmegaConf

    from glm_experiments.data.formats import load_samples, resolve_data_path
    from glm_experiments.inference.run_loading import check_adapter, find_run_dir, load_run, load_run_config

    # everything that can be checked without loading the model (or importing torch), first
    if args.run:
        run_dir = find_run_dir(args.run, args.tracking_uri)
        cfg = load_run_config(run_dir)
        check_adapter(run_dir)
    else:
        run_dir, cfg = Path.cwd(), _default_config(args)
    input_path = resolve_data_path(args.input, "--input")
    samples, report = load_samples(input_path, cfg.data)
    if args.max_samples:
        samples = samples[: args.max_samples]

    from glm_experiments.data.dataset import eval_prompts
    from glm_experiments.recipe.evaluation import EvalSet, evaluate_generation, write_predictions

    if args.no_progress:
        from glm_experiments.recipe.console import quiet_library_bars

        quiet_library_bars()
    loaded = load_run(run_dir, device=args.device) if args.run else _load_foreign(cfg, args)
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
    if not args.run:
        run_dir = None
    write_predictions(rows, output)
    summary = {
        "run_dir": str(run_dir) if run_dir else None,
        "adapter": args.adapter,
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


def _default_config(args: argparse.Namespace):
    """The project's config for ``--family`` / ``--model-path`` / ``--data``, as the CLI would compose it."""
    from hydra.errors import HydraException

    from glm_experiments.config.compose import compose

    overrides = [f"model={args.family}", f"data={args.data}"]
    if args.model_path:
        overrides.append(f"model.path={Path(args.model_path).expanduser().resolve()}")
    try:
        return compose(overrides)
    except HydraException as exc:
        raise UserError(f"cannot compose the config for {' '.join(overrides)}: {str(exc).splitlines()[0]}") from None


def _load_foreign(cfg, args: argparse.Namespace):
    """(base from --model-path) + (--adapter, converted on the fly), in eval mode on the device."""
    from glm_experiments.models.thudm import CheckpointError
    from glm_experiments.migration.thudm_adapters import load_adapter
    from glm_experiments.inference.run_loading import LoadedRun, default_device, load_base

    try:
        model, tokenizer, template = load_base(cfg)
        model, method = load_adapter(model, args.adapter, args.family)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        raise UserError(f"--adapter {args.adapter}: {exc}") from None
    model.to(args.device or default_device())
    model.eval()
    return LoadedRun(run_dir=Path.cwd(), cfg=cfg, model=model, tokenizer=tokenizer, template=template, method=method)


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
