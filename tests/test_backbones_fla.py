"""The fla adapter: registration, reasons for the layers it does not offer, errors, and the
PyTorch recurrence against a closed form. (Contract checks: test_backbones_contract runs
every registered `fla:*`; kernels: test_kernels_interp.)"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from backbones import fla
from backbones.base import registered

pytestmark = pytest.mark.skipif(fla.fla_missing() is not None, reason=f"fla: {fla.fla_missing()}")


def test_six_catalogue_layers_are_registered_and_the_rest_say_why_not():
    names = {n for n in registered() if n.startswith("fla:")}
    assert names == {f"fla:{n}" for n in fla.CATALOGUE} and len(names) >= 6
    why = fla.unavailable()
    assert "chunk_rwkv7" in why["fla:RWKV7Attention"]
    assert not names & set(why)


def test_unknown_layer_and_missing_fla_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown layer 'RWKV9'"):
        fla.FlaMixer(32, "RWKV9")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n.startswith("fla") else real(n, *a))
    with pytest.raises(RuntimeError, match=r"fla:GLA: fla is not installed \(pip install"):
        fla.FlaMixer(32, "GLA")


def test_linear_recurrence_closed_form_without_decay():
    """No gate, no delta rule: o_t = sum_{s<=t} (q_t . k_s) v_s * scale (causal linear attention)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    o, S = fla.linear_recurrence(q, k, v, scale=0.5, output_final_state=True)
    att = torch.einsum("bthk,bshk->bhts", q, k).tril() * 0.5
    assert torch.allclose(o, torch.einsum("bhts,bshv->bthv", att, v))
    assert torch.allclose(S, torch.einsum("bshk,bshv->bhkv", k, v))


@pytest.mark.skipif(not fla.fused_cpu.AVAILABLE, reason="numba is not installed")
@pytest.mark.parametrize("gate", ["none", "g", "gk"])
@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("v_first", [False, True])
def test_one_token_fused_step_equals_the_reference_recurrence(gate, delta, v_first):
    """A decoding step (one token from a state) through the numba pass gives the reference loop's
    output and final state, for every gate, with and without the delta rule and l2-normalised q, k,
    grouped heads (H = 2 Hk) and a state stored V-first; the state passed in is left as it was."""
    g = torch.Generator().manual_seed(1)
    B, Hk, H, K, V = 3, 2, 4, 8, 6
    q, k = (torch.randn(B, 1, Hk, K, generator=g) for _ in range(2))
    v = torch.randn(B, 1, H, V, generator=g)
    kw = {"g": -torch.rand(B, 1, H, generator=g)} if gate == "g" else {}
    kw |= {"gk": -torch.rand(B, 1, H, K, generator=g)} if gate == "gk" else {}
    kw |= {"beta": torch.rand(B, 1, H, generator=g), "l2norm_qk": True} if delta else {}
    S0 = torch.randn(B, H, V, K, generator=g) if v_first else torch.randn(B, H, K, V, generator=g)
    kept = S0.clone()
    with torch.no_grad():
        ref = fla.linear_recurrence(q, k, v, scale=0.3, initial_state=S0, output_final_state=True,
                                    state_v_first=v_first, **kw)
        assert fla._recurrence_fused(v, S0)
        out = fla._recurrence(q, k, v, scale=0.3, initial_state=S0, output_final_state=True,
                              state_v_first=v_first, **kw)
    assert torch.equal(S0, kept)
    for a, b in zip(out, ref, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
    with torch.no_grad():
        assert not fla._recurrence_fused(v, S0.double()) and not fla._recurrence_fused(v, None)
    with torch.enable_grad():  # autograd recording: the reference runs
        assert not fla._recurrence_fused(v, S0)


def test_decoding_records_its_recurrence_path():
    """kernel="reference" decodes through the layer's own forward (its recurrence and short conv as numba
    passes where they can); "auto" through the fused step."""
    note = fla.fused_cpu.numba_note(fla.fused_cpu.AVAILABLE)
    for kernel, path in (("reference", f"backbones.fla one-token recurrence and short conv{note}"),
                         ("auto", f"backbones.fla.FlaMixer.step: fused DeltaNet step{note}" if note else
                          "backbones.fla one-token recurrence and short conv")):
        m = fla.FlaMixer(32, "DeltaNet", n_heads=2, kernel=kernel)
        state = m.allocate_state(2, 4)
        with torch.no_grad():
            m.step(torch.randn(2, 32), state)
        assert m.kernel_path["step"] == f"reference: {path}"


#: (layer, layer_kwargs): the catalogue's configurations and the options each fused step covers
_STEP_CASES = [
    ("DeltaNet", {}), ("DeltaNet", {"use_gate": True, "allow_neg_eigval": True, "conv_bias": True}),
    ("GatedDeltaNet", {}), ("GatedDeltaNet", {"output_gate_activation": "sigmoid", "num_v_heads": 8}),
    ("GatedDeltaNet", {"use_gate": False}),
    ("KDA", {}), ("KDA", {"allow_neg_eigval": True}),
    ("SimpleGLA", {}), ("SimpleGLA", {"use_short_conv": False}),
    ("GLA", {}), ("GLA", {"use_short_conv": True, "use_output_gate": False, "clamp_min": -0.05}),
    ("HGRN2", {}), ("DeltaNet", {"rows": 10}),  # more rows than the row kernels take: MKL's products
]


@pytest.mark.skipif(not fla.fused_cpu.AVAILABLE, reason="numba is not installed")
@pytest.mark.parametrize("layer,kw", _STEP_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(_STEP_CASES)])
def test_fused_layer_step_equals_the_layer_forward(layer, kw):
    """Decoding token by token after a prefill: the fused step gives the layer's own forward's outputs
    (kernel="reference", same parameters), leaves the same recurrent state and conv windows, and counts
    the tokens in fla's cache; after a parameter update (as an optimiser step) it reads the new values."""
    import copy

    kw = dict(kw)
    rows = kw.pop("rows", 3)
    torch.manual_seed(0)
    fused = fla.FlaMixer(64, layer, n_heads=4, layer_kwargs=kw).eval()
    with torch.no_grad():
        for p in fused.parameters():  # off the initial values (zero biases, unit norms)
            p.add_(torch.randn_like(p) * 0.1)
    ref = copy.deepcopy(fused)
    ref.kernel = "reference"
    x = torch.randn(rows, 10, 64)
    states = [m.allocate_state(rows, 16) for m in (fused, ref)]
    outs = []
    with torch.no_grad():
        for m, st in zip((fused, ref), states):
            ys = [m(x[:, :6], st)]
            ys += [m.step(x[:, t], st)[:, None] for t in range(6, 8)]
            for p in m.parameters():
                p.mul_(0.9)
            ys += [m.step(x[:, t], st)[:, None] for t in range(8, 10)]
            outs.append(torch.cat(ys, 1))
    assert fused.kernel_path["step"].startswith(f"reference: backbones.fla.FlaMixer.step: fused {layer} step")
    assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6), (outs[0] - outs[1]).abs().max()
    (a, b) = (st["cache"][0] for st in states)
    sa, sb = a["recurrent_state"], b["recurrent_state"]
    assert torch.allclose(sa, sb, rtol=1e-5, atol=1e-5), (sa - sb).abs().max()
    for wa, wb in zip(a.get("conv_state") or (), b.get("conv_state") or (), strict=True):
        assert torch.allclose(wa, wb, rtol=1e-5, atol=1e-6)  # the projections' inputs: rounding apart
    assert states[0]["cache"].get_seq_length() == states[1]["cache"].get_seq_length() == 10


