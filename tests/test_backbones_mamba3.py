"""Mamba-3: the chunked SISO scan against the one-token recurrence (float64), state
continuation, the module layout of mamba_ssm's Mamba3, and sizing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backbones.base import build_backbone, count_params, size_to
from backbones.mamba3 import Mamba3Mixer
from backbones.ops.mamba3 import mamba3_siso_chunked, mamba3_siso_ref, rotate_pairs


def scan_inputs(b=2, l=13, H=4, P=3, g=2, N=6, A=2, seed=0):
    g_ = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g_, dtype=torch.float64)  # noqa: E731
    dt = F.softplus(r(b, l, H))
    return dict(q=r(b, l, g, N), k=r(b, l, g, N), q_bias=r(H, N), k_bias=r(H, N), v=r(b, l, H, P),
                adt=-torch.rand(b, l, H, generator=g_, dtype=torch.float64) * dt, dt=dt, trap=r(b, l, H),
                angle=r(b, l, H, A), D=r(H))


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
def test_chunked_scan_equals_recurrence(chunk):
    ins = scan_inputs()
    y, st = mamba3_siso_ref(**ins)
    y2, st2 = mamba3_siso_chunked(**ins, chunk_size=chunk)
    assert (y - y2).abs().max() < 1e-10
    for a, b in zip(st, st2):
        assert (a - b).abs().max() < 1e-10


def test_scan_continues_from_its_state():
    ins = scan_inputs()
    y, _ = mamba3_siso_ref(**ins)
    cut = lambda s: {k: (v[:, s] if v.dim() > 2 else v) for k, v in ins.items()}  # noqa: E731
    y1, st = mamba3_siso_chunked(**cut(slice(0, 6)), chunk_size=4)
    y2, st = mamba3_siso_chunked(**cut(slice(6, 7)), state=st, chunk_size=4)  # one token
    y3, _ = mamba3_siso_ref(**cut(slice(7, 13)), state=st)
    assert (torch.cat([y1, y2, y3], 1) - y).abs().max() < 1e-10


def test_trapezoid_reduces_to_euler_and_rotation_preserves_norm():
    ins = scan_inputs(A=3)
    ins["trap"] = torch.full_like(ins["trap"], 50.0)  # lam = 1: h_t = alpha h_{t-1} + dt v_t k_t^T (Euler)
    ins["angle"] = torch.zeros_like(ins["angle"])  # no rotation
    y, _ = mamba3_siso_ref(**ins)
    b, l, H, P = ins["v"].shape
    q = ins["q"].repeat_interleave(2, 2) + ins["q_bias"]
    k = ins["k"].repeat_interleave(2, 2) + ins["k_bias"]
    h = torch.zeros(b, H, P, q.shape[-1], dtype=torch.float64)
    for t in range(l):
        h = torch.exp(ins["adt"][:, t])[..., None, None] * h + (ins["dt"][:, t, :, None] * ins["v"][:, t])[..., None] * k[:, t, :, None]
        assert ((h * q[:, t, :, None]).sum(-1) + ins["v"][:, t] * ins["D"][:, None] - y[:, t]).abs().max() < 1e-10
    x, th = torch.randn(3, 6, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64)
    rx = rotate_pairs(x, th)
    assert torch.allclose(rx[:, :2].norm(dim=-1), x[:, :2].norm(dim=-1)) and torch.equal(rx[:, 4:], x[:, 4:])


def test_layout_matches_mamba_ssm_mamba3():
    m = Mamba3Mixer(32, d_state=16, expand=2, headdim=16)  # d_inner 64, 4 heads, 4 angle pairs
    assert m.in_proj.weight.shape == (2 * 64 + 2 * 16 + 3 * 4 + 4, 32)  # [z, x, B, C, dt, A, trap, angle]
    assert m.B_bias.shape == m.C_bias.shape == (4, 16) and torch.equal(m.B_bias, torch.ones(4, 16))
    assert m.dt_bias.shape == m.D.shape == (4,)
    st = m.allocate_state(3, 100)
    assert {k: tuple(v.shape) for k, v in st.items()} == {"angle": (3, 4, 4), "ssm": (3, 4, 16, 16),
                                                         "k": (3, 4, 16), "v": (3, 4, 16)}


def test_mixer_float64_prefill_then_step_equals_forward():
    torch.manual_seed(0)
    m = Mamba3Mixer(16, d_state=8, headdim=8, ngroups=2, chunk_size=4).double()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    y = m(x)
    st = m.allocate_state(2, 11, dtype=torch.float64)
    parts = [m(x[:, :5], st), m(x[:, 5:8], st)] + [m.step(x[:, t], st)[:, None] for t in range(8, 11)]
    assert (torch.cat(parts, 1) - y).abs().max() < 1e-10


def test_size_to_matches_a_transformer_budget():
    target = count_params(build_backbone("transformer", d_model=64, n_layers=4))
    res = size_to("mamba3", target, d_model=64)
    assert res.rel_error < 0.01, res


def test_bad_knobs_are_rejected():
    with pytest.raises(ValueError, match="rope_fraction"):
        Mamba3Mixer(16, rope_fraction=0.3)
    with pytest.raises(ValueError, match="unknown knob"):
        build_backbone("mamba3", d_model=16, n_layers=1, d_conv=4)


def test_new_backbones_grid_expands_to_registered_backbones():
    from pathlib import Path

    from ablations.spec import expand, load_spec, validate_run_configs
    from backbones.base import registered

    path = Path(__file__).resolve().parents[1] / "ablations" / "backbones_new_cpu.yaml"
    spec = load_spec(path)
    for preset in [None, *spec.presets]:
        validate_run_configs(expand(spec, preset), str(path))
    names = {c.config["model"]["backbone"] for c in expand(spec)}
    assert "mamba3" in names and sum(n.startswith("fla:") for n in names) == 6
    missing = [n for n in names if n not in registered() and not n.startswith("fla:")]
    assert not missing, missing
