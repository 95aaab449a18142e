"""Convert a THUDM-layout ChatGLM checkpoint into transformers' own format.

    python -m glm_experiments.convert --family chatglm3 --src /data/chatglm3-6b --dst /data/chatglm3-6b-hf

The output (sharded safetensors, config, generation config, tokenizer.json) loads with
``AutoModelForCausalLM.from_pretrained(dst)`` / ``AutoTokenizer.from_pretrained(dst)`` and no remote code.
ChatGLM-6B (family chatglm) converts into ``model_type="chatglm_v1"``, which the Auto classes know once
``glm_experiments.models.chatglm.modeling`` is imported.

With ``--adapter DIR`` (a LoRA or P-Tuning v2 trained with THUDM's scripts: PEFT ``adapter_config.json`` +
``adapter_model.safetensors|bin``, or ptuning/main.py's ``config.json`` + ``pytorch_model.bin``), ``DST/adapter/``
is written too: a LoRA in current PEFT format (``PeftModel.from_pretrained(model, DST/adapter)``) or this
project's ptuning adapter, computing what the original did (see ``glm_experiments.migration.thudm_adapters``).
"""

from __future__ import annotations

import argparse
import sys

from glm_experiments.constants import TORCH_DTYPES
from glm_experiments.errors import UserError, cli_main

DTYPES = {"auto": None, **TORCH_DTYPES}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m glm_experiments.convert", description=__doc__.split("\n\n")[0])
    from glm_experiments.models.family import family_names, get_family

    thudm_families = [name for name in family_names() if get_family(name).layout is not None]
    parser.add_argument("--family", required=True, choices=thudm_families)
    parser.add_argument("--src", required=True, help="THUDM checkpoint directory (config.json model_type chatglm)")
    parser.add_argument("--dst", required=True, help="output directory (created; must be empty if it exists)")
    parser.add_argument("--shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MB (default 2GB)")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help="default: the checkpoint's torch_dtype")
    parser.add_argument("--adapter", default=None,
                        help="a LoRA / P-Tuning v2 directory trained on the THUDM model: also write DST/adapter/")
    return parser.parse_args(argv)


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    import shutil
    import tempfile
    from pathlib import Path

    from glm_experiments.models.thudm import (
        CheckpointError,
        check_family,
        checkpoint_kind,
        convert_checkpoint,
        read_config,
    )

    dst = Path(args.dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"--dst {dst} exists and is not an empty directory")
    tmp = None
    try:
        if args.adapter:  # first, so that an adapter that cannot be mapped fails before the base is written
            from glm_experiments.migration.thudm_adapters import convert_adapter

            src = Path(args.src).expanduser()
            if checkpoint_kind(src) == "native":
                raise CheckpointError(f"{src / 'config.json'}: already in transformers' format; nothing to convert")
            cfg = read_config(src)
            check_family(src, cfg, args.family)
            tmp = Path(tempfile.mkdtemp(prefix="adapter-"))
            _, method = convert_adapter(args.adapter, tmp / "adapter", cfg, args.family, base_model_name_or_path=str(dst.resolve()))
        convert_checkpoint(args.src, dst, args.family, max_shard_size=args.shard_size, dtype=DTYPES[args.dtype])
        if tmp is not None:
            shutil.move(str(tmp / "adapter"), str(dst / "adapter"))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"converted {args.src} ({args.family}) -> {dst}")
    if args.adapter:
        print(f"converted adapter {args.adapter} ({method}) -> {dst / 'adapter'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