def test_a_configuration_without_a_fused_step_decodes_through_the_forward():
    m = fla.FlaMixer(32, "HGRN2", n_heads=2, layer_kwargs={"use_short_conv": True})
    state = m.allocate_state(2, 4)
    with torch.no_grad():
        m.step(torch.randn(2, 32), state)
    assert m.kernel_path["step"].startswith("reference: backbones.fla one-token recurrence and short conv")


@pytest.mark.skipif(not fla.fused_cpu.AVAILABLE, reason="numba is not installed")
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("bias", [True, False])
def test_short_conv_fused_step_equals_the_torch_step(activation, bias, monkeypatch):
    """fla's ShortConvolution decoding token by token from a prefill: the numba pass gives the torch
    step's outputs and leaves the same window in the same (contiguous) cache tensor."""
    from fla.modules import ShortConvolution

    torch.manual_seed(0)
    conv = ShortConvolution(12, 4, bias=bias, activation=activation)
    x = torch.randn(3, 9, 12)
    runs = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(fla, "_conv_step_fused", lambda *a: False)
        cache = torch.zeros(3, 12, 4)
        with torch.no_grad():
            ys = [fla._short_conv_ref(conv, x[:, :6], cache=cache)[0]]
            for t in range(6, 9):
                y, final = fla._short_conv_ref(conv, x[:, t : t + 1], cache=cache)
                assert final is cache
                ys.append(y)
        runs[fused] = (torch.cat(ys, 1), cache)
    (y1, c1), (y0, c0) = runs[True], runs[False]
    assert torch.allclose(y1, y0, rtol=1e-5, atol=1e-6) and torch.equal(c1, c0)
    assert torch.equal(c1, x[:, 5:].transpose(1, 2))


@pytest.mark.parametrize("bias", [True, False])
def test_short_conv_decoding_step_equals_the_convolution(bias):
    """The reference's one-token step from the state window gives the depthwise conv's output at that
    position, and the window moves on by that token (what `fused_cpu.short_conv_step` is held to)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9, 6, generator=g, dtype=torch.float64)  # [B, T, D]
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64) if bias else None
    whole, _ = fla.ref_causal_conv1d(x, w, b, activation="silu")
    _, state = fla.ref_causal_conv1d(x[:, :8], w, b, activation="silu", output_final_state=True)
    y, state = fla.ref_causal_conv1d(x[:, 8:], w, b, initial_state=state, activation="silu", output_final_state=True)
    assert y.shape == (3, 1, 6) and torch.allclose(y, whole[:, 8:], rtol=1e-12, atol=1e-12)
    assert torch.equal(state, x[:, 5:].transpose(1, 2))


def test_reference_path_is_recorded_and_restores_the_fla_module():
    import fla.layers.gated_deltanet as gdn

    before = dict(vars(gdn))
    m = fla.FlaMixer(32, "GatedDeltaNet", n_heads=2, kernel="reference")
    m(torch.randn(1, 5, 32))
    assert dict(vars(gdn)) == before and not any("forward" in vars(sub) for sub in m.modules())
    assert m.kernel_path == {"layer": "reference: fla.layers.GatedDeltaNet + backbones.fla.torch_path"}
