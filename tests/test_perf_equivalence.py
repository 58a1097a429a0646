"""The fast CPU paths of the SSM backbones equal their plain reference paths, forward and
backward, to float tolerance (the speed itself is measured in benchmarks/, never here)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from backbones import mamba2
from backbones.mamba2 import Mamba2Mixer, causal_conv_silu, pure_chunk_size, ssd_chunked


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
@pytest.mark.parametrize("way", ["factorised", "decay matrix", "mixed"])
def test_fused_ssd_equals_reference_fwd_bwd(shape, chunk, dtype, tol, with_state, way, monkeypatch):
    """Both ways of the fused scan's within-chunk part, and every other chunk each way (forced
    here; chosen per chunk by the spread of its decays)."""
    _force_chunk_ways(monkeypatch, way)
    ins = _ssd_inputs(*shape, dtype)
    fast = _ssd_fwd_bwd(ins, chunk, True, with_state)
    ref = _ssd_fwd_bwd(ins, chunk, False, with_state)
    for name, a, r in zip(["y", "final", "dx", "ddt", "dA", "dB", "dC", "dD", "dh0"], fast, ref, strict=False):
        scale = max(1.0, r.abs().max().item())
        assert (a - r).abs().max().item() <= tol * scale, name


@pytest.mark.parametrize("way", ["factorised", "decay matrix", "mixed"])
def test_fused_ssd_float32_grads_equal_reference(way, monkeypatch):
    """`_SSDScan` at float32 against the autograd reference: output, final state and the gradients
    of every input (x, dt, A, B, C, D, initial state), a length not a multiple of the chunk."""
    _force_chunk_ways(monkeypatch, way)
    ins = _ssd_inputs(2, 45, 4, 4, 2, 6, torch.float32, seed=1)
    with torch.no_grad():
        ins[1].mul_(0.3)  # decays of the size a model starts with: values and gradients of order 1
    fast = _ssd_fwd_bwd(ins, 16, True, True)
    ref = _ssd_fwd_bwd(ins, 16, False, True)
    for name, a, r in zip(["y", "final", "dx", "ddt", "dA", "dB", "dC", "dD", "dh0"], fast, ref, strict=True):
        torch.testing.assert_close(a, r, atol=1e-5 * max(1.0, r.abs().max().item()), rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_ssd_factorises_only_decays_within_range(dtype, monkeypatch):
    """The factorised way runs for a chunk spread up to _FACTOR_LIMIT and equals the reference there
    (the spread scaled to just below the limit); past it, in the chunks past it, the decay matrix."""
    seen = []
    decide = mamba2._chunk_ways
    monkeypatch.setattr(mamba2, "_chunk_ways", lambda spread: seen.append(decide(spread)) or seen[-1])
    ins = _ssd_inputs(2, 40, 4, 3, 1, 5, dtype, seed=3)
    dt, A = ins[1:3]
    dA = torch.nn.functional.pad(dt * A, (0, 0, 0, 8)).view(2, 3, 16, 4)  # [b, c, q, h]
    spread = dA[:, :, 1:].sum(2).abs().max()  # the cumsum decreases: max - min = Acs_0 - Acs_last
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for scale in (0.95 * mamba2._FACTOR_LIMIT[dtype] / spread, 1.1):  # just within the limit; then past it
        with torch.no_grad():
            dt.mul_(scale)
        fast = _ssd_fwd_bwd(ins, 16, True, True)
        ref = _ssd_fwd_bwd(ins, 16, False, True)
        for name, a, r in zip(["y", "final", "dx", "ddt", "dA", "dB", "dC", "dD", "dh0"], fast, ref, strict=True):
            assert torch.isfinite(a).all(), name
            assert (a - r).abs().max().item() <= tol * max(1.0, r.abs().max().item()), name
    assert seen[0] is True
    assert isinstance(seen[1], torch.Tensor) and 0 < seen[1].sum() < seen[1].numel()  # some chunks each way


def _force_chunk_ways(monkeypatch, way: str) -> None:
    """Run every chunk of the fused scan one way, or every other chunk each way."""
    if way == "mixed":
        monkeypatch.setattr(mamba2, "_chunk_ways", lambda spread: torch.arange(spread[..., 0, 0].numel()) % 2 == 0)
    else:
        monkeypatch.setattr(mamba2, "_chunk_ways", lambda spread: way == "factorised")


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


def test_mamba2_mixer_fused_runs_under_bf16_autocast():
    """Under autocast the fused scan and norm keep their own dtypes (the scan in float32, forward and
    backward alike) and agree with the reference paths to bfloat16 precision."""
    torch.manual_seed(0)
    m = Mamba2Mixer(32, d_state=8, headdim=8, ngroups=2)
    x = torch.randn(2, 21, 32, requires_grad=True)
    outs = []
    for fused in (True, False):
        m.fused_ssd = m.norm.fused = fused
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        outs.append([y.float(), *torch.autograd.grad(y.float().square().sum(), (x, *m.parameters()))])
    for a, r in zip(*outs, strict=True):
        assert (a - r).abs().max() <= 0.05 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_fused_ssd_with_decays_past_the_dtype_range_equals_reference(dtype, tol):
    """Decays below the dtype's smallest normal number (clamped to it in the fused scan) change
    nothing. In float32, dA's gradient (a sum over every token of differences of large terms)
    is compared in float64 only."""
    ins = _ssd_inputs(2, 40, 4, 3, 1, 5, dtype, seed=3)
    with torch.no_grad():
        ins[1].mul_(50.0)  # dt * A down to about -1000 per step: past exp's float64 range within a chunk
    fast = _ssd_fwd_bwd(ins, 16, True, True)
    ref = _ssd_fwd_bwd(ins, 16, False, True)
    for name, a, r in zip(["y", "final", "dx", "ddt", "dA", "dB", "dC", "dD", "dh0"], fast, ref, strict=True):
        assert torch.isfinite(a).all(), name
        if name in ("ddt", "dA") and dtype == torch.float32:
            continue
        assert (a - r).abs().max().item() <= tol * max(1.0, r.abs().max().item()), name


@pytest.mark.parametrize("group_size", [12, 4])
def test_gated_rmsnorm_fused_equals_reference_fwd_bwd(group_size):
    """`_GatedRMSNormFn` against GatedRMSNorm.reference (F.rms_norm and autograd): output and the
    gradients of y, z and the weight, one group and three."""
    from backbones.mamba2 import GatedRMSNorm

    torch.manual_seed(0)
    norm = GatedRMSNorm(12, group_size).double()
    with torch.no_grad():
        norm.weight.normal_()
    y, z = (torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True) for _ in range(2))
    gout = torch.randn(3, 5, 12, dtype=torch.float64)
    outs = []
    for fused in (True, False):
        norm.fused = fused
        out = norm(y, z)
        outs.append([out, *torch.autograd.grad(out, (y, z, norm.weight), gout)])
    for name, a, r in zip(["out", "dy", "dz", "dweight"], *outs, strict=True):
        assert (a - r).abs().max() < 1e-12, name


def test_gated_rmsnorm_one_group_equals_grouped_form_fwd_bwd():
    from backbones.mamba2 import GatedRMSNorm

    torch.manual_seed(0)
    norm = GatedRMSNorm(12, 12).double()
    with torch.no_grad():
        norm.weight.normal_()
    y, z = (torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def grouped(y, z):  # the general path: normalise [..., groups, group_size], then scale
        u = y * F.silu(z)
        u = F.rms_norm(u.reshape(3, 5, 1, 12), (12,), eps=norm.eps)
        return u.reshape(3, 5, 12) * norm.weight

    fast, ref = norm(y, z), grouped(y, z)
    assert (fast - ref).abs().max() < 1e-12
    gy = torch.randn_like(fast)
    for a, r in zip(torch.autograd.grad(fast, (y, z, norm.weight), gy),
                    torch.autograd.grad(ref, (y, z, norm.weight), gy), strict=True):
        assert (a - r).abs().max() < 1e-10


def _mamba1_mixer():
    from backbones.mamba import MambaMixer

    return MambaMixer(16, d_state=4, kernel="reference").double(), 16, 23


def _mamba2_mixer():
    return Mamba2Mixer(32, d_state=12, headdim=8, ngroups=2, chunk_size=16).double(), 32, 41


@pytest.mark.parametrize("make", [_mamba1_mixer, _mamba2_mixer], ids=["mamba1", "mamba2"])
def test_mixer_fused_conv_equals_conv1d_grads(make):
    torch.manual_seed(0)
    m, d, L = make()
    x = torch.randn(2, L, d, dtype=torch.float64, requires_grad=True)
    outs = []
    for fused in (True, False):
        m.fused_conv = fused
        m.zero_grad()
        y = m(x)
        (y * y.detach().cos()).sum().backward()
        outs.append([y, x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
        x.grad = None
    for a, r in zip(*outs, strict=True):
        assert (a - r).abs().max() < 1e-10


@pytest.mark.parametrize("b,l,c,K", [(2, 23, 5, 4), (1, 2, 3, 4), (3, 7, 4, 1), (2, 9, 6, 2)])
def test_causal_conv_silu_equals_conv1d_fwd_bwd(b, l, c, K):
    gen = torch.Generator().manual_seed(0)
    kw = {"dtype": torch.float64, "generator": gen}
    x = torch.randn(b, l, c, **kw).transpose(0, 1).contiguous().transpose(0, 1)  # a strided view, as from a split
    w, bias, gy = torch.randn(c, 1, K, **kw), torch.randn(c, **kw), torch.randn(b, l, c, **kw)
    ins = [t.requires_grad_() for t in (x, w, bias)]

    def ref(x, w, bias):  # [b, l, c] -> [b, l, c], zero history
        return F.silu(F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), w, bias, groups=c)).transpose(1, 2)

    fast, slow = causal_conv_silu(*ins), ref(*ins)
    assert (fast - slow).abs().max() < 1e-12
    for a, r in zip(torch.autograd.grad(fast, ins, gy), torch.autograd.grad(slow, ins, gy), strict=True):
        assert (a - r).abs().max() < 1e-10


@pytest.mark.parametrize("chunk,p,n,want", [(64, 16, 64, 48), (64, 16, 47, 48), (64, 64, 128, 64), (8, 16, 64, 8),
                                             (64, 1, 1, 12)])
def test_pure_chunk_size(chunk, p, n, want):
    assert pure_chunk_size(chunk, p, n) == want


@pytest.mark.parametrize("seq_len,want", [(176, 44), (175, 44), (192, 48), (97, 33), (40, 40), (1, 1)])
def test_pure_chunk_size_cuts_the_length_into_equal_chunks(seq_len, want):
    q = pure_chunk_size(64, 16, 47, seq_len)
    assert q == want and -(-seq_len // q) == -(-seq_len // 48)  # as many chunks as at the longest chunk


def _s4d_params(H: int, half: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """S4DMixer's (log_dt, log_A_real, A_imag, C) with their default initialisation spread out a
    little (so that no two modes share their decay), requiring grad."""
    from backbones.s4d import S4DMixer

    torch.manual_seed(seed)
    m = S4DMixer(H, d_state=2 * half)
    with torch.no_grad():
        m.log_A_real.add_(0.3 * torch.randn_like(m.log_A_real))
        m.A_imag.add_(0.1 * torch.randn_like(m.A_imag))
    return [p.detach().to(dtype).requires_grad_() for p in (m.log_dt, m.log_A_real, m.A_imag, m.C)]


@pytest.mark.parametrize("L", [1, 2, 3, 15, 16, 17, 176, 301])
def test_s4d_kernel_paths_equal_power_table_fwd_bwd(L):
    """The blocked reference and the numba pass (discretisation and closed-form backward by hand) vs
    the full table of powers through autograd: K and the gradients of log_dt, log_A_real, A_imag and C,
    float64."""
    from backbones.ops.s4d_kernel import _NumbaKernel, discretize, s4d_kernel_ref
    from backbones.s4d import S4DMixer

    params = _s4d_params(8, 5, torch.float64)
    g = torch.randn(8, L, dtype=torch.float64)

    def table(*p):
        z, _, dB, C = discretize(*p, torch.float64)
        return S4DMixer._kernel(C * dB, *S4DMixer._powers(z, L))

    outs = []
    for fn in (table, lambda *p: s4d_kernel_ref(*p, L, torch.float64), lambda *p: _NumbaKernel.apply(*p, L)):
        ps = [p.detach().clone().requires_grad_() for p in params]
        K = fn(*ps)
        assert K.shape == (8, L)
        outs.append([K, *torch.autograd.grad((K * g).sum(), ps)])
    for other in outs[1:]:
        for a, r in zip(other, outs[0], strict=True):
            assert (a - r).abs().max() < 1e-10 * max(1.0, r.abs().max().item())


def test_s4d_numba_kernel_passes_gradcheck():
    from backbones.ops.s4d_kernel import _NumbaKernel

    assert torch.autograd.gradcheck(lambda *p: _NumbaKernel.apply(*p, 11), _s4d_params(3, 4, torch.float64))


def test_s4d_numba_kernel_float32_close_to_float64():
    from backbones.ops.s4d_kernel import _NumbaKernel

    p64 = _s4d_params(32, 32, torch.float64)
    g = torch.randn(32, 176, dtype=torch.float64)
    outs = []
    for dt in (torch.float64, torch.float32):
        ps = [p.detach().to(dt).requires_grad_() for p in p64]
        K = _NumbaKernel.apply(*ps, 176)
        grads = torch.autograd.grad((K * g.to(K.dtype)).sum(), ps)
        outs.append([t.double() for t in (K, *grads)])
    for a, r in zip(outs[1], outs[0], strict=True):
        assert (a - r).abs().max() < 1e-5 * r.abs().max()


def test_s4d_kernel_rejects_other_dtypes():
    from backbones.ops.s4d_kernel import s4d_kernel

    with pytest.raises(ValueError, match="rtype must be float32 or float64, got torch.bfloat16"):
        s4d_kernel(*_s4d_params(2, 2, torch.float32), 5, torch.bfloat16)


def test_fft_causal_conv_skip_is_the_transposed_convolution_plus_skip_bit_for_bit():
    """S4D's one-node convolution with skip: the same bits as fft_causal_conv on the transposed input
    plus D u, output and the gradients of u, k and D."""
    from backbones.ops.fft_conv import fft_causal_conv, fft_causal_conv_skip

    gen = torch.Generator().manual_seed(0)
    u0, k0, D0 = torch.randn(3, 37, 16, generator=gen), torch.randn(16, 37, generator=gen), torch.randn(16, generator=gen)
    g = torch.randn(3, 37, 16, generator=gen)
    outs = []
    for fn in (lambda u, k, D: fft_causal_conv(u.transpose(1, 2), k).transpose(1, 2).contiguous() + u * D,
               fft_causal_conv_skip):
        u, k, D = (t.clone().requires_grad_() for t in (u0, k0, D0))
        y = fn(u, k, D)
        outs.append([y, *torch.autograd.grad((y * g).sum(), (u, k, D))])
    for a, r in zip(*outs, strict=True):
        assert torch.equal(a, r)
    with pytest.raises(ValueError, match=r"k \[H, L\] .* got u torch.float32 \(3, 37, 16\), k torch.float32 \(37, 16\)"):
        fft_causal_conv_skip(u0, k0.t(), D0)
    with pytest.raises(ValueError, match=r"of one dtype expected; .* D torch.float64 \(16,\)"):
        fft_causal_conv_skip(u0, k0, D0.double())


@pytest.mark.parametrize("dim", [-1, -2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_fft_causal_conv_equals_direct_convolution_fwd_bwd(dim, dtype):
    """The hand-written backward vs autograd through a direct causal convolution (Toeplitz matmul):
    output and both gradients, real and complex, along either of the last two dims; plus gradcheck."""
    from backbones.ops.fft_conv import fft_causal_conv, fft_causal_conv_ref

    gen = torch.Generator().manual_seed(0)
    u0 = torch.randn(2, 3, 5, 23, generator=gen, dtype=dtype)  # [..., C, L]
    k0 = torch.randn(5, 23, generator=gen, dtype=dtype)
    g = torch.randn(2, 3, 5, 23, generator=gen, dtype=dtype)
    lag = torch.arange(23)[:, None] - torch.arange(23)[None, :]

    def direct(u, k):  # [..., C, L], [C, L]
        T = k[:, lag.clamp(min=0)] * (lag >= 0)  # [C, L, L]
        return torch.einsum("cts,...cs->...ct", T, u)

    def along(fn):  # fn on the [..., L, C] layout when dim == -2
        if dim == -1:
            return fn
        return lambda u, k: fn(u.transpose(-1, -2), k.t(), dim=-2).transpose(-1, -2)

    outs = []
    for fn in (direct, along(fft_causal_conv_ref), along(fft_causal_conv)):
        u, k = u0.clone().requires_grad_(), k0.clone().requires_grad_()
        y = fn(u, k)
        outs.append([y, *torch.autograd.grad((y * g.conj()).real.sum(), (u, k))])
    for other in outs[1:]:
        for a, r in zip(other, outs[0], strict=True):
            assert (a - r).abs().max() < 1e-10
    small = (u0[:1, :1, :2, :7].clone().requires_grad_(), k0[:2, :7].clone().requires_grad_())
    if dim == -1:
        assert torch.autograd.gradcheck(fft_causal_conv, small)


def test_fft_causal_conv_rejects_mismatched_inputs():
    from backbones.ops.fft_conv import fft_causal_conv

    with pytest.raises(ValueError, match=r"both real or both complex"):
        fft_causal_conv(torch.randn(2, 5, 9), torch.randn(5, 9, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"got u .* \(2, 5, 9\), k .* \(5, 8\)"):
        fft_causal_conv(torch.randn(2, 5, 9), torch.randn(5, 8))


def test_s4d_training_path_equals_reference_fwd_bwd():
    """Training (numba kernel, FFT convolution with its own backward) vs the textbook form (full power
    table, direct causal convolution as a Toeplitz matmul), forward and gradients, float64."""
    from backbones.s4d import S4DMixer

    torch.manual_seed(0)
    m = S4DMixer(16, d_state=8).double()
    x0 = torch.randn(3, 45, 16, dtype=torch.float64)

    def reference(x):
        dtA, _, dB, C = m._discrete(torch.float64)
        K = m._kernel(C * dB, *m._powers(dtA, x.shape[1]))  # [H, L]
        t = torch.arange(x.shape[1])
        lag = t[:, None] - t[None, :]  # [L, L]
        T = K[:, lag.clamp(min=0)] * (lag >= 0)  # [H, L, L]
        return m._post(torch.einsum("hts,bsh->bth", T, x) + x * m.D)

    outs = []
    for fn in (m, reference):
        m.zero_grad()
        x = x0.clone().requires_grad_()
        y = fn(x)
        (y * y.detach().cos()).sum().backward()
        outs.append([y, x.grad] + [p.grad.clone() for p in m.parameters()])
    for a, r in zip(*outs, strict=True):
        assert (a - r).abs().max() < 1e-9


def _diag_inputs(b, l, p, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(b, l, p, 2, dtype=dtype, generator=gen)
    r, th = 0.3 + 0.69 * torch.rand(p, dtype=dtype, generator=gen), 3 * torch.rand(p, dtype=dtype, generator=gen)
    lam = torch.stack([r * th.cos(), r * th.sin()], -1)  # |lam| < 1, any phase
    return v, lam, torch.randn(b, p, 2, dtype=dtype, generator=gen)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("b,l,p", [(3, 37, 5), (1, 1, 3), (2, 176, 64)])
@pytest.mark.parametrize("with_state", [True, False])
def test_diag_scan_numba_equals_sequential_reference_fwd_bwd(b, l, p, dtype, tol, with_state):
    """The numba recurrence and its hand-written adjoint vs autograd through the sequential loop:
    the sequence, the final state and the gradients of v, lam and h0 (upstream gradients on both
    outputs), relative to the largest reference value."""
    from backbones.ops.diag_scan import _NumbaDiagScan, diag_scan_ref

    v0, lam0, h00 = _diag_inputs(b, l, p, dtype)
    gen = torch.Generator().manual_seed(1)
    gx, gh = torch.randn(b, l, p, 2, dtype=dtype, generator=gen), torch.randn(b, p, 2, dtype=dtype, generator=gen)
    outs = []
    for fn in (diag_scan_ref, _NumbaDiagScan.apply):
        v, lam, h0 = (t.clone().requires_grad_() for t in (v0, lam0, h00))
        x, hT = fn(v, lam, h0 if with_state else None)
        wrt = (v, lam, h0) if with_state else (v, lam)
        outs.append([x, hT, *torch.autograd.grad((x * gx).sum() + (hT * gh).sum(), wrt)])
    for a, r in zip(*reversed(outs), strict=True):
        assert (a - r).abs().max() <= tol * max(1.0, r.abs().max().item())


def test_diag_scan_gradcheck_and_closed_form():
    """gradcheck of the numba path (float64); and the closed form x_t = lam^(t+1) h0 + sum_s lam^(t-s) v_s."""
    from backbones.ops.diag_scan import _NumbaDiagScan, diag_scan

    v, lam, h0 = (t.requires_grad_() for t in _diag_inputs(2, 6, 3, torch.float64))
    assert torch.autograd.gradcheck(_NumbaDiagScan.apply, (v, lam, h0))
    assert torch.autograd.gradcheck(lambda v, lam: _NumbaDiagScan.apply(v, lam, None), (v, lam))
    x, hT = diag_scan(v, lam, h0)
    vc, lc, hc = (torch.view_as_complex(t.detach()) for t in (v, lam, h0))
    t = torch.arange(6)
    lag = (t[:, None] - t[None, :]).to(torch.float64)  # [t, s]
    pw = torch.where(lag >= 0, lc[:, None, None] ** lag.clamp(min=0), 0)  # lam^(t-s): [P, t, s]
    want = torch.einsum("pts,bsp->btp", pw, vc) + lc ** (t[:, None] + 1.0) * hc[:, None]
    assert torch.allclose(torch.view_as_complex(x.detach().contiguous()), want, atol=1e-12)
    assert torch.equal(hT, x[:, -1])


def test_diag_scan_rejects_bad_inputs():
    from backbones.ops.diag_scan import diag_scan

    v, lam, _ = _diag_inputs(2, 5, 3, torch.float32)
    with pytest.raises(ValueError, match=r"lam .* \(4, 2\)"):
        diag_scan(v, torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"h0 .*\(2, 4, 2\)"):
        diag_scan(v, lam, torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match=r"one float dtype"):
        diag_scan(v, lam.double())
    with pytest.raises(ValueError, match=r"L >= 1"):
        diag_scan(v[:, :0], lam)


@pytest.mark.parametrize("with_state", [False, True])
def test_s5_recurrence_equals_fft_convolution_fwd_bwd(with_state):
    """S5's two scans (the numba recurrence on CPU, the FFT convolution on GPUs) on the same mixer:
    outputs, final state and the gradients of the input, the initial state and every parameter (float32)."""
    from backbones.s5 import S5Mixer

    torch.manual_seed(0)
    m = S5Mixer(12, d_state=8)
    u0, h00 = torch.randn(3, 45, 12), torch.randn(3, 8, dtype=torch.complex64) * 0.5
    outs = []
    for fft in (True, False):
        m.zero_grad()
        u, h0 = u0.clone().requires_grad_(), h00.clone().requires_grad_()
        y, hT = m._scan(u, h0 if with_state else None, fft=fft)
        loss = (y * y.detach().cos()).sum() + (hT.abs() ** 2).sum()
        loss.backward()
        outs.append([y, hT, u.grad] + ([h0.grad] if with_state else []) + [p.grad.clone() for p in m.parameters()
                                                                             if p.grad is not None])
    assert len(outs[0]) == len(outs[1]) > 5
    for a, r in zip(*outs, strict=True):
        assert (a - r).abs().max() <= 1e-5 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("with_state", [False, True])
def test_s5_fast_path_equals_package_fwd_bwd(with_state):
    """Our FFT scan vs the s5-pytorch package's associative scan: outputs and input and parameter
    gradients (float32); from a state (prefill, not differentiated in either path): outputs and
    the final state."""
    from backbones.s5 import S5Mixer

    torch.manual_seed(0)
    m = S5Mixer(12, d_state=8)
    x0 = torch.randn(3, 40, 12)
    h0 = torch.randn(3, 8, 2) * 0.5
    outs = []
    for use_package in (False, True):
        m.use_package = use_package
        m.zero_grad()
        x = x0.clone().requires_grad_()
        st = {"ssm": h0.clone()} if with_state else None
        if with_state:
            with torch.no_grad():
                outs.append([m(x, st), st["ssm"]])
            continue
        y = m(x)
        (y * y.detach().cos()).sum().backward()
        outs.append([y, x.grad] + [p.grad.clone() for p in m.parameters()])
    for a, r in zip(*outs, strict=True):
        assert (a - r).abs().max() <= 2e-4 * max(1.0, r.abs().max().item())


def test_s5_steps_equal_package_forward():
    from backbones.s5 import S5Mixer

    torch.manual_seed(0)
    m = S5Mixer(12, d_state=8).eval()
    x = torch.randn(2, 25, 12)
    m.use_package = True
    with torch.no_grad():
        ref = m(x)
        m.use_package = False
        st = m.allocate_state(2, 25)
        ys = torch.cat([m(x[:, :10], st)] + [m.step(x[:, t], st)[:, None] for t in range(10, 25)], 1)
    assert (ys - ref).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["s4d", "s5"])
def test_decoding_step_cache_follows_parameter_updates(name):
    """The discretisation cached for decoding is rebuilt when a parameter changes in place
    (an optimizer step) or is replaced (load_state_dict); the step then equals the uncached one."""
    from backbones.s4d import S4DMixer
    from backbones.s5 import S5Mixer

    torch.manual_seed(0)
    m = (S4DMixer(8, d_state=6) if name == "s4d" else S5Mixer(8, d_state=6)).eval()
    x = torch.randn(2, 8)

    def step(cached: bool) -> torch.Tensor:
        st = m.allocate_state(2, 4)
        with torch.set_grad_enabled(not cached):
            return m.step(x, st).detach()

    assert torch.allclose(step(True), step(False), atol=1e-6)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.1)
    assert torch.allclose(step(True), step(False), atol=1e-6)
    other = (S4DMixer(8, d_state=6) if name == "s4d" else S5Mixer(8, d_state=6)).state_dict()
    m.load_state_dict(other)
    assert torch.allclose(step(True), step(False), atol=1e-6)


# ----------------------------------------------------------------------------- numba kernels (float32 CPU)

needs_numba = pytest.mark.skipif(not mamba2.fused_cpu.AVAILABLE, reason="numba is not installed")
_F32_TOL = 2e-5  # of each output's largest magnitude: float32 rounding in another summation order


def _close(name, a, r, tol=_F32_TOL):
    assert a.shape == r.shape, name
    assert (a - r).abs().max().item() <= tol * max(1.0, r.abs().max().item()), name


@needs_numba
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize(
    "shape,chunk,with_D",
    [
        ((3, 37, 4, 3, 2, 5), 8, True),  # two groups, padded last chunk, 3 sequences over 2 threads
        ((2, 50, 6, 4, 1, 7), 16, False),  # no skip
        ((1, 9, 2, 2, 1, 3), 4, True),  # one sequence
    ],
)
def test_ssd_numba_tail_equals_reference_fwd_bwd(shape, chunk, with_D, with_state, threads):
    """`ssd_chunked(numba=True)` (the backward's last part in one numba pass) against the autograd
    reference: output, final state and the gradient of every input; batch slices on 1 and 2 threads."""
    ins = _ssd_inputs(*shape, torch.float32, seed=2)
    with torch.no_grad():
        ins[1].mul_(0.3)  # decays of the size a model starts with
    x, dt, A, B, C, D, h0 = ins
    D = D if with_D else None
    wrt = [t for t in (x, dt, A, B, C, D, h0 if with_state else None) if t is not None]

    def run(**kw):
        y, final = ssd_chunked(x, dt, A, B, C, chunk, D, h0 if with_state else None, **kw)
        loss = (y * torch.cos(y)).sum() + (final * final.detach().sin()).sum()
        return [y, final, *torch.autograd.grad(loss, wrt)]

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = run(fused=True, numba=True)
    finally:
        torch.set_num_threads(old)
    ref = run(fused=False)
    for name, a, r in zip(["y", "final", "dx", "ddt", "dA", "dB", "dC", "dD", "dh0"], fast, ref):
        _close(name, a, r)


@needs_numba
@pytest.mark.parametrize("way", ["decay matrix", "mixed"])
def test_ssd_numba_falls_back_to_torch_lines_off_the_factorised_way(way, monkeypatch):
    """The numba pass covers the factorised way only; chunks run with the decay matrix take the torch
    lines, bit for bit the same as numba=False."""
    _force_chunk_ways(monkeypatch, way)
    ins = _ssd_inputs(2, 37, 4, 3, 2, 5, torch.float32, seed=4)
    x, dt, A, B, C, D, h0 = ins
    outs = []
    for nb in (True, False):
        y, final = ssd_chunked(x, dt, A, B, C, 8, D, h0, fused=True, numba=nb)
        outs.append([y, final, *torch.autograd.grad((y * y.cos()).sum() + final.sum(), ins)])
    for a, r in zip(*outs, strict=True):
        assert torch.equal(a, r)


def test_numba_flag_refuses_what_it_cannot_run():
    ins = _ssd_inputs(1, 8, 2, 2, 1, 3, torch.float64)
    with pytest.raises(ValueError, match="float32 CPU tensors, got torch.float64"):
        ssd_chunked(*ins[:5], 4, ins[5], None, fused=True, numba=True)
    with pytest.raises(ValueError, match="needs fused=True"):
        ssd_chunked(*[t.float() for t in ins[:5]], 4, None, None, fused=False, numba=True)
    with pytest.raises(ValueError, match="float32 CPU tensors, got torch.float64"):
        causal_conv_silu(torch.randn(1, 4, 3, dtype=torch.float64), torch.randn(3, 1, 2), torch.randn(3), numba=True)


@needs_numba
@pytest.mark.parametrize("b,l,c,K", [(3, 23, 5, 4), (1, 2, 3, 4), (3, 7, 4, 1), (2, 9, 6, 2)])
def test_causal_conv_silu_numba_equals_conv1d_fwd_bwd(b, l, c, K):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, l, c, generator=gen).transpose(0, 1).contiguous().transpose(0, 1)  # strided, as from a split
    w, bias, gy = torch.randn(c, 1, K, generator=gen), torch.randn(c, generator=gen), torch.randn(b, l, c, generator=gen)
    ins = [t.requires_grad_() for t in (x, w, bias)]

    def ref(x, w, bias):
        return F.silu(F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), w, bias, groups=c)).transpose(1, 2)

    fast, slow = causal_conv_silu(*ins, numba=True), ref(*ins)
    _close("out", fast, slow)
    for name, a, r in zip(["dx", "dw", "dbias"], torch.autograd.grad(fast, ins, gy), torch.autograd.grad(slow, ins, gy),
                          strict=True):
        _close(name, a, r)


@needs_numba
@pytest.mark.parametrize("sizes", [(256, 47, 47), (3, 0, 4), (7,), (1, 6)])
def test_causal_conv_silu_numba_segments_are_the_split_bit_for_bit(sizes):
    """Mamba2's x, B and C straight from the conv, each contiguous: the same bits as splitting the
    whole output, forward and backward (the segments' gradients are gathered per row, not concatenated).
    The widths include the demo's (350 channels: a vectorised loop and a scalar tail)."""
    c = sum(sizes)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 29, c, generator=gen).requires_grad_()
    w, bias = torch.randn(c, 1, 4, generator=gen).requires_grad_(), torch.randn(c, generator=gen).requires_grad_()
    gy = torch.randn(3, 29, c, generator=gen)
    whole = causal_conv_silu(x, w, bias, numba=True)
    parts = causal_conv_silu(x, w, bias, numba=True, sizes=sizes)
    assert len(parts) == len(sizes) and all(p.is_contiguous() for p in parts)
    assert torch.equal(torch.cat(parts, -1), whole)
    ref_split = causal_conv_silu(x, w, bias, sizes=sizes)  # the torch path: views of one output
    assert [p.shape for p in ref_split] == [p.shape for p in parts]
    g_whole = torch.autograd.grad(whole, (x, w, bias), gy)
    g_parts = torch.autograd.grad(parts, (x, w, bias), list(torch.split(gy, list(sizes), -1)))
    for a, b in zip(g_parts, g_whole, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=f"1 to 3 channel counts summing to {c}, got"):
        causal_conv_silu(x, w, bias, numba=True, sizes=(c, 1))


def _gated_scan_inputs(seed: int = 3, b: int = 3, L: int = 9, c: int = 5, n: int = 3, R: int = 4):
    """Inputs of `selective_scan_gated` as the Mamba1 mixer passes them: dt's low-rank input, B and C
    column slices of one x_proj output, z a column slice of in_proj's; dt's bias over softplus's whole
    range (past torch's threshold of 20, far below zero); large |z| (silu's tails); a non-zero h0."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, c, generator=gen).requires_grad_()
    xp = torch.randn(b, L, R + 2 * n, generator=gen).requires_grad_()
    W = torch.randn(c, R, generator=gen).requires_grad_()
    bias = torch.linspace(-25, 25, c).requires_grad_()  # with r W^T, pre-activations from ~-30 to ~30
    A = (-torch.rand(c, n, generator=gen) * 2).requires_grad_()
    D = torch.randn(c, generator=gen).requires_grad_()
    zz = (torch.randn(b, L, 2 * c, generator=gen) * 3).requires_grad_()
    h0 = torch.randn(b, c, n, generator=gen).requires_grad_()
    return x, xp, W, bias, A, D, zz, h0


def _gated_scan(fast: bool, x, xp, W, bias, A, D, zz, h0, chunk):
    from backbones.ops import fused_cpu as fc
    from backbones.ops.selective_scan import selective_scan_ref

    R, c, n = W.shape[1], x.shape[2], A.shape[1]
    r, Bm, Cm = xp.split([R, n, n], dim=-1)
    z = zz[..., c:]
    if fast:
        return fc.selective_scan_gated(x, r, W, bias, A, Bm, Cm, D, z, h0, chunk=chunk)
    y, hT = selective_scan_ref(x, F.softplus(F.linear(r, W, bias)), A, Bm, Cm, h0)
    return (y + x * D) * F.silu(z), hT


@needs_numba
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chunk", [4, 16])
def test_selective_scan_gated_equals_torch_fwd_bwd(threads, chunk, monkeypatch):
    """Mamba1's selective SSM in one numba call each way (dt's softplus, the scan, the skip and the gate)
    against the sequential reference and the torch lines around it: the output, the final state and
    the gradients of every input (through both outputs), with strided slices for dt's input, B, C and
    z, chunks that do and do not cut the sequence, 3 sequences over 1 and 2 threads."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    ins = _gated_scan_inputs()
    gen = torch.Generator().manual_seed(9)
    fast, ref = _gated_scan(True, *ins, chunk), _gated_scan(False, *ins, chunk)
    gout, gh = torch.randn(fast[0].shape, generator=gen), torch.randn(fast[1].shape, generator=gen)
    for name, a, r in zip(["out", "hT"], fast, ref, strict=True):
        _close(name, a, r)
    names = ["dx", "dxp", "dW", "dbias", "dA", "dD", "dz", "dh0"]
    for name, a, r in zip(names, torch.autograd.grad(fast, ins, (gout, gh)), torch.autograd.grad(ref, ins, (gout, gh)),
                          strict=True):
        _close(name, a, r)


