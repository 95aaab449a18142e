"""``hydra/launcher=parallel`` and ``hydra/launcher=slurm`` (conf/hydra/launcher/): hydra-submitit-launcher's
launchers with glm_experiments.scale.submitit_pool's launch (slots, the fixed sweep dir, lost-job accounting) in front."""

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    LocalLauncher,
    SlurmLauncher,
)

from glm_experiments.scale.slurm_array import SlurmArray
from glm_experiments.scale.submitit_pool import ParallelPool


class ParallelLauncher(ParallelPool, LocalLauncher):
    pass


class SlurmSweepLauncher(SlurmArray, SlurmLauncher):
    pass
