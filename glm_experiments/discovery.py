"""Registries filled by importing a package's modules: each module registers its record (a method, a model family)
on import, so adding one is adding a module, and nobody keeps a list of names."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable


def import_modules(package: str, path: Iterable[str], skip: tuple[str, ...] = ("base",)) -> None:
    """Import every module of ``package`` (its ``__path__``) but ``skip``; a no-op for modules already imported."""
    for info in pkgutil.iter_modules(path):
        if info.name not in skip:
            importlib.import_module(f"{package}.{info.name}")