@needs_numba
def test_selective_scan_gated_is_its_kernels_bit_for_bit_on_any_thread_split(monkeypatch):
    """One launch runs the softplus, the scan and the gate one sequence after the other: bit for bit
    the three kernels run one after the other over the whole batch, and the same on 1, 2 or 3 threads
    (the per-sequence partial sums of the parameters' gradients do not depend on the split)."""
    import numpy as np

    from backbones.ops import fused_cpu as fc
    from backbones.ops.selective_scan import selective_scan

    x, xp, W, bias, A, D, zz, h0 = _gated_scan_inputs(b=4, L=21, c=19)  # 19 channels: vector loops and their tails
    R, c, n = W.shape[1], x.shape[2], A.shape[1]
    with torch.no_grad():
        out, hT = _gated_scan(True, x, xp, W, bias, A, D, zz, h0, 8)
        r, Bm, Cm = xp.split([R, n, n], dim=-1)
        pre = F.linear(r, W, bias)
        dt = torch.empty_like(pre)
        fc._nb_softplus_fwd(pre.numpy(), dt.numpy(), 0, x.shape[0])
        y, hT_ref = selective_scan(x, dt, A, Bm, Cm, h0, chunk=8, backend="numba")
        gated = torch.empty_like(y)
        fc._nb_skip_gate_fwd(y.numpy(), x.detach().numpy(), D.detach().numpy(),
                             np.ascontiguousarray(zz[..., c:].detach().numpy()), gated.numpy(), 0, x.shape[0])
    assert torch.equal(out, gated) and torch.equal(hT, hT_ref)
    ins = (x, xp, W, bias, A, D, zz, h0)
    grads = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        o, h = _gated_scan(True, *ins, 8)
        grads.append(torch.autograd.grad((o * o.detach().cos()).sum() + h.sum(), ins))
    for g1, g2, g3 in zip(*grads, strict=True):
        assert torch.equal(g1, g2) and torch.equal(g1, g3)


