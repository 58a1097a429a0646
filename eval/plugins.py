"""Registries filled by importing every module of a package (one file per embedder or metric)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable

_loaded: set[str] = set()


def load_package_modules(package: str, path: Iterable[str], skip: tuple[str, ...] = ("base",)) -> None:
    """Import each module of `package` once (their `@register` decorators fill its registry)."""
    if package in _loaded:
        return
    for mod in pkgutil.iter_modules(list(path)):
        if mod.name not in skip:
            importlib.import_module(f"{package}.{mod.name}")
    _loaded.add(package)
