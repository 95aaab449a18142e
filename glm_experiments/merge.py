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
import json
import logging
import shutil
import sys
from pathlib import Path

from glm_experiments.errors import UserError, cli_main
from glm_experiments.methods import get_method
from glm_experiments.inference.run_loading import add_run_arguments

log = logging.getLogger("glm_experiments.merge")

PROVENANCE_FILE = "glm_experiments_merge.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m glm_experiments.merge", description=__doc__.split("\n\n")[0])
    add_run_arguments(p)
    p.add_argument("--out", required=True, help="output directory for the standalone checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--max-shard-size", default="5GB", help="save_pretrained shard size (default 5GB)")
    return p.parse_args(argv)


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out} is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def merge_run(run: str, out: Path, tracking_uri: str | None = None, overwrite: bool = False,
              max_shard_size: str = "5GB") -> dict:
    """Write the standalone checkpoint of ``run`` into ``out``; returns what was done."""
    from glm_experiments.inference.run_loading import check_adapter, find_run_dir, load_run_config, saved_method

    run_dir = find_run_dir(run, tracking_uri)
    cfg = load_run_config(run_dir)
    adapter = check_adapter(run_dir)
    method = saved_method(run_dir)
    record = get_method(method)
    if record.merge_into_base is None:
        raise UserError(f"method={method} cannot be merged into plain weights: {record.not_mergeable_because}. "
                        f"Use the run as base + adapter instead (predict / chat / methods.load_saved on {adapter})")
    out = Path(out)
    _prepare_out(out, overwrite)

    if record.saves_whole_model:  # the adapter directory already is the merged model
        how = "copied the full fine-tuned model"
        for item in adapter.iterdir():
            target = out / item.name
            shutil.copytree(item, target) if item.is_dir() else shutil.copy2(item, target)
    else:
        model, tokenizer = _merged_model(run_dir, cfg, method)
        model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(out)
        how = f"merged the {method} adapter into the un-quantised base weights"
    info = {"run_dir": str(run_dir), "method": method, "how": how,
            "base_model": {"name": cfg.model.name, "family": cfg.model.family, "path": cfg.model.path},
            "out": str(out.resolve())}
    (out / PROVENANCE_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return info


def _merged_model(run_dir: Path, cfg, method: str):
    from glm_experiments.inference.run_loading import ADAPTER_DIR, load_base, method_settings

    # never quantised: qlora's adapter is folded into full-precision weights
    model, tokenizer, _ = load_base(cfg, None)
    record = get_method(method)
    try:
        model = record.load(model, run_dir / ADAPTER_DIR, method_settings(cfg, method))
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(f"cannot load the adapter of {run_dir}: {exc}") from None
    model = record.merge(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model, tokenizer


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    info = merge_run(args.run, Path(args.out), args.tracking_uri, args.overwrite, args.max_shard_size)
    print(f"method={info['method']}: {info['how']} -> {info['out']}")
    note = ""
    if info["base_model"]["family"] == "chatglm":
        note = " (ChatGLM-6B v1: `import glm_experiments.models.chatglm_v1` first, it registers the model class)"
    print(f"load it with AutoModelForCausalLM.from_pretrained({info['out']!r}) and AutoTokenizer.from_pretrained(...){note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
