"""Every Triton kernel the suite calls, run on CPU under the Triton interpreter and compared
with the suite's own pure reference, forward and backward, through the suite's own call
sites (the mixers with kernel="kernel" vs kernel="reference"), so a changed call (a dropped
dt_bias, swapped B/C) fails here. Shims: tests/triton_shims.py (including the interpreter's
bf16 arithmetic, triton#11584). float32, and float16/bfloat16 for Mamba2.

Kernels: mamba_ssm's SSD chunk scan (with initial/final states, a length that is not a
multiple of the chunk), selective_state_update (decoding step), gated RMSNorm; Mamba-3's
SISO kernels; the fla kernels behind the `fla:*` adapter. Mamba1's kernel is a CUDA C++
extension, which the interpreter cannot run.
"""

from __future__ import annotations

import triton_shims  # noqa: I001 (first: sets TRITON_INTERPRET=1 before triton is imported)

import copy
import math

import pytest
import torch

WHY = triton_shims.install()
pytestmark = [
    pytest.mark.interp,
    pytest.mark.slow,  # minutes under the interpreter: `make test` runs it, the fast loop does not
    pytest.mark.skipif(WHY is not None, reason=f"Triton interpreter tier: {WHY}"),
]


def _pair(mixer):
    """The same weights twice: kernel path and reference path."""
    k, r = copy.deepcopy(mixer), copy.deepcopy(mixer)
    k.kernel, r.kernel = "kernel", "reference"
    return k, r


def _maxdiff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def _run(m, x, proj, split):
    """Forward with grads, then prefill [0, split) + continued prefill + 2 decoding steps."""
    x = x.clone().requires_grad_(True)
    y = m(x)
    (y.float() * proj).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    with torch.no_grad():
        st = m.allocate_state(x.shape[0], x.shape[1], dtype=x.dtype)
        T = x.shape[1]
        dec = [m(x[:, :split], st), m(x[:, split : T - 2], st)] + [m.step(x[:, t], st)[:, None] for t in (T - 2, T - 1)]
    return y.detach(), x.grad, grads, torch.cat(dec, 1), dict(enumerate(t.clone() for t in _state_tensors(st)))


