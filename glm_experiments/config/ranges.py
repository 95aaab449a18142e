"""The values a numeric setting allows, declared on its schema field (``ranged(default, min=..., ...)``) and
checked by schema.check_settings before anything loads (OmegaConf checks only types)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from glm_experiments.errors import UserError


# ------------------------------------------------------------------------- ranges
@dataclass(frozen=True)
class Range:
    """The values a numeric setting allows: checked by :func:`check_settings` before anything loads (OmegaConf
    checks only types). ``off`` is one extra value outside the range and what it means. NaN and +-inf are outside
    every range (``nan > 0`` is false, not an error); a float field without a declared range gets ``Range()``."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    off: tuple[float, str] | None = None

    def allows(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.off is not None and value == self.off[0]:
            return True
        if self.min is not None and (value <= self.min if self.min_open else value < self.min):
            return False
        return self.max is None or (value < self.max if self.max_open else value <= self.max)

    def describe(self, kind: type = int) -> str:
        """What ``allows`` accepts, for a field of type ``kind`` ("a finite number > 0" for a float)."""
        lo, hi = _number(self.min), _number(self.max)
        if self.min is not None and self.max is not None:
            text = f"in {'(' if self.min_open else '['}{lo}, {hi}{')' if self.max_open else ']'}"
        elif self.min is not None:
            text = f"{'>' if self.min_open else '>='} {lo}"
        elif self.max is not None:
            text = f"{'<' if self.max_open else '<='} {hi}"
        else:
            text = ""
        if kind is float:
            text = f"a finite number {text}".strip()
        return f"{_number(self.off[0])} ({self.off[1]}) or {text}" if self.off else text

    def error(self, key: str, value, kind: type = int) -> UserError | None:  # one line, None if allowed
        return None if self.allows(value) else UserError(f"{key}={value}: must be {self.describe(kind)}")


def _number(x) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else f"{x}"


def ranged(default, **rule) -> Any:
    """A schema field with its default and its allowed range (null stays allowed where the type is Optional)."""
    return field(default=default, metadata={"range": Range(**rule)})


def one_of(default, *choices) -> Any:
    return field(default=default, metadata={"choices": choices})


AT_LEAST_1 = {"min": 1}
POSITIVE = {"min": 0, "min_open": True}
PROBABILITY = {"min": 0, "max": 1, "max_open": True}  # a dropout rate
