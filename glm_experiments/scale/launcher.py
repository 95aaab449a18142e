"""Multi-process training: the Hydra process composes once, torchrun workers train.

``launcher.nproc_per_node=N`` (and ``nnodes``, ``node_rank``, ``master_addr``, ``master_port``) or any
``deepspeed=`` option other than ``none`` makes ``python -m glm_experiments`` do this instead of training
in-process:

1. check the request (processes vs devices, the DeepSpeed JSON) and fail with one line if it cannot work;
2. write the resolved config (``${now:}``, ``${hydra:...}`` and every other interpolation already
   evaluated) to ``<job dir>/resolved_config.yaml``;
3. run ``python -m torch.distributed.run ... -m glm_experiments.scale.worker <job dir>/resolved_config.yaml``
   and wait; every worker reads that file and calls ``train.run`` (Hydra never runs per rank, so the
   ``--local_rank`` argument that the ``deepspeed`` launcher appends can never reach it);
4. read ``result.json`` (written by rank 0) back for the summary and for ``hparams_search``.

Under ``--multirun`` each job does the same, one distributed job after another.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from glm_experiments.errors import UserError
from glm_experiments.recipe.run_result import HYDRA_TAGS_ENV, RESULT_FILE, RunResult, hydra_tags
from glm_experiments.recipe.interrupts import on_sigterm

log = logging.getLogger(__name__)

RESOLVED_CONFIG = "resolved_config.yaml"
ERROR_FILE = "worker_error.txt"
# Hydra's tags/overrides for the MLflow run, handed to the workers (they have no HydraConfig)
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def needs_launch(cfg: DictConfig) -> bool:
    """True in the Hydra process when the run needs torchrun workers (never inside a worker)."""
    if "LOCAL_RANK" in os.environ:  # already a torchrun worker
        return False
    launcher = cfg.launcher
    return launcher.nproc_per_node != 1 or launcher.nnodes != 1 or bool(cfg.deepspeed.config)


# ----------------------------------------------------------------------------- checks
def check_launcher(launcher) -> None:
    n, nnodes, node_rank = launcher.nproc_per_node, launcher.nnodes, launcher.node_rank
    if n < 1 or nnodes < 1:
        raise UserError(f"launcher.nproc_per_node={n}, launcher.nnodes={nnodes}: both must be at least 1")
    if not 0 <= node_rank < nnodes:
        raise UserError(f"launcher.node_rank={node_rank}: expected 0..{nnodes - 1} for launcher.nnodes={nnodes}")
    if nnodes > 1 and launcher.master_addr in ("127.0.0.1", "localhost"):
        raise UserError(f"launcher.nnodes={nnodes} needs launcher.master_addr=<address of node 0 that every node "
                        f"can reach>, not {launcher.master_addr}")
    import torch

    if torch.cuda.is_available():
        devices = torch.cuda.device_count()
        if n > devices:
            raise UserError(f"launcher.nproc_per_node={n} but this machine has {devices} CUDA device(s) "
                            "(one process per GPU; check CUDA_VISIBLE_DEVICES)")
    else:
        cores = os.cpu_count() or 1
        if n > cores:
            raise UserError(f"launcher.nproc_per_node={n} but there is no CUDA device and only {cores} CPU core(s): "
                            "CPU (gloo) runs allow at most one process per core")


def check_deepspeed(ds: dict | None) -> None:
    """Refuse DeepSpeed settings that DeepSpeed would reject with a traceback or silently ignore."""
    if not ds:
        return
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise UserError(f"deepspeed.config.zero_optimization.stage={stage!r}: expected 0, 1, 2 or 3 "
                        "(it is not filled in from the training arguments)")
    for key, min_stage in (("offload_optimizer", 1), ("offload_param", 3)):
        offload = zero.get(key)
        if offload is None:
            continue
        device = offload.get("device", "none") if isinstance(offload, dict) else offload
        if device not in OFFLOAD_DEVICES:
            raise UserError(f"deepspeed.config.zero_optimization.{key}.device={device!r}: expected cpu, nvme or none "
                            "(transformers does not fill 'auto' here)")
        if device != "none" and stage < min_stage:
            raise UserError(f"deepspeed.config.zero_optimization.{key} needs ZeRO stage >= {min_stage}, got stage "
                            f"{stage}: DeepSpeed would silently not offload")
        if device == "nvme" and not (isinstance(offload, dict) and offload.get("nvme_path")):
            raise UserError(f"deepspeed.config.zero_optimization.{key}.device=nvme needs {key}.nvme_path")
    if stage == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        raise UserError("deepspeed.config.zero_optimization.stage3_gather_16bit_weights_on_model_save must be true "
                        "under ZeRO-3: otherwise checkpoints and the final save hold no loadable weights")


def deepspeed_dict(cfg: DictConfig) -> dict | None:
    return OmegaConf.to_container(cfg.deepspeed.config, resolve=True) if cfg.deepspeed.config else None


# ----------------------------------------------------------------------------- launch
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(launcher, config_path: Path) -> list[str]:
    port = launcher.master_port or (29500 if launcher.nnodes > 1 else free_port())
    if launcher.nnodes == 1:  # nothing outside this machine has to reach the rendezvous store
        runner, addr = "glm_experiments.scale.torchrun_loopback", "127.0.0.1"
    else:
        runner, addr = "torch.distributed.run", launcher.master_addr
    return [sys.executable, "-m", runner,
            f"--nproc_per_node={launcher.nproc_per_node}", f"--nnodes={launcher.nnodes}",
            f"--node_rank={launcher.node_rank}", f"--master_addr={addr}", f"--master_port={port}",
            "-m", "glm_experiments.scale.worker", str(config_path)]


def launch(cfg: DictConfig):
    """Start the torchrun workers for this (already composed) job, wait, return rank 0's RunResult."""

    check_launcher(cfg.launcher)
    check_deepspeed(deepspeed_dict(cfg))
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / RESOLVED_CONFIG
    OmegaConf.save(cfg, config_path, resolve=True)
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    (run_dir / RESULT_FILE).unlink(missing_ok=True)

    tags, overrides = hydra_tags()
    env = {**os.environ, HYDRA_TAGS_ENV: json.dumps({"tags": tags, "overrides": overrides})}
    command = torchrun_command(cfg.launcher, config_path)
    log.info("launching %d x %d worker(s): %s", cfg.launcher.nnodes, cfg.launcher.nproc_per_node, " ".join(command))
    proc = subprocess.Popen(command, env=env)
    terminated = []

    def pass_on(signum, frame):  # torchrun's agent passes it to the workers: rank 0's run ends KILLED
        terminated.append(signum)
        proc.send_signal(signum)

    with on_sigterm(pass_on):
        returncode = proc.wait()
    if terminated:
        raise KeyboardInterrupt("SIGTERM")
    if returncode != 0:
        error = run_dir / ERROR_FILE
        if error.is_file():
            raise UserError(error.read_text().strip())
        raise UserError(f"the training workers failed (torchrun exit code {returncode}); their output is above")

    if not (run_dir / RESULT_FILE).is_file():  # another node's rank 0 wrote the run products
        return RunResult(run_dir=run_dir, run_id=None)
    return RunResult.read(run_dir)
