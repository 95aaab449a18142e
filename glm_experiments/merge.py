"""Write a finished run as one standalone checkpoint: ``AutoModelForCausalLM.from_pretrained(out)`` loads it.

    python -m glm_experiments.merge --run outputs/2025-01-01/12-00-00_lora_chatglm3 --out merged/
    python -m glm_experiments.merge --run 3f2a...c9 --tracking-uri sqlite:///mlflow.db --out merged/

What each method allows:

* lora / qlora: the adapter is folded into the base weights (W + B·A·alpha/r) and the plain model is
  written (safetensors + config + tokenizer). qlora merges into the un-quantised base in the run's
  compute dtype (folding into 4-bit weights would lose the adapter in rounding).
* full: the run saved a complete model already; it is copied (with the tokenizer).
* freeze: the base with the trained tensors substituted is written; it is an ordinary checkpoint.
* ptuning / prompt_tuning: not possible. Their learned prefix key/values (P-Tuning v2) or soft prompt
  vectors are extra inputs the model attends to, not a change to any weight matrix, so no plain
  checkpoint computes the same function. Use the run as base + adapter (predict, chat,
  ``glm_experiments.methods.load_saved``).

Beside the weights, ``glm_experiments_merge.json`` records the run, method and base model.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from glm_experiments.errors import cli_main
from glm_experiments.inference.merging import merge_run
from glm_experiments.inference.run_loading import add_run_arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m glm_experiments.merge", description=__doc__.split("\n\n")[0])
    add_run_arguments(p)
    p.add_argument("--out", required=True, help="output directory for the standalone checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--max-shard-size", default="5GB", help="save_pretrained shard size (default 5GB)")
    return p.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    info = merge_run(args.run, Path(args.out), args.tracking_uri, args.overwrite, args.max_shard_size)
    print(f"method={info['method']}: {info['how']} -> {info['out']}")
    note = ""
    if info["base_model"]["family"] == "chatglm":
        note = " (ChatGLM-6B v1: `import glm_experiments.models.chatglm.modeling` first, it registers the model class)"
    print(f"load it with AutoModelForCausalLM.from_pretrained({info['out']!r}) and AutoTokenizer.from_pretrained(...){note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
