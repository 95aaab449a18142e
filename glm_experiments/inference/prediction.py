"""Predictions of a finished run (or a foreign adapter on its base) over a data file, with metrics when references exist."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from glm_experiments.errors import UserError
from glm_experiments.recipe.outputs import atomic_write_text

log = logging.getLogger("glm_experiments.predict")


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
    if args.max_new_tokens:  # the prompt (up to data.max_source_length) and the reply within the positions
        from glm_experiments.inference.flags import check_generation_length

        check_generation_length(cfg.model, args.max_new_tokens, int(cfg.data.max_source_length))
    input_path = resolve_data_path(args.input, "--input")
    samples, report = load_samples(input_path, cfg.data)
    if args.max_samples:
        samples = samples[: args.max_samples]
    output = Path(args.output) if args.output else run_dir / "predictions" / f"predict-{input_path.stem}.jsonl"
    output = check_prediction_output(output, "--output" if args.output else "the predictions file")

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
    eval_set = EvalSet.of(samples, loaded.tokenizer, loaded.template, cfg.data)
    if not eval_set.prompts:
        raise UserError(f"{args.input}: no sample ends with a reply to compare against")
    metrics = list(cfg.data.metrics)
    means, rows = evaluate_generation(loaded.model, loaded.tokenizer, loaded.template,
                                      eval_set, eval_cfg, metrics,
                                      show_progress=not args.no_progress)
    for row, sample in zip(rows, (s for s in samples if s.messages[-1]["role"] == "assistant")):
        row["source"] = sample.source

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
    metrics_path = metrics_file(output)
    atomic_write_text(metrics_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    summary["metrics_file"] = str(metrics_path)
    return summary


def metrics_file(output: Path) -> Path:
    return output.with_name(output.stem + ".metrics.json")


def _written_by_predict(output: Path) -> bool:
    """``output`` is a predictions file that predict wrote: its metrics file names it."""
    try:
        summary = json.loads(metrics_file(output).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and Path(str(summary.get("predictions", ""))).resolve() == output.resolve()


def check_prediction_output(output: Path, flag: str) -> Path:
    """The predictions file and its metrics file may replace only what an earlier predict wrote, never a run's
    own files (outputs.check_out_file)."""
    from glm_experiments.recipe.outputs import check_out_file

    earlier = _written_by_predict(output)
    checked = check_out_file(output, lambda _: earlier, flag=flag)
    check_out_file(metrics_file(output), lambda _: earlier, flag=flag)
    return checked


def _default_config(args: argparse.Namespace):
    """The project's config for ``--family`` / ``--model-path`` / ``--data``, as the CLI would compose it."""
    from hydra.errors import HydraException

    from glm_experiments.compose import compose

    overrides = [f"model={args.family}", f"data={args.data}"]
    if args.model_path:
        overrides.append(f"model.path={Path(args.model_path).expanduser().resolve()}")
    try:
        return compose(overrides)
    except HydraException as exc:
        raise UserError(f"cannot compose the config for {' '.join(overrides)}: {str(exc).splitlines()[0]}") from None


def _load_foreign(cfg, args: argparse.Namespace):
    """(base from --model-path) + (--adapter, converted on the fly), in eval mode on the device."""
    from glm_experiments.inference.run_loading import LoadedRun, default_device, load_base
    from glm_experiments.migration.thudm_adapters import load_adapter
    from glm_experiments.models.thudm import CheckpointError

    try:
        model, tokenizer, template = load_base(cfg)
        model, method = load_adapter(model, args.adapter, args.family)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        raise UserError(f"--adapter {args.adapter}: {exc}") from None
    model.to(args.device or default_device())
    model.eval()
    return LoadedRun(run_dir=Path.cwd(), cfg=cfg, model=model, tokenizer=tokenizer, template=template, method=method)
