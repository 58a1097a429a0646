"""The study's full-scale configurations, instantiated on the meta device (no memory)."""

from pathlib import Path

import pytest
import torch

from ablations.spec import expand, load_spec
from backbones.base import build_backbone, count_params
from ttm.config import config_from_dict
from ttm.factory import backbone_kwargs
from ttm.lm import lm_extra_params
from ttm.patterns import Pattern

ROOT = Path(__file__).resolve().parents[1]
DAC_K, DAC_CARD, T5_DIM = 9, 1024, 768  # DAC 44.1 kHz, FLAN-T5-base


@pytest.mark.parametrize("cell", expand(load_spec(ROOT / "ablations" / "paper.yaml")), ids=lambda c: c.name)
def test_paper_cells_match_their_parameter_target(cell):
    cfg = config_from_dict(cell.config, "paper.yaml")
    pattern = Pattern(cfg.model.pattern, DAC_K, DAC_CARD, k=cfg.model.first_k)
    kw = backbone_kwargs(cfg, pattern.n_out, DAC_CARD, T5_DIM)
    with torch.device("meta"):
        bb = build_backbone(cfg.model.backbone, **kw)
    total = count_params(bb) + lm_extra_params(pattern.n_out, DAC_CARD, T5_DIM, kw["d_model"])
    assert abs(total - cfg.model.target_params) / cfg.model.target_params < 0.01
    assert kw["d_model"] == 1024


def test_study_sizes_on_meta():
    """The study's two headline models as its code builds them (first codebook only, as stage 1):
    Prefix SiMBA (d 1024, 24 layers, d_state 512) ~281M, Cross Transformer (MLP d->2d->d) ~305M."""
    extra = lm_extra_params(1, DAC_CARD, T5_DIM, 1024)
    with torch.device("meta"):
        simba = build_backbone("simba", d_model=1024, n_layers=24, d_state=512, expand=2, headdim=64)
        tf = build_backbone("transformer", d_model=1024, n_layers=24, n_heads=16, cross_attention=True,
                            mlp_ratio=2.0)
    assert abs((count_params(simba) + extra) / 281e6 - 1) < 0.01
    assert abs((count_params(tf) + extra) / 305e6 - 1) < 0.01
