"""FLOP accounting against hand counts."""

import pytest
import torch

from backbones.base import build_backbone
from ttm.flops import count_train_step_flops
from ttm.lm import TTMLM
from ttm.patterns import Pattern

B, L, Dt, d, n, V, K, T = 2, 5, 12, 32, 2, 16, 3, 10


def tiny_lm(cond: str, backbone: str = "transformer", **kw) -> TTMLM:
    torch.manual_seed(0)
    bb = build_backbone(backbone, d_model=d, n_layers=n, cross_attention=cond == "cross", **kw)
    return TTMLM(bb, Pattern("delay", K, V), Dt, cond, caption_dropout=0.0)


def batch():
    return (torch.randint(0, V, (B, K, T)), torch.full((B,), T), torch.randn(B, L, Dt),
            torch.ones(B, L, dtype=torch.bool))


@pytest.mark.parametrize("cond", ["prefix", "cross"])
def test_transformer_train_step_flops_match_hand_count(cond):
    S = T + K - 1  # delay pattern
    P = S + (L + 1 if cond == "prefix" else 0)  # backbone positions (text + null token prefix)
    M = L + 1  # memory length
    text = 2 * B * L * Dt * d  # text projection; its input needs no gradient: backward = 1x
    per_layer = 2 * B * P * d * 3 * d + 2 * B * P * d * d + 2 * B * P * d * 4 * d * 2  # qkv, out, MLP
    attn = 4 * B * P * P * d  # QK^T and AV over the full (masked) square
    if cond == "cross":
        per_layer += 2 * B * P * d * d + 2 * B * M * d * 2 * d + 2 * B * P * d * d  # q, kv, out
        attn_x = 4 * B * P * M * d
    else:
        attn_x = 0
    heads = K * 2 * B * S * d * V
    linear = n * per_layer + heads
    attention = n * (attn + attn_x)
    expected = 3 * linear + 2 * text + 3.5 * attention  # SDPA backward = 2.5x its forward
    got = count_train_step_flops(tiny_lm(cond), *batch())
    assert got["scan"] == 0
    assert got["counted"] == expected


def test_counting_leaves_rng_and_grads_untouched():
    lm, b = tiny_lm("prefix"), batch()
    lm.train()  # dropout and caption dropout would draw random numbers
    lm.caption_dropout = 0.5
    before = torch.get_rng_state()
    count_train_step_flops(lm, *b)
    assert torch.equal(before, torch.get_rng_state())
    assert all(p.grad is None for p in lm.parameters())


def test_mamba_train_step_flops_match_hand_count():
    """Counted matmuls + depthwise conv (torch's grouped-conv backward formula is corrected in
    ttm.flops) plus the analytic selective scan: 7 * d_inner * d_state + 11 * d_inner per token."""
    from torch import nn

    lm = tiny_lm("prefix", "mamba", d_state=16, expand=2)
    S = T + K - 1
    P = S + L + 1
    bb = lm.backbone
    d_inner, d_state, d_conv = 2 * d, 16, 4
    lin = sum(2 * B * P * m.weight.numel() for m in bb.modules() if isinstance(m, nn.Linear))
    conv = n * 2 * B * d_inner * P * d_conv  # depthwise: one MAC per channel per tap
    heads, text = K * 2 * B * S * d * V, 2 * B * L * Dt * d
    got = count_train_step_flops(lm, *batch())
    assert got["counted"] == 3 * (lin + heads) + 2 * text + 3 * conv
    assert got["scan"] == 3 * B * P * n * (7 * d_inner * d_state + 11 * d_inner)