@needs_numba
def test_softplus_kernel_equals_torch_over_its_whole_range():
    """The numba softplus (`_softplus_parts`: one exp, log1p by a series) against F.softplus to a
    relative 4e-7, from far below zero (dt ~ 1e-13, where a relative error of log1p shows) to past torch's
    threshold of 20 (softplus(v) = v); its backward's factor against torch.sigmoid."""
    from backbones.ops import fused_cpu as fc

    pre = torch.linspace(-30, 30, 2 * 7 * 401).reshape(2, 7, 401)
    out, gpre, gb = torch.empty_like(pre), torch.empty_like(pre), pre.new_empty(2, 401)
    g = torch.ones_like(pre)
    fc._nb_softplus_fwd(pre.numpy(), out.numpy(), 0, 2)
    fc._nb_softplus_bwd(pre.numpy(), g.numpy(), gpre.numpy(), gb.numpy(), 0, 2)
    ref = F.softplus(pre)
    assert ((out - ref).abs() <= 4e-7 * ref.abs() + 1e-30).all(), "softplus relative error above 4e-7"
    sig = torch.sigmoid(pre)
    assert ((gpre - sig).abs() <= 4e-7 * sig + 1e-30).all(), "sigmoid relative error above 4e-7"
    assert torch.allclose(gb, gpre.sum(1), rtol=1e-5)


