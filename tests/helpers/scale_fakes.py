"""A parallel launcher whose jobs report the environment they got instead of training (tests/scale/test_scale.py).

In a module of its own, with light imports: each job's process unpickles the launcher and imports this module
(tests/ is put on its PYTHONPATH by the test).
"""

import os
import time

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher

from glm_experiments.scale.submitit_pool import ParallelPool


class EnvReportingLauncher(ParallelPool, LocalLauncher):
    """ParallelPool's scheduling (slots, CUDA_VISIBLE_DEVICES, threads, lost jobs) around a 2-second job."""

    def _job_args(self, num, overrides):
        return num, overrides

    def __call__(self, num, overrides):
        began = time.time()
        if "die" in overrides:
            os._exit(3)  # killed before it could hand back a result or record itself
        time.sleep(2)
        return {
            "num": num,
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "threads": os.environ.get("OMP_NUM_THREADS"),
            "began": began,
            "ended": time.time(),
        }
