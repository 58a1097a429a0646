"""The study's full-scale configurations (ablations/paper.yaml), instantiated on the meta device (no memory)."""

from pathlib import Path

import pytest
import torch

from ablations.spec import expand, load_spec
from backbones.base import build_backbone, count_params
from ttm.config import RunConfig, config_from_dict
from ttm.diffusion import DiffusionParts, denoiser_kwargs
from ttm.factory import backbone_kwargs
from ttm.lm import lm_extra_params
from ttm.patterns import Pattern
from ttm.two_stage import stage_configs

ROOT = Path(__file__).resolve().parents[1]
SPEC = load_spec(ROOT / "ablations" / "paper.yaml")
DAC_K, DAC_CARD, DAC_LATENT, T5_DIM = 9, 1024, 1024, 768  # DAC 44.1 kHz, FLAN-T5-base

# arm -> (layers, MLP ratio, params with one codebook (stage 1), with 9 codebooks (delay))
STUDY = {
    "prefix-simba": (24, 2.0, 281.0e6, 297.8e6),  # the paper: ~281M
    "cross-transformer": (24, 2.0, 305.0e6, 321.8e6),  # the paper: ~305M
    "prefix-mamba": (38, None, 283.8e6, 300.5e6),  # layers matched to prefix-simba
    "cross-simba": (18, 2.0, 287.0e6, 303.8e6),  # the nearest layer count to prefix-simba
}


def lm_on_meta(cfg: RunConfig):
    pattern = Pattern(cfg.model.pattern, DAC_K, DAC_CARD, k=cfg.model.first_k)
    kw = backbone_kwargs(cfg, pattern.n_out, DAC_CARD, T5_DIM)
    with torch.device("meta"):
        bb = build_backbone(cfg.model.backbone, **kw)
    return bb, count_params(bb) + lm_extra_params(pattern.n_out, DAC_CARD, T5_DIM, kw["d_model"])


@pytest.mark.parametrize("cell", expand(SPEC), ids=lambda c: c.name)
def test_single_stage_arms_as_the_study_builds_them(cell):
    cfg = config_from_dict(cell.config, "paper.yaml")
    layers, ratio, _, params9 = STUDY[cell.axes["arch"]]
    bb, total = lm_on_meta(cfg)
    assert bb.d_model == 1024 and bb.n_layers == layers and bb.mlp_ratio == ratio
    if ratio is not None:  # d -> 2d -> d
        assert bb.blocks[0].channel.fc1.out_features == 2048
    assert abs(total / params9 - 1) < 0.001
    # positions: the study's sinusoid (SSMs included), dropout 0.3
    assert cfg.model.positions == "study" and cfg.model.dropout == 0.3


@pytest.mark.parametrize("cell", expand(SPEC, "two_stage"), ids=lambda c: c.name)
def test_two_stage_stage1_is_the_full_size_model(cell):
    cfg = config_from_dict(cell.config, "paper.yaml")
    s1, s2 = stage_configs(cfg)
    layers, ratio, params1, _ = STUDY[cell.axes["arch"]]
    bb, total = lm_on_meta(s1)
    assert bb.n_layers == layers and bb.mlp_ratio == ratio
    assert abs(total / params1 - 1) < 0.001
    if cell.axes["arch"] in ("prefix-simba", "cross-transformer"):  # the paper's ~281M / ~305M within 1%
        assert abs(total / {"prefix-simba": 281e6, "cross-transformer": 305e6}[cell.axes["arch"]] - 1) < 0.01
    assert s1.train.budget.limit == 100_000  # the study's 100k steps for stage 1
    kw = denoiser_kwargs(s2, DAC_LATENT, DAC_CARD, T5_DIM)  # stage 2: ~150M, sized on the meta device
    with torch.device("meta"):
        one = count_params(build_backbone(s2.model.diffusion.denoiser, **kw))
        extra = count_params(DiffusionParts(DAC_LATENT, T5_DIM, kw["d_model"], 1, DAC_CARD))
    assert abs((2 * one + extra) / 150e6 - 1) < 0.01


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
