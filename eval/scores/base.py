"""The metric contract and registry.

A metric is a class with
  name          set by `@register("name")`
  embedder      the registered embedder (eval/embedders) that computes its features, and
  embedder_kw   that embedder's settings; the runner computes and caches features per clip
  what          one line for `ttm-bench eval --list` and eval.json
  paired        True when it compares each generated clip with its reference clip (by ref_id)
  probe_head    for the embedded evaluator: the head whose quality floor must hold ("attributes"
                or "contrastive"); the runner refuses the metric when it does not
  compute(x)    -> {"value", "ci_low", "ci_high", "n", ...; "_per_clip": {column: [N]}}
  floors(x)     -> {"noise": {...} | None, "codec": {...} | None}: the same metric on the
                reference against itself (noise) and on the codec-resynthesised reference (codec)
`x` is an `Inputs`: the clips, their features, the pairing, the probe and the bootstrap settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from eval import metrics as M
from eval.clips import Clip
from eval.embedders.base import Embedder
from eval.probe import Probe

REGISTRY: dict[str, type[Metric]] = {}
Features = list[dict[str, np.ndarray]]


def register(name: str, order: int = 100) -> Callable[[type[Metric]], type[Metric]]:
    def deco(cls: type[Metric]) -> type[Metric]:
        cls.name, cls.order = name, order
        REGISTRY[name] = cls
        return cls

    return deco


@dataclass
class Inputs:
    gen: list[Clip]
    ref: list[Clip]
    gen_f: Features
    ref_f: Features
    codec_f: Features | None
    paired: list[int | None]  # per generated clip: index of its reference clip, or None
    embedder: Embedder
    n_boot: int = 1000
    seed: int = 0
    probe: Probe | None = None
    pca_source: Callable[[], tuple[Any, str]] | None = None
    memo: dict[str, Any] = field(default_factory=dict)  # shared between compute and floors


class Metric:
    name: ClassVar[str] = "?"
    order: ClassVar[int] = 100
    embedder: ClassVar[str] = "?"
    embedder_kw: ClassVar[dict[str, Any]] = {}
    what: ClassVar[str] = ""
    paired: ClassVar[bool] = False
    probe_head: ClassVar[str | None] = None

    def compute(self, x: Inputs) -> dict[str, Any]:
        raise NotImplementedError

    def floors(self, x: Inputs) -> dict[str, Any]:
        raise NotImplementedError


def ci(values: Any, n_boot: int, seed: int) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the mean of the finite values (None when there are none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return None, None
    return M.bootstrap_ci(v, n=n_boot, seed=seed)
