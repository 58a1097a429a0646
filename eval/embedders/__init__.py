"""Audio embedders for the evaluation metrics, one file each (like fadtk's model_loader).

    emb = get_embedder("clap", ckpt="laion/larger_clap_music")
    ok, why = emb.available()
    frames = emb.embed(wav)          # wav [C, N] at emb.sample_rate -> [frames, D]

Every module of this package is imported on first use; a module registers its class
with `@register("name")` (eval.embedders.base), so adding an embedder touches one file.
"""

from __future__ import annotations

from eval.embedders.base import REGISTRY, Embedder, register
from eval.plugins import load_package_modules

__all__ = ["Embedder", "get_embedder", "list_embedders", "register"]


def _load_all() -> None:
    load_package_modules(__name__, __path__)


def list_embedders() -> list[str]:
    """Names of the registered embedders, sorted."""
    _load_all()
    return sorted(REGISTRY)


def get_embedder(name: str, **kw) -> Embedder:
    """Build a registered embedder with its settings (`ckpt=`, `revision=`, windows...)."""
    _load_all()
    if name not in REGISTRY:
        raise ValueError(f"unknown embedder {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**kw)
