"""The SSM backbones `mamba`, `s4d`, `s5`: causality, teacher-forced decoding, gradients,
constant state, and their scans against sequential references in float64."""

from __future__ import annotations

import pytest
import torch

from backbones.base import build_backbone, count_params
from backbones.mamba import _nb, selective_scan, selective_scan_ref
from backbones.ops.fft_conv import fft_causal_conv
from backbones.s4d import S4DMixer
from backbones.s5 import S5Mixer

NAMES = ["mamba", "s4d", "s5"]
D, B, S, LM = 16, 2, 10, 5  # d_model, batch, sequence length, text memory length
SMALL = {"mamba": {"d_state": 4}, "s4d": {"d_state": 8}, "s5": {"d_state": 8}}


def build(name: str, cross: bool, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_backbone(name, d_model=D, n_layers=2, cross_attention=cross, n_heads=2, **SMALL[name], **kw)


def inputs(cross: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, D, generator=g)
    if not cross:
        return x, {}
    mask = torch.ones(B, LM, dtype=torch.bool)
    mask[1, 3:] = False
    return x, {"memory": torch.randn(B, LM, D, generator=g), "memory_mask": mask}


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_causal(name, cross):
    m = build(name, cross).eval()
    x, cond = inputs(cross)
    with torch.no_grad():
        y = m(x, **cond)
        for t in (0, 4, S - 2):
            x2 = x.clone()
            x2[:, t + 1] += 1.0
            y2 = m(x2, **cond)
            assert (y2[:, : t + 1] - y[:, : t + 1]).abs().max() < 1e-5, f"position {t + 1} leaked backwards"
            assert (y2[:, t + 1] - y[:, t + 1]).abs().max() > 1e-3  # the perturbation is seen


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_teacher_forced_decoding_matches_forward(name, cross):
    m = build(name, cross).eval()
    x, cond = inputs(cross)
    p = 4
    with torch.no_grad():
        y = m(x, **cond)
        state = m.allocate_state(B, S)
        y_pre = m(x[:, :p], state=state, **cond)
        y_step = torch.stack([m.step(x[:, t], state, **cond) for t in range(p, S)], 1)
    assert (y_pre - y[:, :p]).abs().max() < 1e-4
    assert (y_step - y[:, p:]).abs().max() < 1e-4
    # two prefills in a row continue each other
    with torch.no_grad():
        state = m.allocate_state(B, S)
        y2 = torch.cat([m(x[:, :3], state=state, **cond), m(x[:, 3:], state=state, **cond)], 1)
    assert (y2 - y).abs().max() < 1e-4


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_finite_and_nonzero(name, cross):
    m = build(name, cross).train()
    x, cond = inputs(cross)
    y = m(x, **cond)
    (y * torch.randn_like(y)).sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None, f"{pname}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname}: non-finite gradient"
        assert p.grad.abs().max() > 0, f"{pname}: zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_state_is_constant_in_length(name):
    m = build(name, False).eval()
    assert m.constant_state
    assert m.state_size(1, 8) == m.state_size(1, 4096) > 0
    x, _ = inputs(False)
    with torch.no_grad():
        st_short, st_long = m.allocate_state(B, 4), m.allocate_state(B, 4000)
        m(x[:, :3], state=st_short)
        m(x, state=st_long)
    assert [b.mixer.state_numel(s["mixer"]) for b, s in zip(m.blocks, st_short)] == [
        b.mixer.state_numel(s["mixer"]) for b, s in zip(m.blocks, st_long)
    ]


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_trains(name):
    m = build(name, True).train()
    x, cond = inputs(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x, **cond)
    y.float().square().mean().backward()
    assert torch.isfinite(y.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_config_rebuilds_same_size(name):
    m = build(name, True)
    assert count_params(build_backbone(name, **m.config())) == count_params(m)


# ----------------------------------------------------------------------------- mamba scan


def _scan_inputs(b=3, L=37, d=5, n=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, d, generator=g, dtype=dtype)
    dt = torch.rand(b, L, d, generator=g, dtype=dtype) * 0.5
    A = -torch.rand(d, n, generator=g, dtype=dtype) * 4
    Bm = torch.randn(b, L, n, generator=g, dtype=dtype)
    C = torch.randn(b, L, n, generator=g, dtype=dtype)
    h0 = torch.randn(b, d, n, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, dt, A, Bm, C, h0)]


BACKENDS = ["torch"] + (["numba"] if _nb is not None else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_scan_equals_sequential_float64(backend):
    ins = _scan_inputs()
    y_ref, h_ref = selective_scan_ref(*ins)
    gy, gh = torch.randn_like(y_ref), torch.randn_like(h_ref)
    g_ref = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), ins)
    for chunk in (1, 8, 64):  # chunk 8 does not divide L = 37; 64 > L
        y, h = selective_scan(*ins, chunk=chunk, backend=backend)
        assert (y - y_ref).abs().max() < 1e-10 and (h - h_ref).abs().max() < 1e-10
        g = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), ins)
        for name, a, r in zip(("x", "dt", "A", "B", "C", "h0"), g, g_ref):
            assert (a - r).abs().max() < 1e-10, f"{backend} chunk {chunk}: gradient of {name}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_float32_close_to_reference(backend):
    ins = _scan_inputs(L=50)
    y_ref, h_ref = selective_scan_ref(*ins)
    y, h = selective_scan(*[t.detach().float() for t in ins], backend=backend)
    assert y.dtype == torch.float32
    assert (y.double() - y_ref).abs().max() < 1e-4 * (1 + y_ref.abs().max())
    assert (h.double() - h_ref).abs().max() < 1e-4 * (1 + h_ref.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_on_two_threads(backend):
    ins = _scan_inputs(b=5)
    y_ref, h_ref = selective_scan_ref(*ins)
    g_ref = torch.autograd.grad(y_ref.sum() + h_ref.sum(), ins)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # numba: the batch is split over 2 threads
    try:
        y, h = selective_scan(*ins, backend=backend)
        g = torch.autograd.grad(y.sum() + h.sum(), ins)
    finally:
        torch.set_num_threads(threads)
    assert (y - y_ref).abs().max() < 1e-10 and (h - h_ref).abs().max() < 1e-10
    assert max((a - r).abs().max().item() for a, r in zip(g, g_ref)) < 1e-10


def test_scan_continues_from_state():
    x, dt, A, Bm, C, _ = (t.detach() for t in _scan_inputs(L=20))
    y, h = selective_scan(x, dt, A, Bm, C)
    y1, h1 = selective_scan(x[:, :7], dt[:, :7], A, Bm[:, :7], C[:, :7])
    y2, h2 = selective_scan(x[:, 7:], dt[:, 7:], A, Bm[:, 7:], C[:, 7:], h0=h1)
    assert (torch.cat([y1, y2], 1) - y).abs().max() < 1e-12 and (h2 - h).abs().max() < 1e-12


def test_scan_rejects_bad_shapes():
    x, dt, A, Bm, C, h0 = (t.detach() for t in _scan_inputs())
    with pytest.raises(ValueError, match="A \\[D, N\\]"):
        selective_scan(x, dt, A[:, :2], Bm, C)
    with pytest.raises(ValueError, match="initial state"):
        selective_scan(x, dt, A, Bm, C, h0=h0[:, :, :2])
    with pytest.raises(ValueError, match="backend"):
        selective_scan(x, dt, A, Bm, C, backend="cuda")
    with pytest.raises(ValueError, match="scan_backend"):
        build("mamba", False, scan_backend="triton")


def test_mamba_kernel_switch_gives_same_result():
    m = build("mamba", False).eval()
    x, _ = inputs(False)
    with torch.no_grad():
        y = m(x)
        for blk in m.blocks:
            blk.mixer.use_kernel = False  # pure-PyTorch scan
        y_ref = m(x)
    assert (y - y_ref).abs().max() < 1e-5


def test_mamba_scan_flops_count():
    mixer = build("mamba", False).blocks[0].mixer  # d_inner 32, d_state 4
    assert mixer.scan_flops_per_token(100) == mixer.scan_flops_per_token(10_000) == 7 * 32 * 4 + 11 * 32


# ----------------------------------------------------------------------------- s4d


def test_s4d_fft_conv_equals_recurrence_float64():
    torch.manual_seed(0)
    m = S4DMixer(6, d_state=8, init="inv").double()
    u = torch.randn(3, 40, 6, dtype=torch.float64)
    # the SSM alone: FFT convolution with the kernel vs the complex recurrence
    y_fft = fft_causal_conv(u, m.kernel(40, torch.float64), dim=-2) + u * m.D  # along L of [B, L, H]
    state = m.allocate_state(3, 40, dtype=torch.float64)
    y_rec = torch.stack([m._recurrent(u[:, t], state) for t in range(40)], 1)
    assert (y_fft - y_rec).abs().max() < 1e-10
    # the whole mixer: parallel forward vs prefill from a state + steps
    with torch.no_grad():
        y = m(u)
        state = m.allocate_state(3, 40, dtype=torch.float64)
        y1 = m(u[:, :17], state=state)
        y2 = torch.stack([m.step(u[:, t], state) for t in range(17, 40)], 1)
    assert (torch.cat([y1, y2], 1) - y).abs().max() < 1e-10


def test_s4d_init_and_errors():
    m = S4DMixer(4, d_state=8, init="lin")
    assert torch.allclose(m.A_imag[0], torch.pi * torch.arange(4.0))
    assert torch.allclose(-torch.exp(m.log_A_real), torch.full((4, 4), -0.5))
    with pytest.raises(ValueError, match="d_state must be even"):
        S4DMixer(4, d_state=7)
    with pytest.raises(ValueError, match="init must be"):
        S4DMixer(4, init="legs")


# ----------------------------------------------------------------------------- s5


def test_s5_package_recurrence_matches_its_parallel_scan():
    """The package's own step (forward_rnn) agrees with its stateful parallel forward."""
    from s5 import S5

    torch.manual_seed(0)
    m = S5(6, state_width=8)
    x = torch.randn(2, 15, 6)
    with torch.no_grad():
        y, hT = m(x, return_state=True)
        h = torch.zeros(2, 8, dtype=torch.complex64)
        ys = []
        for t in range(15):
            yt, h = torch.vmap(m.seq.forward_rnn)(x[:, t], h)
            ys.append(yt)
    assert (torch.stack(ys, 1) - y).abs().max() < 1e-5 and (h - hT).abs().max() < 1e-5


def test_s5_complex_params_survive_dtype_casts():
    torch.manual_seed(0)
    m = S5Mixer(8, d_state=4)
    assert not any(p.is_complex() for p in m.parameters())
    assert m.Lambda.shape == (4, 2) and m.C.shape == (8, 4, 2)
    lam = m.Lambda.detach().clone()
    m.to(torch.float64)
    assert torch.equal(m.Lambda.detach().float(), lam) and lam[:, 1].abs().max() > 0  # imaginary parts kept
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    y64 = m(x)
    assert y64.dtype == torch.float64
    m.to(torch.float32)
    assert (m(x.float()) - y64).abs().max() < 1e-5  # the SSM runs in float32 either way


def test_s5_rejects_bad_state():
    m = S5Mixer(8, d_state=4)
    with pytest.raises(ValueError, match="float32 \\[B, P, 2\\]"):
        m(torch.randn(2, 3, 8), state={"ssm": torch.zeros(2, 5, 2)})
    with pytest.raises(ValueError, match="multiple of blocks"):
        S5Mixer(8, d_state=6, blocks=4)
