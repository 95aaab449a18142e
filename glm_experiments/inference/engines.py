"""The runs of the web page: each one found, checked and (once asked) loaded, one generation at a time."""

from __future__ import annotations

import argparse
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from glm_experiments.errors import UserError



# ------------------------------------------------------------------------------------------ the runs
@dataclass
class Engine:
    """One run on the page: its contestant record, its config and (once loaded) model; one generation at a time."""

    contestant: Any
    cfg: Any
    spec: Any  # the run directory, or the --adapter namespace for a foreign adapter
    loaded: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def label(self) -> str:
        return self.contestant.label


def display_label(run_dir: Path) -> str:
    """The run's display name (``src=1024 tgt=256 · full · tiny``, its MLflow run name, kept in result.json);
    the directory's name for a run written before there was one."""
    import json

    try:
        name = json.loads((Path(run_dir) / "result.json").read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    return str(name) if name else Path(run_dir).name


def find_engines(args: argparse.Namespace) -> list[Engine]:
    """Every run named on the command line, found and checked; nothing loaded yet."""
    from glm_experiments.study.human_eval import Contestant, run_store
    from glm_experiments.inference.run_loading import (
        RUN_ID_RE,
        check_adapter,
        find_run_dir,
        load_run_config,
    )

    engines, labels = [], set()

    def unique(label: str) -> str:
        base, n = label, 2
        while label in labels:
            label, n = f"{base} ({n})", n + 1
        labels.add(label)
        return label

    for run in args.run:
        run_dir = find_run_dir(run, args.tracking_uri)
        cfg = load_run_config(run_dir)
        check_adapter(run_dir)
        uri, run_id = run_store(run_dir, cfg)
        if RUN_ID_RE.match(str(run).strip()):  # named by its id: that store knows it
            from glm_experiments.inference.run_loading import _tracking_uri

            uri, run_id = _tracking_uri(args.tracking_uri), str(run).strip()
        if any(e.contestant.run_dir == str(run_dir) for e in engines):
            raise UserError(f"--run {run}: {run_dir} is given twice")
        contestant = Contestant(unique(display_label(run_dir)), str(run_dir), run_id, uri)
        engines.append(Engine(contestant, cfg, run_dir))
    if args.adapter:
        from glm_experiments.inference.prediction import _default_config

        cfg = _default_config(args)
        for adapter in args.adapter:
            path = Path(adapter).expanduser().resolve()
            if not path.is_dir():
                raise UserError(f"--adapter {adapter}: not a directory")
            name = f"{path.parent.name}/{path.name}" if path.name == "adapter" else path.name  # a run's adapter/
            spec = SimpleNamespace(
                adapter=str(path), family=args.family, model_path=args.model_path, device=args.device
            )
            engines.append(Engine(Contestant(unique(f"adapter:{name}"), str(path)), cfg, spec))
    return engines


def load_engines(engines: list[Engine], device: str | None, say=print) -> None:
    from glm_experiments.inference.prediction import _load_foreign
    from glm_experiments.inference.run_loading import load_run

    for i, engine in enumerate(engines, 1):
        say(f"loading {i}/{len(engines)}: {engine.label} ({engine.contestant.run_dir})")
        if isinstance(engine.spec, Path):
            engine.loaded = load_run(engine.spec, device=device)
        else:
            engine.loaded = _load_foreign(engine.cfg, engine.spec)
