"""Evaluation metrics as small objects, one family per file (like eval/embedders and backbones/).

    m = get_metric("fd_probe")
    m.embedder, m.embedder_kw     # which embedder computes its features
    m.compute(inputs)             # {value, ci_low, ci_high, n, ...}
    m.floors(inputs)              # {"noise": ..., "codec": ...}

Every module of this package is imported on first use; a module registers its classes with
`@register("name")` (eval.scores.base), so adding a metric touches one file.
"""

from __future__ import annotations

from eval.plugins import load_package_modules
from eval.scores.base import REGISTRY, Inputs, Metric, register

__all__ = ["Inputs", "Metric", "get_metric", "list_metrics", "register"]


def _load_all() -> None:
    load_package_modules(__name__, __path__)


def list_metrics() -> list[str]:
    """Names of the registered metrics, in registration order (offline defaults first)."""
    _load_all()
    return sorted(REGISTRY, key=lambda m: (REGISTRY[m].order, m))


def get_metric(name: str) -> Metric:
    _load_all()
    if name not in REGISTRY:
        raise ValueError(f"unknown metric {name!r}; expected some of {', '.join(list_metrics())}")
    return REGISTRY[name]()
