"""The run config composed outside a Hydra run, for predict, the tests and the benchmarks.

``compose(["method=lora", "train.max_steps=3"])`` gives what ``python -m glm_experiments method=lora
train.max_steps=3`` composes: conf/train.yaml, the schema, the overrides. A mistyped key, a wrong type or
malformed override syntax raises here the ``CompositionError`` (a UserError) whose one line the command line
prints.
"""

from __future__ import annotations


def compose(overrides: list[str] | None = None, *, return_hydra_config: bool = False):
    """conf/train.yaml with ``overrides`` applied, typed by the schema (``return_hydra_config``: with the
    ``hydra`` node, e.g. the run and sweep dirs). Hydra's imports stay inside: importing this module is cheap.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import glm_experiments.config.schema  # noqa: F401  (registers the schema)
    from glm_experiments.methods import method_names

    method_names()  # each method module stores its schema (method/base_<name>) as it registers
    from glm_experiments.config.resolvers import CONF_DIR

    from glm_experiments.config.hydra_checks import composition_error

    overrides = list(overrides or [])
    GlobalHydra.instance().clear()  # a Hydra left initialised in this process would refuse a second init
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return hydra_compose("train", overrides=overrides, return_hydra_config=return_hydra_config)
        except Exception as exc:
            error = composition_error(exc, overrides)
            if error is None:
                raise
            raise error from exc