@needs_numba
@pytest.mark.parametrize("group_size", [12, 4])
def test_gated_rmsnorm_numba_equals_reference_fwd_bwd(group_size):
    from backbones.mamba2 import GatedRMSNorm

    torch.manual_seed(0)
    norm = GatedRMSNorm(12, group_size)
    with torch.no_grad():
        norm.weight.normal_()
    y, z = (torch.randn(3, 5, 12, requires_grad=True) for _ in range(2))
    gout = torch.randn(3, 5, 12)
    fast = norm(y, z, numba=True)
    ref = norm.reference(y, z)
    _close("out", fast, ref)
    for name, a, r in zip(["dy", "dz", "dweight"], torch.autograd.grad(fast, (y, z, norm.weight), gout),
                          torch.autograd.grad(ref, (y, z, norm.weight), gout), strict=True):
        _close(name, a, r)


@needs_numba
@pytest.mark.parametrize("make", [_mamba1_mixer, _mamba2_mixer], ids=["mamba1", "mamba2"])
def test_mixer_numba_path_equals_reference_path_and_is_recorded(make):
    """A float32 mixer on CPU runs the numba kernels with kernel="auto" and the torch code with
    kernel="reference": the same output and gradients to float32 rounding; each run records its path."""
    from backbones.ops.dispatch import kernel_paths

    torch.manual_seed(0)
    m, d, L = make()
    m = m.float()
    x = torch.randn(3, L, d, requires_grad=True)
    outs, ran = [], []
    for mode in ("auto", "reference"):
        m.kernel, m.kernel_path = mode, None
        m.zero_grad()
        y = m(x)
        (gx,) = torch.autograd.grad((y * y.detach().cos()).sum(), x, retain_graph=True)
        (y * y.detach().cos()).sum().backward()
        outs.append([y, gx] + [p.grad.clone() for p in m.parameters()])
        ran.append(next(iter(kernel_paths(m).values()))["ran"])
    for a, r in zip(*outs, strict=True):
        _close("mixer", a, r, tol=1e-4)
    assert ran[0]["conv"] == "reference: backbones.mamba2.causal_conv_silu (numba: backbones.ops.fused_cpu)"
    assert ran[1]["conv"] == "reference: backbones.mamba2.causal_conv_silu"
    if "norm" in ran[0]:  # Mamba2: the scan's backward tail and the gated norm too
        assert ran[0]["scan"].endswith("(numba: backbones.ops.fused_cpu)") and "numba" not in ran[1]["scan"]
        assert ran[0]["norm"].endswith("(numba: backbones.ops.fused_cpu)") and "numba" not in ran[1]["norm"]
    else:  # Mamba1: dt, the scan, its skip and its gate in one call
        assert ran[0]["scan"] == ("reference: backbones.ops.fused_cpu.selective_scan_gated (numba: dt, the scan, "
                                  "its skip and gate)")
        assert ran[1]["scan"] == "reference: backbones.ops.selective_scan(backend=torch)"