@pytest.mark.parametrize("fast", [True, False])
def test_mamba2_train_step_flops_count_the_scan_once(fast):
    """Counted matmuls and conv outside the SSD plus the analytic SSD at the chunk the pure scan
    runs; the SSD's own matmuls (which the counter sees on this path) are not added again, and
    the fast and reference conv/scan paths give the same count."""
    from torch import nn

    from backbones.mamba2 import pure_chunk_size, ssd_flops_per_token

    lm = tiny_lm("prefix", "mamba2", d_state=8, headdim=8, chunk_size=64)
    for blk in lm.backbone.blocks:
        blk.mixer.fused_conv = blk.mixer.fused_ssd = fast
    S = T + K - 1
    P = S + L + 1
    bb = lm.backbone
    d_inner, d_state, d_conv, H, hp = 2 * d, 8, 4, 2 * d // 8, 8
    conv_dim = d_inner + 2 * d_state
    lin = sum(2 * B * P * m.weight.numel() for m in bb.modules() if isinstance(m, nn.Linear))
    conv = n * 2 * B * conv_dim * P * d_conv  # depthwise: one MAC per channel per tap
    heads, text = K * 2 * B * S * d * V, 2 * B * L * Dt * d
    Q = pure_chunk_size(64, hp, d_state, P)
    assert Q == 9 and bb.blocks[0].mixer.scan_chunk_size(P) == Q  # 12 at most: 18 positions in 2 chunks
    per_token = 2 * Q * d_state + Q * H + 2 * Q * H * hp + 4 * H * hp * d_state + 2 * H * hp * d_state / Q + 3 * H * hp
    assert ssd_flops_per_token(P, Q, H, hp, d_state, 1) == int(per_token)
    got = count_train_step_flops(lm, *batch())
    assert got["counted"] == 3 * (lin + heads) + 2 * text + 3 * conv
    assert got["scan"] == 3 * B * P * n * int(per_token)
    assert got["scan_seen"] > 0  # the pure scan's matmuls, which the counter saw and which were taken out
    assert got["total"] == got["counted"] + got["scan"]


@pytest.mark.parametrize("use_package", [False, True])
def test_s5_train_step_flops_count_the_scan_once(use_package):
    """S5's B u and C x are counted once, in the analytic scan, on both paths (the counter sees
    all of them in the FFT scan and half of them through the package)."""
    from torch import nn

    lm = tiny_lm("prefix", "s5", d_state=4)
    for blk in lm.backbone.blocks:
        blk.mixer.use_package = use_package
    S = T + K - 1
    P = S + L + 1
    bb = lm.backbone
    Ps, H = 4, d
    lin = sum(2 * B * P * m.weight.numel() for m in bb.modules() if isinstance(m, nn.Linear))
    heads, text = K * 2 * B * S * d * V, 2 * B * L * Dt * d
    got = count_train_step_flops(lm, *batch())
    assert got["counted"] == 3 * (lin + heads) + 2 * text
    assert got["scan"] == 3 * B * P * n * (8 * Ps * H + 28 * Ps + 15 * H)
    assert got["scan_seen"] == 3 * B * P * n * (4 if use_package else 8) * Ps * H


@pytest.mark.parametrize("numba", [True, False])
def test_s4d_train_step_flops_count_the_kernel_once(numba, monkeypatch):
    """S4D's convolution kernel: on the reference path two batched products per channel that the
    counter sees (once per step, not per clip) are taken out; the numba loops are invisible to
    it; either way the analytic scan counts the kernel once and the totals agree."""
    import math

    from torch import nn

    from backbones.ops import s4d_kernel

    if not numba:
        monkeypatch.setattr(s4d_kernel, "_nb", None)

    lm = tiny_lm("prefix", "s4d", d_state=8)
    S = T + K - 1
    P = S + L + 1
    bb = lm.backbone
    half = bb.blocks[0].mixer.n_modes
    assert half == 4
    m = math.isqrt(P - 1) + 1
    nb = -(-P // m)
    lin = sum(2 * B * P * mm.weight.numel() for mm in bb.modules() if isinstance(mm, nn.Linear))
    heads, text = K * 2 * B * S * d * V, 2 * B * L * Dt * d
    got = count_train_step_flops(lm, *batch())
    assert got["counted"] == 3 * (lin + heads) + 2 * text
    assert got["scan_seen"] == (0 if numba else n * 3 * 2 * 2 * d * m * half * nb)
    assert got["scan"] == 3 * B * P * bb.scan_flops_per_token(P)
    assert got["total"] == got["counted"] + got["scan"]


def test_mamba2_in_proj_padding_adds_no_counted_flops(monkeypatch):
    """in_proj's product padded to a multiple of 8 columns (zero weights) counts the same training
    FLOPs as the unpadded product: the counter's extra products are taken out again."""
    from backbones import mamba2

    lm = tiny_lm("prefix", "mamba2", d_state=7, headdim=8, chunk_size=64)
    assert lm.backbone.blocks[0].mixer.in_proj.weight.shape[0] % 8 != 0  # 150 columns: 2 padded
    padded = count_train_step_flops(lm, *batch())
    monkeypatch.setattr(mamba2, "_PAD", 1)
    assert count_train_step_flops(lm, *batch()) == padded
