"""Every Triton kernel the suite calls, run on CPU under the Triton interpreter and compared
with the suite's own pure reference, forward and backward, through the suite's own call
sites (the mixers with kernel="kernel" vs kernel="reference"), so a changed call (a dropped
dt_bias, swapped B/C) fails here. Shims: tests/triton_shims.py. float32, and float16 where
the kernel supports it; bf16 tl.dot is wrong under the interpreter, so it is not checked.

Kernels: mamba_ssm's SSD chunk scan (with initial/final states, a length that is not a
multiple of the chunk), selective_state_update (decoding step), gated RMSNorm; Mamba-3's
SISO kernels; the fla kernels behind the `fla:*` adapter. Mamba1's kernel is a CUDA C++
extension, which the interpreter cannot run.
"""

from __future__ import annotations

import triton_shims  # noqa: I001 (first: sets TRITON_INTERPRET=1 before triton is imported)

import copy

import pytest
import torch

WHY = triton_shims.install()
pytestmark = [pytest.mark.interp, pytest.mark.skipif(WHY is not None, reason=f"Triton interpreter tier: {WHY}")]


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
    return y.detach(), x.grad, grads, torch.cat(dec, 1), {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}


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


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
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
    assert set(k.kernel_path.values()) == {
        "kernel: mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined",
        "kernel: mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn",
        "kernel: mamba_ssm.ops.triton.selective_state_update.selective_state_update",
    }
