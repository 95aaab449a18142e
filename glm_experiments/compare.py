"""Compare tracked runs: which params vary, the final metrics, the curves.

    python -m glm_experiments.compare --experiment method_comparison
    python -m glm_experiments.compare --parent <sweep parent run id> [--filter "params.method.name = 'lora'"]
    python -m glm_experiments.compare --tracking-uri sqlite:///mlflow.db --experiment glm_experiments --out cmp/

Selects the runs (the children of a sweep's parent run, or every training run of an experiment), works out
which params differ between them, names each run by those values (``src=512 tgt=128``) and prints three
tables that fit a 100-column terminal: scores (BLEU-4, ROUGE-1/2/L, F1, accuracy; the best in green),
training (final train loss, eval loss, samples truncated in train / dev) and cost (trainable %, peak memory,
and the one-off timings, marked as such); metrics identical in every run are named. Runs that differ only in
``seed`` are one setting: the tables then show a row per setting, mean ± sd over its seeds. Runs evaluated at other
lengths too (``eval.at_lengths``) get a trained-at x evaluated-at grid per metric and verdicts per evaluated-at
column. Writes into --out
(default ``./comparisons/<name>/``):

* ``loss_curves.png``   train/loss per run, overlaid
* ``final_metrics.png`` grouped bars of the final quality metrics per run (+ trainable %, memory, speed)
* ``verdicts.json``     each setting against the baseline (``--baseline KEY=VALUE``; default the first setting)
  per metric, on the dev samples both evaluated: delta, 95 % paired-bootstrap interval, sign-flip permutation
  p-value (and Holm-adjusted), better / worse / within noise, and the dev samples that would detect the
  difference; runs differing only in ``seed`` are one setting (glm_experiments/study/verdicts.py)
* ``report.md``         the verdicts first, the tables, before/after training, the params all runs share, the PNGs
* ``report.html``       the same with the plots embedded (MLflow's artifact view renders it)

and logs them as artifacts (``comparison/``) to the parent run (``--parent``, or with ``--experiment`` the
experiment's latest sweep parent), else to the experiment's one ``comparison`` run, made on first use, with
the verdicts as metrics ``verdict/<setting>/<metric>/delta|ci_low|ci_high|p`` and as sentences in its description.
``compare_runs(...)`` returns the table rows for programmatic use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glm_experiments.errors import cli_main

from glm_experiments.study.comparison import collect
from glm_experiments.study.tables import print_table


# ----------------------------------------------------------------------------- CLI
@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_experiments.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="compare the training runs of this experiment")
    which.add_argument("--parent", help="compare the child runs of this (sweep parent) run id")
    parser.add_argument("--filter", default=None, help="extra MLflow filter, e.g. \"params.method.name = 'lora'\" "
                        "or \"attributes.status = 'FINISHED'\"")
    parser.add_argument("--baseline", action="append", metavar="KEY=VALUE",
                        help="the setting the others are compared with, by a varied param (src=512, "
                        "data.max_source_length=512, method=lora; repeat or give several to name one setting); "
                        "default: the first setting in sweep order")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default ./comparisons/<name>/)")
    parser.add_argument("--no-log", action="store_true", help="do not log the outputs to MLflow")
    args = parser.parse_args(argv)
    from glm_experiments.study.report import log_outputs, slug, write_outputs

    comparison = collect(args.tracking_uri, args.experiment, args.parent, args.filter, baseline=args.baseline)
    print_table(comparison)
    out_dir = args.out or Path("comparisons") / slug(comparison.name)
    files = write_outputs(comparison, out_dir)
    for path in files.values():
        print(f"wrote {path}")
    if not args.no_log:
        run_id = log_outputs(comparison, out_dir)
        print(f"logged to run {run_id} (artifacts: comparison/; open comparison/report.html in the MLflow UI)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
