"""Convert a THUDM-layout ChatGLM checkpoint into transformers' own format.

    python -m glm_experiments.convert --family chatglm3 --src /data/chatglm3-6b --dst /data/chatglm3-6b-hf

The output (sharded safetensors, config, generation config, tokenizer.json) loads with
``AutoModelForCausalLM.from_pretrained(dst)`` / ``AutoTokenizer.from_pretrained(dst)`` and no remote code.
ChatGLM-6B (family chatglm) converts into ``model_type="chatglm_v1"``, which the Auto classes know once
``glm_experiments.models.chatglm_v1`` is imported.
"""

from __future__ import annotations

import argparse
import sys

import torch

from glm_experiments.errors import UserError, cli_main

DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m glm_experiments.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", required=True, choices=["chatglm", "chatglm2", "chatglm3", "glm4"])
    parser.add_argument("--src", required=True, help="THUDM checkpoint directory (config.json model_type chatglm)")
    parser.add_argument("--dst", required=True, help="output directory (created; must be empty if it exists)")
    parser.add_argument("--shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MB (default 2GB)")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help="default: the checkpoint's torch_dtype")
    return parser.parse_args(argv)


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    from pathlib import Path

    from glm_experiments.models.thudm import convert_checkpoint

    dst = Path(args.dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"--dst {dst} exists and is not an empty directory")
    convert_checkpoint(args.src, dst, args.family, max_shard_size=args.shard_size, dtype=DTYPES[args.dtype])
    print(f"converted {args.src} ({args.family}) -> {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
