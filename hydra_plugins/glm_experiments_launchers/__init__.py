"""This project's launchers as Hydra plugins: Hydra instantiates a launcher only from the ``hydra_plugins``
namespace package, which it scans at start-up. The logic is in glm_experiments/scale/submitit_pool.py."""
