"""A finished run written as one standalone checkpoint (base + adapter merged), with a provenance file."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from glm_experiments.errors import UserError
from glm_experiments.methods import get_method


log = logging.getLogger("glm_experiments.merge")

PROVENANCE_FILE = "glm_experiments_merge.json"


def merge_run(run: str, out: Path, tracking_uri: str | None = None, overwrite: bool = False,
              max_shard_size: str = "5GB") -> dict:
    """Write the standalone checkpoint of ``run`` into ``out``; returns what was done.

    ``out`` is checked before anything is read or created (outputs.check_out: never the run, inside it or
    above it; ``overwrite`` replaces only an earlier merge output) and written atomically: a failure leaves
    the old ``out``, or none."""
    from glm_experiments.inference.run_loading import check_adapter, find_run_dir, load_run_config, saved_method
    from glm_experiments.recipe.outputs import atomic_output_dir, check_out, parse_size

    max_shard_size = parse_size(max_shard_size, "--max-shard-size")
    run_dir = find_run_dir(run, tracking_uri)
    out = check_out(Path(out), "merge", [("the run", run_dir)], overwrite)
    cfg = load_run_config(run_dir)
    adapter = check_adapter(run_dir)
    method = saved_method(run_dir)
    record = get_method(method)
    if record.merge_into_base is None:
        raise UserError(f"method={method} cannot be merged into plain weights: {record.not_mergeable_because}. "
                        f"Use the run as base + adapter instead (predict / chat / methods.load_saved on {adapter})")
    info = {"run_dir": str(run_dir), "method": method,
            "base_model": {"name": cfg.model.name, "family": cfg.model.family, "path": cfg.model.path},
            "out": str(out)}
    with atomic_output_dir(out, "merge", {"run_dir": str(run_dir)}) as tmp:
        if record.saves_whole_model:  # the adapter directory already is the merged model
            info["how"] = "copied the full fine-tuned model"
            for item in adapter.iterdir():
                target = tmp / item.name
                shutil.copytree(item, target) if item.is_dir() else shutil.copy2(item, target)
        else:
            model, tokenizer = _merged_model(run_dir, cfg, method)
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
            tokenizer.save_pretrained(tmp)
            info["how"] = f"merged the {method} adapter into the un-quantised base weights"
        (tmp / PROVENANCE_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return info


def _merged_model(run_dir: Path, cfg, method: str):
    from glm_experiments.inference.run_loading import load_base, load_checked_adapter

    # never quantised: qlora's adapter is folded into full-precision weights
    model, tokenizer, _ = load_base(cfg, None)
    record = get_method(method)
    model = load_checked_adapter(record.load, model, run_dir, cfg, method)
    model = record.merge(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model, tokenizer
