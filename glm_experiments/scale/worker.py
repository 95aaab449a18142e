"""``python -m glm_experiments.scale.worker <resolved_config.yaml>``: one torchrun rank of a multi-process run.

Started by glm_experiments.scale.launcher (never by hand, never through Hydra). Reads the config the Hydra
process resolved, restores its schema types, joins the process group torchrun describes in the
environment (NCCL with GPUs, gloo on CPU) and calls ``train.run``. Rank 0 logs to MLflow and writes the
run products; a user error is written to ``worker_error.txt`` for the launcher to report in one line.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("glm_experiments")


def load_config(path: Path) -> DictConfig:
    """The resolved YAML merged back into the structured schema (so model.tiny etc. are typed as under Hydra)."""
    from glm_experiments.config.schema import Config
    from glm_experiments.methods import method_schema

    raw = OmegaConf.load(path)
    schema = OmegaConf.structured(Config)
    method = method_schema(raw.get("method", {}).get("name"))
    if method is not None:
        schema.method = OmegaConf.structured(method)
    OmegaConf.set_struct(schema, False)  # keys an experiment added with `+key=...` stay
    cfg = OmegaConf.merge(schema, raw)
    OmegaConf.set_struct(cfg, True)
    return cfg


def init_process_group() -> None:
    import torch
    import torch.distributed as dist

    # the Trainer's ddp_timeout default: rank 0 may generate alone (evaluation) while the others wait
    timeout = timedelta(seconds=1800)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)


def setup_logging(rank: int, run_dir: Path) -> None:
    fmt = f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] - %(message)s"
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=fmt, stream=sys.stderr)
    if rank == 0:
        handler = logging.FileHandler(run_dir / "worker.log")
        handler.setFormatter(logging.Formatter(fmt))
        logging.getLogger().addHandler(handler)
    if rank != 0:
        import transformers

        transformers.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m glm_experiments.scale.worker <resolved_config.yaml>  (started by torchrun)", file=sys.stderr)
        return 2
    from glm_experiments.scale.launcher import ERROR_FILE, check_deepspeed, deepspeed_dict

    cfg = load_config(Path(argv[0]))
    run_dir = Path(cfg.output_dir)
    rank = int(os.environ.get("RANK", 0))
    setup_logging(rank, run_dir)

    import torch.distributed as dist

    from glm_experiments.errors import EXIT_BAD_INPUT, as_user_error, debug_requested
    from glm_experiments.recipe.interrupts import exit_code, signal_name

    try:
        check_deepspeed(deepspeed_dict(cfg))
        init_process_group()
        from glm_experiments.recipe.train import run

        run(cfg)
    except Exception as exc:  # noqa: BLE001 - the same sorting as the Hydra process (glm_experiments.errors)
        error = as_user_error(exc)
        if error is None or debug_requested([]):
            raise
        log.error("%s", error)
        try:  # the first rank to fail tells the launcher why
            with open(run_dir / ERROR_FILE, "x") as f:
                f.write(f"{error}\n")
        except FileExistsError:
            pass
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:  # SIGTERM from torchrun's agent (train.run ended rank 0's run KILLED)
        log.warning("interrupted by %s", signal_name(exc))
        return exit_code(exc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
