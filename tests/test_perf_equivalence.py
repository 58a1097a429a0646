"""The fast CPU paths of the SSM backbones equal their plain reference paths, forward and
backward, to float tolerance (the speed itself is measured in benchmarks/, never here)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backbones.mamba2 import Mamba2Mixer, pure_chunk_size, ssd_chunked


def _ssd_inputs(b, l, h, p, g, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kw = {"dtype": dtype, "generator": gen}
    x = torch.randn(b, l, h, p, **kw)
    dt = F.softplus(torch.randn(b, l, h, **kw) - 1)
    A = -(0.5 + 4 * torch.rand(h, **kw))
    B, C = torch.randn(b, l, g, n, **kw), torch.randn(b, l, g, n, **kw)
    D, h0 = torch.randn(h, **kw), torch.randn(b, h, p, n, **kw)
    return [t.requires_grad_() for t in (x, dt, A, B, C, D, h0)]


def _ssd_fwd_bwd(ins, chunk, fused, with_state):
    x, dt, A, B, C, D, h0 = ins
    y, final = ssd_chunked(x, dt, A, B, C, chunk, D, h0 if with_state else None, fused=fused)
    loss = (y * torch.cos(y)).sum() + (final * final.detach().sin()).sum()  # non-trivial upstream grads
    wrt = ins if with_state else ins[:-1]
    return [y, final, *torch.autograd.grad(loss, wrt)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize(
    "shape,chunk",
    [
        ((2, 37, 4, 3, 2, 5), 8),  # two groups, padded last chunk
        ((2, 37, 4, 3, 1, 5), 64),  # one chunk shorter than the chunk size
        ((3, 50, 6, 4, 3, 7), 16),
        ((1, 9, 2, 2, 1, 3), 1),  # chunk of one
    ],
)
@pytest.mark.parametrize("with_state", [True, False])
def test_fused_ssd_equals_reference_fwd_bwd(shape, chunk, dtype, tol, with_state):
    ins = _ssd_inputs(*shape, dtype)
    fast = _ssd_fwd_bwd(ins, chunk, True, with_state)
    ref = _ssd_fwd_bwd(ins, chunk, False, with_state)
    for name, a, r in zip(["y", "final", "dx", "ddt", "dA", "dB", "dC", "dD", "dh0"], fast, ref, strict=False):
        scale = max(1.0, r.abs().max().item())
        assert (a - r).abs().max().item() <= tol * scale, name


def test_mamba2_mixer_fused_equals_reference_grads():
    torch.manual_seed(0)
    m = Mamba2Mixer(32, d_state=12, headdim=8, ngroups=2, chunk_size=64).double()
    x = torch.randn(3, 41, 32, dtype=torch.float64, requires_grad=True)
    outs = []
    for fused in (True, False):
        m.fused_ssd = fused
        m.zero_grad()
        y = m(x)
        (gx,) = torch.autograd.grad((y**2).sum(), x, retain_graph=True)
        (y**2).sum().backward()
        outs.append([y, gx] + [p.grad.clone() for p in m.parameters()])
    for a, r in zip(*outs, strict=True):
        assert (a - r).abs().max() < 1e-10


@pytest.mark.parametrize("chunk,p,n,want", [(64, 16, 64, 32), (64, 16, 47, 32), (64, 64, 128, 64), (8, 16, 64, 8), (64, 1, 1, 8)])
def test_pure_chunk_size(chunk, p, n, want):
    assert pure_chunk_size(chunk, p, n) == want
