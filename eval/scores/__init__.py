"""Evaluation metrics as small objects, one family per file (like eval/embedders and backbones/).

    m = get_metric("fd_probe")
    m.embedder, m.embedder_kw     # which embedder computes its features
    m.compute(inputs)             # {value, ci_low, ci_high, n, ...}
    m.floors(inputs)              # {"noise": ..., "codec": ...}

Every module of this package is imported on first use; a module registers its classes with
`@register("name")` (eval.scores.base), so adding a metric touches one file.
"""

from __future__ import annotations

import importlib
import pkgutil

from eval.scores.base import REGISTRY, Inputs, Metric, register

__all__ = ["Inputs", "Metric", "get_metric", "list_metrics", "register"]

_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")
    _loaded = True


def list_metrics() -> list[str]:
    """Names of the registered metrics, in registration order (offline defaults first)."""
    _load_all()
    return sorted(REGISTRY, key=lambda m: (REGISTRY[m].order, m))


def get_metric(name: str) -> Metric:
    _load_all()
    if name not in REGISTRY:
        raise ValueError(f"unknown metric {name!r}; expected some of {', '.join(list_metrics())}")
    return REGISTRY[name]()