def test_mamba2_in_proj_padding_changes_no_value():
    """in_proj's product padded with zero weight rows to a multiple of 8 columns: the split equals the
    unpadded product's, and the weight's gradient keeps its shape (float64: the same to rounding)."""
    torch.manual_seed(0)
    m = Mamba2Mixer(16, d_state=3, headdim=8).double()  # width 2*32 + 2*3 + 4 = 74: 6 padded columns
    assert m.in_proj.weight.shape[0] % 8 != 0
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    for a, r in zip(m._in_proj_split(x), m._split(m.in_proj(x)), strict=True):
        assert a.shape == r.shape and (a - r).abs().max() < 1e-12
    sum(t.sum() for t in m._in_proj_split(x)).backward()
    assert m.in_proj.weight.grad.shape == m.in_proj.weight.shape


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_run_batched_covers_the_batch_once_and_waits_for_every_slice(threads, monkeypatch):
    """The numba kernels' batch split: every sequence in exactly one slice, the first slice on the
    calling thread; when that slice raises, the error reaches the caller only after the pool's slices
    have finished (none is left writing into a buffer the caller may free)."""
    import threading
    import time

    from backbones.ops import selective_scan as ss

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    seen, where = [], []

    def fn(b0, b1):
        seen.extend(range(b0, b1))
        where.append((b0, threading.current_thread() is threading.main_thread()))

    ss._run_batched(fn, 7)
    assert sorted(seen) == list(range(7))
    assert dict(where)[0] is True and all(not main for b0, main in where if b0 != 0)

    if threads > 1:
        done = []

        def failing(b0, b1):
            if b0 == 0:
                raise RuntimeError("first slice failed")
            time.sleep(0.05)
            done.append(b0)

        with pytest.raises(RuntimeError, match="first slice failed"):
            ss._run_batched(failing, 6)
        assert len(done) == threads - 1


