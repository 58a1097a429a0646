"""The model factory: a run config (+ the data's codec shape) -> the model one run trains."""

from __future__ import annotations

from typing import Any

from backbones.base import build_backbone, get_backbone_cls, size_to
from ttm.config import RunConfig
from ttm.diffusion import build_latent_diffusion
from ttm.lm import TTMLM, lm_extra_params
from ttm.patterns import Pattern
from ttm.prepare import Prepared


def backbone_kwargs(cfg: RunConfig, n_out: int, cardinality: int, text_dim: int) -> dict[str, Any]:
    """Backbone constructor kwargs; with `model.target_params`, sized so that the whole LM
    (backbone + embeddings + heads + text projection) matches the target."""
    m = cfg.model
    kw = dict(
        d_model=m.d_model,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        cross_attention=m.conditioning == "cross",
        dropout=m.dropout,
        **m.backbone_kwargs,
    )
    if m.target_params:
        get_backbone_cls(m.backbone)  # clear error for unknown names
        kw.pop(m.size_by)
        try:
            res = size_to(
                m.backbone,
                m.target_params,
                vary=m.size_by,
                extra_params=lambda k: lm_extra_params(n_out, cardinality, text_dim, k["d_model"]),
                **kw,
            )
        except ValueError as e:
            raise ValueError(f"model.target_params: {e}") from None
        kw = res.kwargs
    return kw


def build_model(cfg: RunConfig, n_codebooks: int, cardinality: int, text_dim: int, data: Prepared | None = None):
    """model.kind "lm": the TTMLM; "diffusion" (stage 2 of a two-stage model): the LatentDiffusion,
    which needs `data` (its codec, and the train split for the latent statistics)."""
    kind = cfg.model.kind
    if kind == "two_stage":
        raise ValueError("model.kind=two_stage trains two models: use ttm.two_stage.run_two_stage "
                         "(ttm-bench train and ttm.runs.train dispatch to it)")
    if kind == "diffusion":
        if data is None:
            raise ValueError("building a stage-2 (diffusion) model needs the prepared data (codec, train split)")
        return build_latent_diffusion(cfg, data.codec, text_dim, data.splits["train"])
    pattern = Pattern(cfg.model.pattern, n_codebooks, cardinality, k=cfg.model.first_k)
    kw = backbone_kwargs(cfg, pattern.n_out, cardinality, text_dim)
    bb = build_backbone(cfg.model.backbone, **kw)
    return TTMLM(
        bb,
        pattern,
        text_dim,
        conditioning=cfg.model.conditioning,
        positions=cfg.model.positions,
        caption_dropout=cfg.model.caption_dropout,
        label_smoothing=cfg.model.label_smoothing,
    )