def _state_tensors(obj):
    """Every tensor in a decoding state (also inside fla's Cache), in a fixed order."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from _state_tensors(obj[key])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _state_tensors(v)
    elif hasattr(obj, "layers") or hasattr(obj, "__getitem__"):  # fla Cache: one dict of states per layer
        yield from _state_tensors(obj[0])


def _compare(k, r, x, tol, split=5):
    proj = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    yk, gxk, gk, dk, sk = _run(k, x, proj, split)
    yr, gxr, gr, dr, sr = _run(r, x, proj, split)
    out = {"y": _maxdiff(yk, yr), "dx": _maxdiff(gxk, gxr), "decode": _maxdiff(dk, dr),
           "state": max(_maxdiff(sk[n], sr[n]) for n in sr),
           "dparams": max(_maxdiff(gk[n], gr[n]) / max(1.0, gr[n].abs().max().item()) for n in gr)}
    assert set(gk) == set(gr), "kernel and reference train different parameters"
    bad = {n: v for n, v in out.items() if v > tol}
    assert not bad, f"kernel vs reference max abs diffs {out} (tol {tol})"
    return out


# ----------------------------------------------------------------------------- Mamba2 (mamba_ssm)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_mamba2_kernels_match_reference(dtype, tol):
    """SSD chunk scan (13 tokens, chunk 8, prefill with initial/final states), the decoding
    step (selective_state_update) and the gated RMSNorm, through Mamba2Mixer."""
    from backbones.mamba2 import Mamba2Mixer

    torch.manual_seed(0)
    m = Mamba2Mixer(16, d_state=8, headdim=8, ngroups=2, chunk_size=8).to(dtype)
    x = torch.randn(2, 13, 16).to(dtype)
    k, r = _pair(m)
    out = _compare(k, r, x, tol)
    print(f"mamba2 {dtype}: {out}")
    assert {op: k.kernel_path[op] for op in ("scan", "norm", "step")} == {
        "scan": "kernel: mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined",
        "norm": "kernel: mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn",
        "step": "kernel: mamba_ssm.ops.triton.selective_state_update.selective_state_update",
    }
    assert k.kernel_path["conv"].startswith("reference: ")  # no conv kernel: torch or the numba CPU kernel


# ----------------------------------------------------------------------------- Mamba-3 (mamba_ssm)


def _rel(a, b) -> float:
    return _maxdiff(a, b) / max(1e-12, b.abs().max().item())


def test_mamba3_siso_kernel_matches_reference():
    """mamba3_siso_combined (angle cumsum, chunked SISO scan and their backward kernels)
    through Mamba3Mixer: output, input and parameter gradients, prefill with initial/final
    states and a decoding step (13 tokens, chunk 8). The kernel casts q, k, v to bf16 and
    keeps chunk states in bf16 by design: bf16 tolerance, relative to the largest value."""
    from backbones.mamba3 import Mamba3Mixer

    L = 13
    torch.manual_seed(0)
    k, r = _pair(Mamba3Mixer(32, d_state=16, headdim=16, chunk_size=8))
    x = torch.randn(2, L, 32)
    proj = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    outs = {}
    for name, m in (("kernel", k), ("reference", r)):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y * proj).sum().backward()
        with torch.no_grad():
            st = m.allocate_state(2, L)
            dec = torch.cat([m(x[:, :5], st), m(x[:, 5 : L - 1], st), m.step(x[:, L - 1], st)[:, None]], 1)
        outs[name] = (y.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}, dec, st)
    (yk, gk, pk, dk, sk), (yr, gr, pr, dr, sr) = outs["kernel"], outs["reference"]
    diffs = {"y": _rel(yk, yr), "dx": _rel(gk, gr), "dparams": max(_rel(pk[n], pr[n]) for n in pr),
             "decode": _rel(dk, dr), **{f"{n}_state": _rel(sk[n], sr[n]) for n in sr}}
    turn = torch.remainder(sk["angle"] - sr["angle"] + math.pi, 2 * math.pi) - math.pi  # angles mod 2 pi
    diffs["angle_state"] = turn.abs().max().item() / (2 * math.pi)
    print(f"mamba3 (relative to max|ref|): {diffs}")
    assert max(diffs.values()) < 6e-2 and diffs["y"] < 3e-2, diffs
    siso = "kernel: mamba_ssm.ops.triton.mamba3.mamba3_siso_combined.mamba3_siso_combined"
    assert k.kernel_path == {"scan": siso, "step": siso}


def test_mamba3_reference_recurrence_matches_mamba_ssm_step_kernel():
    """One decoding step of mamba_ssm's Triton step kernel from a random state: the new
    angle, SSM, k and v states equal the reference recurrence (float32); the output is
    computed with a bf16 dot inside the kernel (bf16 tolerance)."""
    from mamba_ssm.ops.triton.mamba3.mamba3_siso_step import mamba3_siso_step

    from backbones.ops.mamba3 import mamba3_siso_ref

    g = torch.Generator().manual_seed(0)
    b, H, P, G, N, A = 2, 2, 16, 1, 16, 4
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v, qb, kb = r(b, 1, G, N), r(b, 1, G, N), r(b, 1, H, P), r(H, N), r(H, N)
    dt = torch.nn.functional.softplus(r(b, 1, H))
    adt, trap, angle, D = -torch.rand(b, 1, H, generator=g) * dt, r(b, 1, H), r(b, 1, H, A), r(H)
    state = (torch.rand(b, H, A, generator=g), r(b, H, P, N), r(b, H, N), r(b, H, P))
    y_ref, st_ref = mamba3_siso_ref(q, k, qb, kb, v, adt, dt, trap, angle, D, state=state)
    y, st = mamba3_siso_step(q[:, 0], k[:, 0], v[:, 0], adt[:, 0], dt[:, 0], trap[:, 0], qb, kb, angle[:, 0],
                             D=D, Z=None, Input_States=state)
    diffs = [_maxdiff(a, b) for a, b in zip(st, st_ref)]
    print(f"mamba3 step kernel: states {diffs}, output relative {_rel(y, y_ref[:, 0]):.2e}")
    assert max(diffs) < 1e-4 and _rel(y, y_ref[:, 0]) < 2e-2


# ----------------------------------------------------------------------------- fla


FLA_LAYERS = ["GatedDeltaNet", "GLA", "HGRN2", "DeltaNet", "KDA", "SimpleGLA"]


@pytest.mark.parametrize("layer, dtype, tol", [(n, torch.float32, 2e-4) for n in FLA_LAYERS]
                         + [("GatedDeltaNet", torch.float16, 2e-2), ("GLA", torch.float16, 2e-2)])
def test_fla_layer_kernels_match_the_adapters_pytorch_path(layer, dtype, tol):
    """fla's Triton kernels (chunk forward/backward in training, fused_recurrent when
    decoding) vs the adapter's PyTorch path, through FlaMixer: output, input and parameter
    gradients (float32), and a prefill + decoding step through fla's Cache."""
    from backbones.fla import FlaMixer

    torch.manual_seed(0)
    k, r = _pair(FlaMixer(32, layer, n_heads=2).to(dtype))
    k.train(), r.train()
    x = torch.randn(2, 11, 32).to(dtype)
    out = _compare(k, r, x, tol, split=5)
    print(f"fla:{layer} {dtype}: {out}")
    assert k.kernel_path["layer"].startswith("kernel: ") and r.kernel_path["layer"].startswith("reference: ")


def test_mamba3_reference_mixer_matches_mamba_ssm_module():
    """mamba_ssm's own Mamba3 module (SISO; its Triton kernels, bf16 inside) with the same
    weights as the suite's pure-PyTorch Mamba3Mixer: same parameters, same output to bf16."""
    from mamba_ssm.modules.mamba3 import Mamba3

    from backbones.mamba3 import Mamba3Mixer

    torch.manual_seed(0)
    theirs = Mamba3(32, d_state=16, expand=2, headdim=16, chunk_size=8)
    with torch.no_grad():  # non-trivial norms and biases (their init is all ones)
        for p in (theirs.B_norm.weight, theirs.C_norm.weight, theirs.B_bias, theirs.C_bias):
            p.add_(0.1 * torch.randn_like(p))
    sd = theirs.state_dict()
    ours = Mamba3Mixer(32, d_state=16, expand=2, headdim=16, chunk_size=8, kernel="reference")
    ours.load_state_dict({
        "in_proj.weight": sd["in_proj.weight"], "out_proj.weight": sd["out_proj.weight"], "dt_bias": sd["dt_bias"],
        "D": sd["D"], "B_bias": sd["B_bias"][:, 0], "C_bias": sd["C_bias"][:, 0],
        "B_norm": sd["B_norm.weight"], "C_norm": sd["C_norm.weight"],
    })
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        rel = _rel(theirs(x), ours(x))
    print(f"mamba3 module vs reference mixer: relative {rel:.2e}")
    assert rel < 3e-2