# ----------------------------------------------------------------------------- fused decoding steps


def _step_mixers():
    from backbones.mamba import MambaMixer
    from backbones.mamba3 import Mamba3Mixer
    from backbones.s4d import S4DMixer
    from backbones.s5 import S5Mixer

    return {
        "mamba": lambda: MambaMixer(24, d_state=5, d_conv=4),
        "mamba-conv1-nobias": lambda: MambaMixer(24, d_state=5, d_conv=1, conv_bias=False),
        "mamba2": lambda: Mamba2Mixer(24, d_state=7, headdim=6, ngroups=1, d_conv=4),
        "mamba2-2groups-conv1": lambda: Mamba2Mixer(24, d_state=7, headdim=6, ngroups=2, d_conv=1),
        "mamba3": lambda: Mamba3Mixer(24, d_state=8, headdim=6, ngroups=2),  # two groups
        "mamba3-rope1": lambda: Mamba3Mixer(24, d_state=6, headdim=8, rope_fraction=1.0),
        "s4d": lambda: S4DMixer(24, d_state=10),
        "s4d-noglu": lambda: S4DMixer(24, d_state=10, glu=False),
        "s5": lambda: S5Mixer(24, d_state=9),
        "s5-half_glu2": lambda: S5Mixer(24, d_state=9, activation="half_glu2"),
        "s5-gelu": lambda: S5Mixer(24, d_state=9, activation="gelu"),
    }


def _reference_step(m, on: bool) -> None:
    """Switch a mixer's decoding step to its torch code (on) or back to the fused numba pass."""
    from backbones.ops.dispatch import KernelSwitch

    if isinstance(m, KernelSwitch):  # Mamba1, Mamba2, Mamba3: the kernel switch
        m.kernel = "reference" if on else "auto"
    else:  # S4D, S5: the class flag, set on the instance
        m.fused_step = not on


@needs_numba
@pytest.mark.parametrize("name", list(_step_mixers()))
def test_fused_decoding_step_equals_torch_step(name):
    """Each SSM's decoding step as numba passes (no grad, float32 CPU) equals its torch step over many
    tokens after a prefill: the outputs and the carried states (in place) to float32 rounding; Mamba1,
    Mamba2 and Mamba3 record which step ran."""
    torch.manual_seed(0)
    m = _step_mixers()[name]().eval()
    with torch.no_grad():
        for p in m.parameters():  # away from the initialisation (D = 1, zero biases, ...)
            p.add_(0.1 * torch.randn_like(p))
    x = 2 * torch.randn(3, 20, 24)
    states, outs, paths = [], [], []
    for ref in (True, False):
        _reference_step(m, ref)
        st = m.allocate_state(3, 20, dtype=torch.float32)
        with torch.no_grad():
            m(x[:, :5], st)  # prefill: the step continues a non-zero state
            outs.append(torch.stack([m.step(x[:, t], st) for t in range(5, 20)], 1))
        states.append({k: v for k, v in st.items() if torch.is_tensor(v) and v.numel()})  # d_conv 1: no window
        paths.append(dict(getattr(m, "kernel_path", None) or {}))
    _close(name, outs[1], outs[0], tol=2e-6)
    for k in states[0]:
        _close(f"{name} state {k}", states[1][k], states[0][k], tol=2e-6)
    if paths[0]:  # Mamba1, Mamba2, Mamba3
        assert paths[0]["step"].startswith("reference: backbones.mamba") and "numba" not in paths[0]["step"]
        assert paths[1]["step"] == paths[0]["step"] + " (numba: backbones.ops.fused_cpu)"


@needs_numba
@pytest.mark.parametrize("name", ["mamba", "mamba2", "mamba3", "s4d", "s5"])
def test_fused_decoding_step_refuses_a_state_it_cannot_update_in_place(name):
    """A strided state would be copied before the numba pass, losing its update: an error naming it."""
    m = _step_mixers()[name]().eval()
    st = m.allocate_state(3, 4, dtype=torch.float32)
    st["ssm"] = st["ssm"].transpose(0, -1).contiguous().transpose(0, -1)  # same shape and values, strided
    with torch.no_grad(), pytest.raises(ValueError, match=rf"{name}: state\['ssm'\] must be a contiguous float32"):
        m.step(torch.randn(3, 24), st)


def _width_mixers():
    """(mixer at the demo's width, (a weight to replace, a parameter to update in place)) per fused step."""
    from backbones.mamba import MambaMixer
    from backbones.mamba3 import Mamba3Mixer
    from backbones.s4d import S4DMixer
    from backbones.s5 import S5Mixer

    return {
        "s4d": lambda: (m := S4DMixer(128, d_state=64), (lambda: m.out, "weight"), lambda: m.log_dt),
        "s5": lambda: (m := S5Mixer(128, d_state=64), (lambda: m.gate, "weight"), lambda: m.Lambda),
        "mamba": lambda: (m := MambaMixer(128), (lambda: m.dt_proj, "weight"), lambda: m.A_log),
        "mamba2": lambda: (m := Mamba2Mixer(128, headdim=16), (lambda: m.norm, "weight"), lambda: m.A_log),
        "mamba3": lambda: (m := Mamba3Mixer(128), (lambda: m, "B_norm"), lambda: m.dt_bias),
    }


