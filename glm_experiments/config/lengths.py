"""The ``lengths`` options (``conf/lengths/<name>.yaml``: a ``max_source_length`` / ``max_target_length`` pair) by
name, for ``eval.at_lengths``: the trained model is evaluated again at each named pair after training
(recipe/train.py), logged as ``eval/<name>/<metric>`` with a predictions table ``predictions/<name>/after.json``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from glm_experiments.config.resolvers import CONF_DIR
from glm_experiments.errors import UserError

KEYS = ("max_source_length", "max_target_length")


def lengths_options(conf_dir: Path = CONF_DIR) -> dict[str, dict[str, int]]:
    """``{option name: {"max_source_length": ..., "max_target_length": ...}}`` for every ``conf/lengths/*.yaml``."""
    options = {}
    for path in sorted((Path(conf_dir) / "lengths").glob("*.yaml")):
        node = OmegaConf.load(path)
        options[path.stem] = {key: int(node[key]) for key in KEYS if key in node}
    return options


def at_lengths(cfg, conf_dir: Path = CONF_DIR) -> dict[str, dict[str, int]]:
    """The options ``eval.at_lengths`` names, in its order (a name given twice counts once); one-line error for a
    name that is not an option."""
    names = list(cfg.eval.get("at_lengths") or [])
    if not names:
        return {}
    options = lengths_options(conf_dir)
    chosen = {}
    for name in names:
        name = str(name)
        if name not in options:
            raise UserError(f"eval.at_lengths: {name!r} is not a lengths option (conf/lengths/ has "
                            f"{', '.join(options) or 'none'})")
        if set(options[name]) != set(KEYS):
            raise UserError(f"eval.at_lengths: conf/lengths/{name}.yaml must set both {' and '.join(KEYS)}")
        chosen[name] = options[name]
    return chosen
