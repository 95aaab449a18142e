"""End-of-run summary: metrics before/after, where things are, how to look at them."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def after_label(saved_step: dict) -> str:
    """The "after" column: which step's model it is (train.keep_best: the best evaluation's, not the last step's)."""
    if "step" not in saved_step:
        return "after"
    best = f", best {saved_step['best_metric']}" if "best_metric" in saved_step else ""
    last = f" of {saved_step['last_step']}" if saved_step["step"] != saved_step.get("last_step") else ""
    return f"after (step {saved_step['step']}{last}{best})"


def print_summary(cfg, result) -> None:
    console = Console()
    from glm_experiments.config.naming import job_label
    from glm_experiments.recipe.run_result import hydra_tags

    tags, overrides = hydra_tags()
    varied = job_label(overrides)
    title = (f"{result.name} on {cfg.data.name}" if getattr(result, "name", None)
             else f"{cfg.method.name} on {cfg.model.name} / {cfg.data.name}" + (f" ({varied})" if varied else ""))
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column(after_label(getattr(result, "saved_step", None) or {}), justify="right")
    # rows named as the MLflow metrics are: eval/<metric> on the dev set; eval/loss its cross-entropy
    for name in list(cfg.data.metrics) + ["loss"]:
        before, after = result.metrics_before.get(name), result.metrics_after.get(name)
        if before is None and after is None:
            continue
        samples = result.metrics_after.get("loss_samples") if name == "loss" else None
        label = f"eval/{name} ({samples:,} dev samples)" if samples else f"eval/{name}"
        table.add_row(label, "-" if before is None else f"{before:.2f}", "-" if after is None else f"{after:.2f}")
    for name in cfg.eval.get("at_lengths") or []:  # eval.at_lengths: the same model at other source lengths
        for metric in cfg.data.metrics:
            if (after := result.metrics_after.get(f"{name}/{metric}")) is not None:
                table.add_row(f"{metric} at {name}", "-", f"{after:.2f}")
    console.print(table)
    t = result.train_metrics
    console.print(
        f"trainable {result.trainable.get('trainable', 0):,} / {result.trainable.get('total', 0):,} "
        f"({result.trainable.get('pct', 0):.3f}%) | train {t.get('train_seconds', 0):.0f} s, "
        f"{t.get('tokens_per_s', 0):,.0f} tokens/s | train/loss {t.get('loss', float('nan')):.3f} (last logging "
        f"window), train/loss_run_mean {t.get('loss_run_mean', float('nan')):.3f}"
    )
    if tags.get("hydra.choices.debug") == "smoke":
        console.print(f"[bold yellow]smoke run ({cfg.train.max_steps} steps): wiring check, not a result[/]")
    saved = getattr(result, "saved_step", None) or {}
    if saved.get("last_step_adapter"):
        console.print(f"adapter/: step {saved['step']}'s weights (best {saved['best_metric']}); the last step "
                      f"{saved['last_step']}'s: {saved['last_step_adapter']}/")
    console.print(f"outputs: {result.run_dir}")
    if result.run_id:
        console.print(f"MLflow run {result.run_id} in {cfg.tracking.tracking_uri} (experiment '{cfg.tracking.experiment_name}')")
        console.print(f"open the UI: mlflow ui --backend-store-uri {cfg.tracking.tracking_uri} --workers 1 "
                      "(then *Model training* at the top left for the runs table)")
