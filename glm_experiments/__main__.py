"""``python -m glm_experiments [--debug] [group=option ...] [key=value ...]``: one training run (or a sweep with --multirun)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from glm_experiments.errors import DEBUG_FLAG, EXIT_BAD_INPUT, as_user_error, debug_requested, one_line

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

if __name__ == "__main__":  # before the imports below (torch, transformers): a mistyped option is answered at once
    from glm_experiments.config.hydra_checks import exit_on_unknown_group_options

    exit_on_unknown_group_options([arg for arg in sys.argv[1:] if arg != DEBUG_FLAG], Path(CONF_DIR))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import glm_experiments.config.schema  # noqa: E402, F401  (registers the schema before Hydra composes)
from glm_experiments.methods import method_names  # noqa: E402
from glm_experiments.recipe.interrupts import exit_code, signal_name  # noqa: E402

method_names()  # each method module stores its schema (method/base_<name>) as it registers
log = logging.getLogger("glm_experiments")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from glm_experiments.recipe.run_dirs import check_sweep_job_resume
    from glm_experiments.recipe.run_result import RunResult
    from glm_experiments.recipe.summary import print_summary
    from glm_experiments.recipe.train import preflight, run
    from glm_experiments.scale.launcher import launch, needs_launch

    try:
        if _in_multirun() and not check_sweep_job_resume(cfg):  # a finished job of a resumed sweep: nothing to do
            return RunResult.read(Path(cfg.output_dir)).metrics_after.get(cfg.optimize_metric)
        preflight(cfg)  # before torchrun workers start and before any weight loads: one message, not one per rank
        # several processes or DeepSpeed: torchrun workers train from the config composed here
        result = launch(cfg) if needs_launch(cfg) else run(cfg)
    except Exception as exc:  # noqa: BLE001 - sorted into user errors (one line) and bugs (traceback)
        error = as_user_error(exc)
        if error is None or debug_requested():
            raise
        if _in_multirun():
            log.error("%s", error)
            raise  # the sweeper records this job as failed and goes on with the others
        _to_log_files(error)  # the run's log keeps it; the console gets it once, below
        print(one_line(error), file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (train.run turns it into KeyboardInterrupt)
        if _in_multirun():
            raise  # stops the sweep; its parent run ends KILLED
        print(f"interrupted by {signal_name(exc)}: the MLflow run ended KILLED; continue from the last checkpoint "
              f"with hydra.run.dir={cfg.output_dir} resume=auto", file=sys.stderr)
        raise SystemExit(exit_code(exc)) from None
    print_summary(cfg, result)
    if cfg.launcher.node_rank != 0:
        return None  # multi-node: node 0 (rank 0) has the results
    # returned for hparams_search (Optuna maximises it)
    if cfg.optimize_metric not in result.metrics_after:
        log.warning("optimize_metric=%s was not computed (this run has %s; data.metrics and data.dev_file decide): "
                    "a sweeper gets None", cfg.optimize_metric, sorted(result.metrics_after))
    return result.metrics_after.get(cfg.optimize_metric)


def _to_log_files(error: BaseException) -> None:
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (error,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN"


if __name__ == "__main__":
    if DEBUG_FLAG in sys.argv:  # not a Hydra override: tracebacks for our errors and Hydra's own
        sys.argv.remove(DEBUG_FLAG)
        os.environ["HYDRA_FULL_ERROR"] = "1"
    if not debug_requested():  # Hydra's composition errors, and a sweep's failed job, as one error: line, exit 2
        from glm_experiments.config.hydra_checks import report_hydra_errors_in_one_line

        report_hydra_errors_in_one_line(sys.argv[1:])
    main()
