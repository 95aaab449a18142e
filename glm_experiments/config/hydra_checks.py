"""Mistakes Hydra would report with a traceback or a screenful, turned into one ``error:`` line and exit code 2.

* an output directory that cannot be created (a Hydra callback): Hydra creates ``hydra.run.dir``
  (``hydra.sweep.dir``) itself, before the task function runs, so a path under a file or in a read-only place
  would end in Hydra's traceback; checked here, before it tries;
* an optimising sweeper's ``optimize_metric`` that its trials do not compute (a Hydra callback, before the first
  trial trains);
* a group option that does not exist (``method=lorra``): Hydra lists every option of the group, the schema
  nodes ``base_*`` that are no options among them; checked on the command line before Hydra starts;
* every other error Hydra raises while composing (:func:`composition_error`): a value of the wrong type
  (``train.max_steps=abc``), an unknown key (``train.max_stepz=3``), malformed override or sweep syntax
  (``train.max_steps==3``, ``choice()``), a sweeper plugin that is not installed (``hparams_search=optuna``), an
  interpolation to nothing (``${oops}``): ``<override>: <reason>``, reported by :func:`report_hydra_errors_in_one_line`
  on the command line and raised as a :class:`CompositionError` by ``compose()``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from glm_experiments.errors import EXIT_BAD_INPUT, UserError, as_user_error, one_line

# the pip extra that brings a Hydra plugin (hydra/<group>/<name> not found); pyproject.toml's optional dependencies
PLUGIN_EXTRAS = {"hydra/sweeper/optuna": "optuna", "hydra/sweeper/sampler/tpe": "optuna"}
OVERRIDE_GRAMMAR = "https://hydra.cc/docs/1.3/advanced/override_grammar/basic/"


def check_creatable(setting: str, directory: str | os.PathLike) -> None:
    """``directory`` exists as a writable directory or can be created (its nearest existing ancestor is one)."""
    path = Path(directory).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{setting}={directory}: cannot be created, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{setting}={directory}: {existing} is not writable")


# Hydra's sweep syntax (choice(...), range(...), glob(...), interval(...)): left to Hydra
_SWEEP_FUNCTION = re.compile(r"^\w+\(.*\)$")


def check_group_choices(argv: list[str], conf_dir: Path) -> None:
    """Every ``group=option[,option...]`` of the command line names an option file ``conf/<group>/<option>.yaml``.
    Hydra's own groups (``hydra/...``) and its sweep functions are left to Hydra."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~").split("@", 1)[0]
        if group.startswith("hydra") or not value or _SWEEP_FUNCTION.match(value):
            continue
        options_dir = conf_dir / group
        if "." in group or not options_dir.is_dir():
            continue
        # options in sub-folders are named by their path: experiment=reproduce/chatglm6b_ptuning_v2
        options = sorted(p.relative_to(options_dir).with_suffix("").as_posix() for p in options_dir.rglob("*.yaml"))
        for option in value.split(","):
            if option not in options and option != "null":
                raise UserError(f"{group}={option}: no such option (conf/{group}/ has {', '.join(options)})")