@needs_numba
@pytest.mark.parametrize("name", list(_width_mixers()))
def test_fused_step_at_width_follows_parameter_updates_and_leaves_autocast_to_torch(name):
    """The fused steps (S4D's and S5's products, recurrence, GELU and gate or GLU in one numba pass;
    Mamba1's, Mamba2's and Mamba3's passes between in_proj and out_proj) at the demo's width, where their
    loops run vectorised: equal to the torch step; the constants each keeps (numpy views, transposes,
    Mamba1's A = -exp(A_log)) follow a replaced parameter and an in-place update (an optimiser step
    between two generations); under autocast the torch step runs (its products in the autocast dtype)."""
    torch.manual_seed(1)
    m, (owner, attr), inplace = _width_mixers()[name]()
    m.eval()
    x = torch.randn(8, 6, 128)

    def run(mixer, st):
        with torch.no_grad():
            return torch.stack([mixer.step(x[:, t], st) for t in range(x.shape[1])], 1)

    for update in range(3):
        ref = copy.deepcopy(m)  # a fresh copy: other storage, so no cached constant is reused
        _reference_step(ref, True)
        st = [m.allocate_state(8, 6, dtype=torch.float32) for _ in range(2)]
        outs = [run(ref, st[0]), run(m, st[1])]
        _close(f"{name} width 128, update {update}", outs[1], outs[0], tol=2e-6)
        _close(f"{name} width 128 state, update {update}", st[1]["ssm"], st[0]["ssm"], tol=2e-6)
        with torch.no_grad():
            if update == 0:  # a new parameter (new storage)
                w = getattr(owner(), attr)
                setattr(owner(), attr, torch.nn.Parameter(w + 0.3 * torch.randn_like(w)))
            else:  # in place (an optimiser step): the same storage, a new version counter
                inplace().add_(0.3 * torch.randn_like(inplace()))
    ref = copy.deepcopy(m)
    _reference_step(ref, True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = (mixer.step(x[:, 0], mixer.allocate_state(8, 6, dtype=torch.float32)) for mixer in (m, ref))
    assert torch.equal(y, want)  # the torch step's bf16 product, bit for bit


@needs_numba
def test_decoding_norm_equals_torch_bit_for_bit():
    """A decoding step's RMSNorm as one numba pass (`fused_cpu.rms_norm_rows`, in ATen's summation order at
    this build's vector width) equals F.rms_norm bit for bit: every width 1-300 (vector tails, rows narrower
    than a vector), widths where ATen's cascade folds levels (2^14, 40,000), two eps values, magnitudes
    1e-3 to 1e3. `RMSNorm.step` takes it only where a step runs (no grad) and equals `forward` there."""
    from backbones.base import RMSNorm
    from backbones.ops import fused_cpu

    lanes = fused_cpu._sum_lanes()
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in ("AVX2", "AVX512"):  # x86: ATen's Vectorized<float> is 8 or 16 wide, and the probe must find it
        assert lanes == {"AVX2": 8, "AVX512": 16}[cap]
    elif lanes is None:  # another build's order is not known: RMSNorm.step runs F.rms_norm there
        pytest.skip(f"no vector width reproduces F.rms_norm on this build ({cap})")
    gen = torch.Generator().manual_seed(0)
    for d in [*range(1, 301), 1 << 14, 40_000]:
        x = torch.randn(6, d, generator=gen) * torch.logspace(-3, 3, 6)[:, None]
        w = torch.randn(d, generator=gen)
        for eps in (1e-6, 1e-5):
            assert torch.equal(fused_cpu.rms_norm_rows(x, w, eps), F.rms_norm(x, (d,), w, eps)), (d, eps)
    norm = RMSNorm(48)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 48)
    with torch.no_grad():
        assert fused_cpu.rms_norm_usable(x, norm.weight) and torch.equal(norm.step(x), norm(x))
    assert not fused_cpu.rms_norm_usable(x, norm.weight)  # grad enabled: torch's op, with its graph
    assert norm.step(x).grad_fn is not None
    with torch.no_grad(), pytest.raises(RuntimeError, match="normalized_shape"):  # torch's error, not a bad read
        norm.step(torch.randn(4, 40))


@needs_numba
@pytest.mark.parametrize("name,kw", [("transformer", {"cross_attention": True}), ("s4d", {}), ("s5", {}),
                                     ("mamba2", {})])
def test_decoding_with_the_numba_norm_is_bit_identical(name, kw, monkeypatch):
    """A backbone's decoding steps (every block's norms: before the mixer, the cross-attention and the
    channel mixer; the final norm) give the same bits with the numba norm as with F.rms_norm; S4D and S5
    run the block's norm in their fused step (`Mixer.step_normed`): the norm's kernel straight before the
    step's, once per layer and token, and no `RMSNorm.step` wrapper but the final norm's."""
    from backbones.base import build_backbone
    from backbones.ops import fused_cpu

    calls, wrapped = [], []

    def counted(kernel, into):
        return lambda *a: into.append(1) or kernel(*a)

    fused_cpu._sum_lanes()  # its once-per-process probe runs the kernel too: not counted here
    monkeypatch.setattr(fused_cpu, "_nb_rms_norm", counted(fused_cpu._nb_rms_norm, calls))
    monkeypatch.setattr(fused_cpu, "rms_norm_kept", counted(fused_cpu.rms_norm_kept, wrapped))
    torch.manual_seed(0)
    bb = build_backbone(name, d_model=64, n_layers=2, **kw).eval()
    x, mem = torch.randn(3, 12, 64), torch.randn(3, 5, 64)
    mask = torch.ones(3, 5, dtype=torch.bool)

    def decode():
        st = bb.allocate_state(3, 12)
        with torch.no_grad():
            return torch.stack([bb.step(x[:, t], st, mem, mask) for t in range(12)], 1)

    fast = decode()
    if name in ("s4d", "s5"):  # 2 layers' norms in the step, the final norm through its wrapper
        assert (len(calls), len(wrapped)) == (2 * 12 + 12, 12)
    monkeypatch.setattr(fused_cpu, "rms_norm_usable", lambda x, w: False)
    assert torch.equal(fast, decode())


@needs_numba
def test_decoding_row_kernels_equal_torch():
    """The decoding step's row kernels against torch on every row count they take (1-8: blocks of four rows
    and their tails), at widths with and without vector tails: `linear_rows` = F.linear with and without a
    bias; `mlp_rows` = MLP.forward; `cross_attend_rows` = SDPA with a key mask (a row keeping one position,
    a row keeping all) and without; `self_attend_rows` = SDPA over the cache's first p + 1 positions, with
    the new key and value written at p and nothing else of the cache changed."""
    from backbones.base import MLP
    from backbones.ops import fused_cpu

    g = torch.Generator().manual_seed(0)
    for rows in range(1, fused_cpu.STEP_ROWS_MAX + 1):
        for i, o in ((64, 96), (37, 13)):
            x, w, b = (torch.randn(*s, generator=g) for s in ((rows, i), (o, i), (o,)))
            _close(f"linear {rows}x{i}->{o}", fused_cpu.linear_rows(x, w, b), F.linear(x, w, b), tol=2e-6)
            _close(f"linear {rows}x{i}->{o}, no bias", fused_cpu.linear_rows(x, w), F.linear(x, w), tol=2e-6)
        mlp = MLP(40, 2.5)
        x = torch.randn(rows, 40, generator=g)
        with torch.no_grad():
            _close(f"mlp {rows}", fused_cpu.mlp_rows(x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight,
                                                     mlp.fc2.bias), mlp(x), tol=2e-6)
        H, L, Dh = 3, 7, 16
        q, k, v = torch.randn(rows, H * Dh, generator=g), *(torch.randn(rows, H, L, Dh, generator=g) for _ in "kv")
        keep = torch.rand(rows, L, generator=g) < 0.5
        keep[:, 0], keep[0] = True, torch.arange(L) == 3  # row 0 keeps one position
        keep[-1] = True
        for mask in (keep, None):
            want = F.scaled_dot_product_attention(q.view(rows, H, 1, Dh), k, v,
                                                  attn_mask=None if mask is None else mask[:, None, None, :])
            _close(f"cross {rows}, mask {mask is not None}", fused_cpu.cross_attend_rows(q, k, v, mask),
                   want.reshape(rows, H * Dh), tol=2e-6)
        T, p = 9, 5
        kc, vc = torch.randn(rows, H, T, Dh, generator=g), torch.randn(rows, H, T, Dh, generator=g)
        qkv = torch.randn(rows, 3 * H * Dh, generator=g)
        qn, kn, vn = qkv.view(rows, 3, H, 1, Dh).unbind(1)
        kw, vw = kc.clone(), vc.clone()
        kw[:, :, p : p + 1], vw[:, :, p : p + 1] = kn, vn
        want = F.scaled_dot_product_attention(qn, kw[:, :, : p + 1], vw[:, :, : p + 1])
        _close(f"self {rows}", fused_cpu.self_attend_rows(qkv, kc, vc, p), want.reshape(rows, H * Dh), tol=2e-6)
        assert torch.equal(kc, kw) and torch.equal(vc, vw)
    with pytest.raises(ValueError, match="KV cache holds 9 positions; asked to write position 9"):
        fused_cpu.self_attend_rows(qkv, kc, vc, 9)
    with pytest.raises(ValueError, match=r"keep must be \[B, L\] = \[8, 7\], got \[8, 6\]"):
        fused_cpu.cross_attend_rows(q, k, v, keep[:, :6])


