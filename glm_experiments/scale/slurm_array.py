"""``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml): every job of a ``--multirun`` a task of one sbatch
job array, through hydra-submitit-launcher's SLURM launcher, with ``SweepLauncher``'s accounting of lost jobs
(submitit_pool.py). A job that SLURM interrupts checkpoints the step it is at, is requeued and continues in the same
directory and MLflow run (slurm_jobs.py); ``scancel`` ends the children and the parent KILLED. docs/scaling.md."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from glm_experiments.scale.submitit_pool import SweepLauncher

log = logging.getLogger(__name__)


class SlurmArray(SweepLauncher):
    """``hydra/launcher=slurm``: one sbatch job array (``array_parallelism`` tasks at a time). A job that SLURM
    interrupts (its time limit near, a preemption, ``scontrol requeue``) checkpoints the step it is at and is
    requeued; restarted, it continues from there in the same directory and MLflow run (glm_experiments/scale/slurm_jobs.py)."""

    def _submit(self, jobs: list[tuple[int, list[str]]]) -> list:
        import submitit

        from glm_experiments.scale.slurm_jobs import follow_jobs

        tracking = self.config.get("tracking")
        if (
            tracking is not None
            and tracking.get("enabled")
            and str(tracking.tracking_uri).startswith("sqlite:")
        ):
            log.warning(
                "tracking.tracking_uri=%s: jobs on other nodes share one SQLite file over the network "
                "file system, whose locks SQLite cannot trust; use tracking=server (docs/mlflow_server.md)",
                tracking.tracking_uri,
            )
        executor = submitit.AutoExecutor(
            cluster="slurm", **slurm_init_params(self.params)
        )
        executor.update_parameters(
            **slurm_parameters(self.params, self.config.launcher.nproc_per_node)
        )
        args = [self._job_args(num, overrides) for num, overrides in jobs]
        submitted = executor.map_array(self, *zip(*args))
        if submitted:
            log.info("SLURM job array %s: %d job(s)", submitted[0].job_id.split("_")[0], len(submitted))
        follow_jobs(submitted)
        self._cancelled: list[tuple[int, str]] = []
        return submitted

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        results = super().launch(job_overrides, initial_job_idx)
        callback = self._sweep_callback()
        if callback is not None:  # every job has ended: a run its process could not close is not running
            callback.close_running_children("its SLURM job ended without closing it (cancelled or killed)")
        if self._cancelled:
            jobs = ", ".join(f"#{num} ({job_id})" for num, job_id in self._cancelled)
            message = f"SLURM cancelled job(s) {jobs}: their runs ended KILLED, their checkpoints are kept"
            if callback is not None:
                callback.abort(message, status="KILLED")
            print(message, file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM)
        return results

    def _result(self, num: int, overrides: list[str], job) -> JobReturn:
        from glm_experiments.scale.slurm_jobs import cancelled

        job.wait()
        if cancelled(job) and not job.paths.result_pickle.exists():
            self._cancelled.append((num, job.job_id))
            callback = self._sweep_callback()
            if callback is not None:
                callback.record_cancelled_job(num, overrides, f"SLURM job {job.job_id} was cancelled")
            log.warning("job #%d (SLURM job %s) was cancelled", num, job.job_id)
            return JobReturn(overrides=overrides, status=JobStatus.UNKNOWN)
        return super()._result(num, overrides, job)

    def __call__(
        self,
        sweep_overrides: list[str],
        job_dir_key: str,
        job_num: int,
        job_id: str,
        singleton_state: dict,
    ) -> JobReturn:
        """The job, in its process on a node: the plugin's (compose the job's config, Hydra's ``run_job``) with
        SLURM's interruptions handled and, when SLURM started it again, ``resume=auto`` and the same MLflow run."""
        import submitit
        from hydra.core.utils import run_job, setup_globals
        from omegaconf import open_dict

        from glm_experiments.scale.slurm_jobs import JobInterruptions, restart_count
        from glm_experiments.tracking.mlflow_tracker import CONTINUE_RUN_ENV

        Singleton.set_state(singleton_state)
        setup_globals()
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, sweep_overrides)
        with open_dict(sweep_config.hydra.job) as job:
            job.id = submitit.JobEnvironment().job_id
            sweep_config.hydra.job.num = job_num
        restarts = restart_count()
        if restarts:
            os.environ[CONTINUE_RUN_ENV] = str(restarts)
            if sweep_config.get("resume") is None:
                sweep_config.resume = "auto"  # its own checkpoints, in its own job directory
            log.info("SLURM restart %d of job #%d: continuing from its last checkpoint", restarts, job_num)
        with JobInterruptions(self.params["max_num_timeout"]) as interruptions:
            try:
                return run_job(
                    hydra_context=self.hydra_context,
                    task_function=self.task_function,
                    config=sweep_config,
                    job_dir_key=job_dir_key,
                    job_subdir_key="hydra.sweep.subdir",
                )
            except KeyboardInterrupt:
                interruptions.requeue_if_due()  # USR2: checkpointed, requeued; exits
                raise


def slurm_init_params(params: dict[str, Any]) -> dict[str, Any]:
    return {
        "folder": params["submitit_folder"],
        "slurm_max_num_timeout": params["max_num_timeout"],
    }


def slurm_parameters(params: dict[str, Any], nproc_per_node: int) -> dict[str, Any]:
    """The launcher config as submitit's AutoExecutor parameters, mapped as the plugin maps them: the shared
    keys as they are (timeout_min, gpus_per_node, ...), SLURM's own prefixed (slurm_partition, ...).
    ``gpus_per_node: null`` is the job's ``launcher.nproc_per_node``."""
    params = {
        **params,
        "gpus_per_node": nproc_per_node
        if params["gpus_per_node"] is None
        else params["gpus_per_node"],
    }
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    return {
        k if k in shared else f"slurm_{k}": v
        for k, v in params.items()
        if k not in ("submitit_folder", "max_num_timeout")
    }