def _exit_on_user_error(check, *args: Any) -> None:
    """``check(*args)``, its UserError as the CLI reports one: one line, exit 2 (Hydra would print a traceback for
    an exception raised by a callback; SystemExit passes through)."""
    try:
        check(*args)
    except UserError as exc:
        print(one_line(exc), file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


def exit_on_unknown_group_options(argv: list[str], conf_dir: Path) -> None:
    """:func:`check_group_choices`, as the CLI reports it: one line, exit 2."""
    _exit_on_user_error(check_group_choices, argv, conf_dir)


class OutputDirCheck(Callback):
    def _check(self, setting: str, directory: Any) -> None:
        _exit_on_user_error(check_creatable, setting, str(directory))

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check("hydra.sweep.dir", config.hydra.sweep.dir)


def check_objective(config: DictConfig) -> None:
    """A sweeper that optimises (one with a ``direction``: hparams_search=optuna) is handed ``optimize_metric`` of
    each trial: a metric the jobs do not compute would give it None after the first trial's training."""
    from omegaconf import OmegaConf

    if OmegaConf.select(config, "hydra.sweeper.direction") is None:
        return
    metric, data = config.optimize_metric, config.data
    computed = list(data.metrics) if data.dev_file else []
    if metric not in computed:
        have = (f"with data={data.name} they compute {', '.join(computed)}" if computed else
                "data.dev_file is null: they compute no metric")
        raise UserError(f"optimize_metric={metric}: the search's trials do not compute it ({have}); "
                        "the sweeper would get None")


class ObjectiveCheck(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_on_user_error(check_objective, config)


# ------------------------------------------------------------------------- composition errors
class CompositionError(UserError):
    """A command line that Hydra cannot compose, as one line: ``<override>: <reason>`` (``__cause__``: Hydra's)."""


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~").split("@", 1)[0]


def _override_for(key: str, overrides: list[str]) -> str:
    """The command-line override that sets ``key`` (the last one, as Hydra applies them), else ``key``."""
    matches = [o for o in overrides if _key(o) == key]
    return matches[-1] if matches else key


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].strip()


def _unparsable(overrides: list[str]) -> tuple[str, str] | None:
    """(the first override Hydra's grammar rejects, why) -- Hydra's message does not always name it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException as exc:
            return override, _parse_reason(exc)
    return None


def _parse_reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines()
             if line.strip() and not line.startswith(("Error parsing override", "See https://"))]
    reason = "; ".join(lines) or "malformed"
    reason = re.sub(r" expecting \{.*?\}", "", reason)  # the grammar's token names help nobody
    return f"{reason} (override syntax: {OVERRIDE_GRAMMAR})"


def _unknown_key(key: str, value_override: str, parent_type: Any) -> str:
    """``train.max_stepz=3: no such setting (did you mean train.max_steps?)`` for a schema node; for a free
    dict (deepspeed.config), Hydra's hint: add the key with ``+``."""
    prefix, _, name = key.rpartition(".")
    if isinstance(parent_type, type) and dataclasses.is_dataclass(parent_type):
        fields = [f.name for f in dataclasses.fields(parent_type)]
        close = difflib.get_close_matches(name, fields, n=1)
        hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else \
            f"{prefix or 'the config'} has {', '.join(fields)}"
        return f"{value_override}: no such setting ({hint})"
    return f"{value_override}: no such key (to add one: +{value_override.lstrip('+')})"


def composition_error(exc: BaseException, overrides: list[str]) -> UserError | None:
    """Hydra's (or OmegaConf's) error while composing ``overrides``, as one line; None for anything else."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException

    overrides = [o for o in overrides if not o.startswith("-")]
    text = str(exc)
    if isinstance(exc, OverrideParseException):
        found = _unparsable(overrides)
        if found is None:  # not one of ours (a sweeper's parameter): Hydra's words
            return CompositionError(_parse_reason(exc))
        return CompositionError(f"{found[0]}: {found[1]}")
    if isinstance(exc, MissingConfigException):
        match = re.search(r"Could not find '([^']+)'", text)
        if match is None:
            return CompositionError(_first_line(exc))
        missing = match.group(1)
        group, _, option = missing.rpartition("/")
        if missing in PLUGIN_EXTRAS or group.startswith("hydra/"):
            extra = PLUGIN_EXTRAS.get(missing)
            asked = next((o for o in overrides if option in o.partition("=")[2].split(",")), f"{group}={option}")
            install = f'pip install -e ".[{extra}]"' if extra else f"install the Hydra plugin that provides {missing}"
            return CompositionError(f"{asked}: needs {missing}, a Hydra plugin that is not installed ({install})")
        options = [o for o in (getattr(exc, "options", None) or []) if not o.startswith("base_")]
        listed = f" (conf/{group}/ has {', '.join(options)})" if options else ""
        return CompositionError(f"{_override_for(group, overrides) if group else missing}: no such option{listed}")
    if isinstance(exc, ConfigCompositionException):
        cause = exc.__cause__
        unknown = re.match(r"Could not override '([^']+)'", text)
        if unknown and isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
            key = unknown.group(1)
            return CompositionError(_unknown_key(key, _override_for(key, overrides), cause.object_type))
        merging = re.match(r"Error merging override (.+)", text)
        if merging and cause is not None:
            return CompositionError(f"{merging.group(1)}: {_first_line(cause)}")
        present = re.search(r"An item is already at '(.+)'", text)
        if present:  # +key=value for a key the config has: Hydra's hint, as one line
            override = _override_for(present.group(1), overrides)
            return CompositionError(f"{override}: {present.group(1)} is already set (override it without +: "
                                    f"{override.lstrip('+')})")
        ambiguous = re.match(r"Ambiguous value for argument '(.+)'", text)
        if ambiguous:
            return CompositionError(f"{ambiguous.group(1)}: a list is written [a,b], a string with commas quoted "
                                    "('a,b'), and a sweep needs --multirun")
        return CompositionError(_first_line(exc) + (f": {_first_line(cause)}" if cause is not None else ""))
    if isinstance(exc, AssertionError) and "Unexpected type for root" in text:  # OmegaConf.update under a null
        line = _override_being_applied(exc)
        if line is not None:
            parent = _key(line).rpartition(".")[0]
            return CompositionError(f"{line}: {parent} is null in this config, so it has no keys to set; give "
                                    f"{parent} a value (or choose a config group option that has one)")
    if isinstance(exc, InterpolationResolutionError) or (isinstance(exc, OmegaConfBaseException) and exc.full_key):
        key = exc.full_key or ""
        where = _override_for(key, overrides) if key else ""
        reason = _first_line(exc)
        return CompositionError(f"{where}: {reason[:1].lower()}{reason[1:]}" if where else reason)
    return None


def _override_being_applied(exc: BaseException) -> str | None:
    """The override Hydra was applying when ``exc`` was raised (its ``_apply_overrides_to_config`` frame holds it):
    OmegaConf's assertion does not name the key."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_apply_overrides_to_config" and "override" in tb.tb_frame.f_locals:
            return str(tb.tb_frame.f_locals["override"].input_line)
        tb = tb.tb_next
    return None


def report_hydra_errors_in_one_line(overrides: list[str]) -> None:
    """Hydra reports what goes wrong in its run (composing the config, a sweep's failed job) with its own
    screenful and exit code 1 (``hydra._internal.utils.run_and_report``, which every Hydra entry step passes
    through): that function is wrapped so that a composition error and a user error become one ``error:`` line
    and exit code 2, like every other bad input. A bug keeps Hydra's report (the traceback); ``--debug``
    (HYDRA_FULL_ERROR=1) leaves Hydra alone."""
    import hydra._internal.utils as hydra_utils

    original = hydra_utils.run_and_report
    if getattr(original, "one_line", False):
        return

    def run_and_report(func):
        try:
            return func()
        except Exception as exc:  # noqa: BLE001 - sorted into user errors (one line) and bugs (Hydra's report)
            error = composition_error(exc, overrides) or as_user_error(exc)
            if error is None:
                return original(functools.partial(_reraise, exc))
            print(one_line(error), file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)

    run_and_report.one_line = True
    hydra_utils.run_and_report = run_and_report


def _reraise(exc: BaseException):
    raise exc