@needs_numba
@pytest.mark.parametrize("rows", [3, 9])
def test_transformer_decoding_with_row_kernels_equals_torch_steps(rows, monkeypatch):
    """A cross-attention Transformer's decoding steps (self-attention from its KV cache, cross-attention,
    MLP) through the row kernels equal its torch steps to float32 rounding over 12 tokens, KV caches
    included, and every block ran them; past STEP_ROWS_MAX rows the torch steps run, bit for bit the same
    as with the kernels switched off."""
    from backbones.base import build_backbone
    from backbones.ops import fused_cpu

    calls = []

    def counted(name):
        f = getattr(fused_cpu, name)
        return lambda *a: calls.append(name) or f(*a)

    for name in ("linear_rows", "mlp_rows", "cross_attend_rows", "self_attend_rows"):
        monkeypatch.setattr(fused_cpu, name, counted(name))
    torch.manual_seed(0)
    bb = build_backbone("transformer", d_model=48, n_layers=2, n_heads=3, cross_attention=True).eval()
    x, mem = torch.randn(rows, 12, 48), torch.randn(rows, 5, 48)
    mask = torch.ones(rows, 5, dtype=torch.bool)
    mask[0, 2:] = False

    def decode():
        st = bb.allocate_state(rows, 12)
        with torch.no_grad():
            bb(x[:, :4], mem, mask, state=st)  # prefill
            out = torch.stack([bb.step(x[:, t], st, mem, mask) for t in range(4, 12)], 1)
        return out, st

    fast, st_fast = decode()
    n = len(calls)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache holds 12 positions; asked to write position 12"):
        bb.step(x[:, 0], copy.deepcopy(st_fast), mem, mask)  # a token past the cache
    n_past = len(calls) - n
    monkeypatch.setattr(fused_cpu, "rows_usable", lambda x, w: False)
    ref, st_ref = decode()
    assert len(calls) == n + n_past  # none when switched off
    if rows > fused_cpu.STEP_ROWS_MAX:
        assert n == 0 and torch.equal(fast, ref)
    else:  # per block and token: qkv, self-attention, out; q, cross-attention, out; the MLP
        assert sorted(set(calls)) == ["cross_attend_rows", "linear_rows", "mlp_rows", "self_attend_rows"]
        assert n == 2 * 8 * 7
        _close("transformer steps", fast, ref, tol=2e-6)
    for a, b in zip(st_fast, st_ref):
        _close("KV cache", a["mixer"]["k"], b["mixer"]["k"], tol=2e-6)
        assert a["mixer"]["pos"] == b["mixer"]["pos"] == 12


@needs_numba
def test_generation_records_what_ran_its_step_products():
    """`rows_note` (what `generate_clips` records) names the row kernels exactly where a step takes them."""
    from backbones.ops import fused_cpu

    w = torch.zeros(3, 4)
    for rows in (1, 8, 9):
        with torch.no_grad():
            took = fused_cpu.rows_usable(torch.zeros(rows, 4), w)
            assert took == (rows <= fused_cpu.STEP_ROWS_MAX)
            assert fused_cpu.rows_note(rows, w).startswith("numba: backbones.ops.fused_cpu" if took else "torch")
    with torch.no_grad():
        assert fused_cpu.rows_note(2, w.double()) == "torch" and not fused_cpu.rows_usable(torch.zeros(2, 4), w.double())
    assert not fused_cpu.rows_usable(torch.zeros(2, 4), w)  # grad enabled: torch's products, with their graph
    assert fused_cpu.rows_note(2, w).startswith("numba")  # generate runs in inference mode whatever the caller's


def test_cross_attention_refuses_a_memory_row_that_keeps_nothing():
    """A decoding state's cross-attention names a memory mask row with no position kept (SDPA would give
    NaN, the numba pass a division by zero) instead of decoding from it."""
    from backbones.base import CrossAttention

    ca = CrossAttention(16, 2).eval()
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1] = False
    with torch.no_grad(), pytest.raises(ValueError, match=r"a row of memory_mask \[B, L\] keeps no position"):
        ca.step(torch.randn(2, 16), torch.randn(2, 4, 16), mask, {})


def test_fake_tensor_check_agrees_with_is_fake():
    """`numba_usable`'s shortcut past is_fake (a plain tensor or parameter) answers as is_fake does for
    plain, fake and functional tensors alike (FLOP counting runs the steps on fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    from backbones.ops.fused_cpu import _maybe_fake

    plain = torch.randn(3)
    with FakeTensorMode():
        fake = torch.empty(3)
    cases = [plain, torch.nn.Parameter(plain), fake, torch.nn.Parameter(fake),
             torch._to_functional_tensor(plain), torch._to_functional_tensor(fake)]
    assert [_maybe_fake(t) for t in cases] == [is_fake(t) for t in cases] == [False, False, True, True, False, True]


@needs_numba
def test_numba_gelu_equals_the_erf_form():
    """The fused steps' GELU (erfc by a Chebyshev fit, through the vectorised exp) against x Phi(x) in
    float64 (erfc form: no cancellation for x < 0): absolute error < 1e-6 everywhere, relative < 5e-6 for
    x > -6 and < 3e-5 wherever the value is a normal float32 (in the far tail the rounding of the exponent
    -x^2 / 2 grows with x^2; torch's float32 GELU, 0.5 x (1 + erf), loses every digit there)."""
    import numba

    from backbones.ops import fused_cpu

    @numba.njit
    def gelu(x, out):
        for i in range(x.shape[0]):
            out[i] = fused_cpu._gelu(x[i])

    x = torch.cat([torch.linspace(-12, 12, 100_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 30.0])])
    out = torch.empty_like(x)
    gelu(x.numpy(), out.numpy())
    xd = x.double()
    ref = xd * 0.5 * torch.special.erfc(-xd / 2**0.5)
    assert (out.double() - ref).abs().max() < 1e-6
    normal = ref.abs() > torch.finfo(torch.float32).tiny
    rel = (out.double() - ref).abs() / ref.abs()
    assert rel[normal & (x > -6)].max() < 5e-6
    assert rel[normal].max() < 3e-5


_CACHE_PROBE = """
import hashlib, sys, torch
from backbones.ops import fused_cpu as fc
from backbones.s4d import S4DMixer
from backbones.s5 import S5Mixer
from backbones.base import RMSNorm
from backbones.ops.s4d_kernel import s4d_kernel
sys.path.insert(0, {tests!r})
from test_perf_equivalence import _gated_scan, _gated_scan_inputs
h = hashlib.sha256()
ins = _gated_scan_inputs(b=2, L=21, c=19)
out, hT = _gated_scan(True, *ins, 8)
for t in (out, hT, *torch.autograd.grad((out * out.detach().cos()).sum() + hT.sum(), ins)):
    h.update(t.detach().numpy().tobytes())
torch.manual_seed(1)
ps = [p.detach().requires_grad_() for p in (torch.randn(19) - 4, torch.randn(19, 16), torch.randn(19, 16) * 3,
                                            torch.randn(19, 16, 2))]  # S4D's training kernel
K = s4d_kernel(*ps, 150)
h.update(K.detach().numpy().tobytes())
for t in torch.autograd.grad((K * K.detach().cos()).sum(), ps):
    h.update(t.numpy().tobytes())
torch.manual_seed(0)
for mixer in (S4DMixer(24, d_state=8), S5Mixer(24, 8)):
    norm, x = RMSNorm(24), torch.randn(3, 24)
    state = mixer.allocate_state(3, 4)
    with torch.inference_mode():
        for _ in range(3):
            x = mixer.step_normed(x, norm, state)
            h.update(x.numpy().tobytes())
print(h.hexdigest())
"""


@needs_numba
@pytest.mark.slow
def test_numba_kernels_give_the_same_bits_compiled_or_loaded_from_cache(tmp_path):
    """A fresh process compiles the kernels into an empty numba cache, a second one loads them: the same
    bits from both (Mamba1's gated scan, S4D's training kernel, each forward and backward; S4D's and S5's
    norm-and-step). Both once differed: a jitted function calling another one compiled apart ran, when
    loaded from the cache, its own copy of the callee, with other bits than the callee compiled in the
    process (`test_no_jitted_kernel_calls_one_compiled_apart`)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = _CACHE_PROBE.format(tests=str(Path(__file__).parent))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900,
                           check=False)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    assert any(tmp_path.rglob("*.nbi")), "the first run wrote no numba cache"
    assert runs[0].stdout == runs[1].stdout


@needs_numba
def test_no_jitted_kernel_calls_one_compiled_apart():
    """A jitted function that calls another jitted function compiled apart (not inline="always") computed
    other bits when numba loaded the caller from its cache than when it compiled it (S4D's training kernel
    calling `_powers`: parameters after 3 training steps differed between the first process on a fresh
    cache and the next ones). So a kernel calls only functions inlined into it, or overloads (the
    vectorised exp), and kernels that run one after another are called apart from Python."""
    from numba.core.registry import CPUDispatcher

    from backbones.ops import diag_scan, fused_cpu, s4d_kernel, selective_scan

    checked = 0
    for mod in (diag_scan, fused_cpu, s4d_kernel, selective_scan):
        for name, kernel in vars(mod).items():
            if not isinstance(kernel, CPUDispatcher) or kernel.py_func.__module__ != mod.__name__:
                continue
            checked += 1
            for ref in kernel.py_func.__code__.co_names:
                callee = kernel.py_func.__globals__.get(ref)
                if isinstance(callee, CPUDispatcher):
                    assert callee.targetoptions.get("inline") == "always", f"{mod.__name__}.{name} calls {ref}"
    assert checked >= 25
