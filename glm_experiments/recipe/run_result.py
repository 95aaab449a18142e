"""What a run hands back (``RunResult``, also written as ``result.json``) and the Hydra tags it is logged with.

Shared by train.py (in-process runs, torchrun workers) and launcher.py (the process that started the
workers), so neither imports the other.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

RESULT_FILE = "result.json"
# the launcher hands the Hydra process's tags to its torchrun workers through this variable
HYDRA_TAGS_ENV = "GLM_EXPERIMENTS_HYDRA_TAGS"


@dataclass
class RunResult:
    run_dir: Path
    run_id: str | None
    name: str | None = None  # the display name (config/naming.py): MLflow's run name, the web page's label
    metrics_before: dict = field(default_factory=dict)
    metrics_after: dict = field(default_factory=dict)
    train_metrics: dict = field(default_factory=dict)
    trainable: dict = field(default_factory=dict)
    # the step of the saved adapter's weights, the last step, and (train.keep_best) the best's metric
    saved_step: dict = field(default_factory=dict)

    def write(self) -> Path:
        from glm_experiments.recipe.outputs import atomic_write_text

        path = Path(self.run_dir) / RESULT_FILE
        return atomic_write_text(path, json.dumps({"run_id": self.run_id, "name": self.name,
                                                   "metrics_before": self.metrics_before,
                                                   "metrics_after": self.metrics_after, "train": self.train_metrics,
                                                   "trainable": self.trainable, "saved_step": self.saved_step},
                                                  indent=2, default=float))

    @classmethod
    def read(cls, run_dir: Path) -> RunResult:
        from glm_experiments.errors import UserError

        path = Path(run_dir) / RESULT_FILE
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise UserError(f"{path}: not a valid result file ({exc})") from None
        return cls(run_dir=Path(run_dir), run_id=saved.get("run_id"), name=saved.get("name"),
                   metrics_before=saved.get("metrics_before", {}),
                   metrics_after=saved.get("metrics_after", {}), train_metrics=saved.get("train", {}),
                   trainable=saved.get("trainable", {}), saved_step=saved.get("saved_step", {}))


def hydra_tags() -> tuple[dict[str, str], list[str]]:
    """(tags, overrides) of the Hydra job this process runs, or that the launcher handed to this worker."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        saved = json.loads(os.environ.get(HYDRA_TAGS_ENV, '{"tags": {}, "overrides": []}'))
        return saved["tags"], saved["overrides"]
    hydra_cfg = HydraConfig.get()
    tags = {f"hydra.choices.{k}": str(v) for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra/")}
    overrides = list(hydra_cfg.overrides.task)
    tags["hydra.overrides"] = " ".join(overrides) or "(none)"
    tags["hydra.mode"] = str(hydra_cfg.mode)
    return tags, overrides
