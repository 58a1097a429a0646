"""Linear recurrence with a time-invariant diagonal complex decay (S5's scan):

    x_t = lam * x_{t-1} + v_t       v [B, L, P], lam [P], x_{-1} = h0 [B, P] (0 when not given)

Complex numbers are real pairs in the last dim (v [B, L, P, 2], lam [P, 2], h0 [B, P, 2]), the
layout a real matmul writes them in (S5's B_bar u) and reads them from (Re(C x)), so no complex
tensor is assembled or taken apart.

- `diag_scan_ref`: the sequential loop in PyTorch with autograd (the pure reference, any device).
- `diag_scan`: numba loops on CPU, token-major (the P states of one step side by side, so each
  step is one vectorised pass over a row), and a hand-written backward, the adjoint recurrence run
  backwards in time (PyTorch's convention for complex gradients: dL/dRe + i dL/dIm):

      G_t = dL/dx_t + conj(lam) G_{t+1}        (G_{L-1} = dL/dx_{L-1} + dL/dh_T)
      dL/dv_t = G_t     dL/dlam = sum_{b,t} G_t conj(x_{t-1})     dL/dh0 = conj(lam) G_0

  The work is O(B L P) against the O(B P n log n) of a causal FFT convolution (n >= 2L, six
  complex FFTs per layer and step, plus the powers lam^l and the transposes to contiguous rows),
  which stays S5's path on GPUs (`backbones.ops.fft_conv`). One thread, as S4D's kernel: a
  thread pool measured slower inside a training step on this project's 2-core machines.
"""

from __future__ import annotations

import numpy as _np
import torch
from torch import Tensor

try:
    import numba as _nb
except ImportError:  # pragma: no cover - numba is a dependency; without it the reference runs
    _nb = None


def _check(v: Tensor, lam: Tensor, h0: Tensor | None) -> None:
    ok = (v.dim() == 4 and v.shape[-1] == 2 and v.shape[1] >= 1
          and lam.shape == (v.shape[2], 2) and lam.dtype == v.dtype
          and (h0 is None or (h0.shape == (v.shape[0], v.shape[2], 2) and h0.dtype == v.dtype)))
    if not ok or v.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            "diag_scan: v [B, L, P, 2] (L >= 1), lam [P, 2] and h0 [B, P, 2] (complex numbers as real pairs), "
            f"one float dtype, expected; got v {v.dtype} {tuple(v.shape)}, lam {lam.dtype} {tuple(lam.shape)}, "
            f"h0 {None if h0 is None else (h0.dtype, tuple(h0.shape))}"
        )


def diag_scan_ref(v: Tensor, lam: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The sequential reference: v [B, L, P, 2], lam [P, 2], h0 [B, P, 2] or None ->
    (x [B, L, P, 2], the final state x_{L-1} [B, P, 2])."""
    _check(v, lam, h0)
    vc, lc = torch.view_as_complex(v.contiguous()), torch.view_as_complex(lam.contiguous())
    h = vc.new_zeros(vc.shape[0], vc.shape[2]) if h0 is None else torch.view_as_complex(h0.contiguous())
    xs = []
    for t in range(vc.shape[1]):
        h = lc * h + vc[:, t]
        xs.append(h)
    return torch.view_as_real(torch.stack(xs, 1)), torch.view_as_real(h)


if _nb is not None:

    @_nb.njit(nogil=True, fastmath=True, cache=True)
    def _nb_fwd(v, lam, h0, x):  # pragma: no cover - jitted
        # v, x [B, L, P, 2]; lam [P, 2]; h0 [B, P, 2]. The state lives in two local rows (re, im)
        B, L, P = v.shape[0], v.shape[1], v.shape[2]
        lr, li = lam[:, 0].copy(), lam[:, 1].copy()
        hr, hi = _np.empty(P, v.dtype), _np.empty(P, v.dtype)
        for b in range(B):
            hr[:], hi[:] = h0[b, :, 0], h0[b, :, 1]
            for t in range(L):
                for p in range(P):
                    r = lr[p] * hr[p] - li[p] * hi[p] + v[b, t, p, 0]
                    i = lr[p] * hi[p] + li[p] * hr[p] + v[b, t, p, 1]
                    hr[p], hi[p] = r, i
                    x[b, t, p, 0], x[b, t, p, 1] = r, i

    @_nb.njit(nogil=True, fastmath=True, cache=True)
    def _nb_bwd(g, lam, x, h0, ghT, gv, glam, gh0):  # pragma: no cover - jitted
        # g, gv [B, L, P, 2] (gv gets G); x the forward's output; ghT, gh0 [B, P, 2]; glam [P, 2]
        B, L, P = g.shape[0], g.shape[1], g.shape[2]
        lr, li = lam[:, 0].copy(), lam[:, 1].copy()
        Gr, Gi = _np.empty(P, g.dtype), _np.empty(P, g.dtype)
        ar, ai = _np.zeros(P, g.dtype), _np.zeros(P, g.dtype)  # dL/dlam
        for b in range(B):
            for p in range(P):
                Gr[p], Gi[p] = g[b, L - 1, p, 0] + ghT[b, p, 0], g[b, L - 1, p, 1] + ghT[b, p, 1]
            for t in range(L - 1, 0, -1):
                for p in range(P):
                    gr, gi = Gr[p], Gi[p]
                    gv[b, t, p, 0], gv[b, t, p, 1] = gr, gi
                    xr, xi = x[b, t - 1, p, 0], x[b, t - 1, p, 1]
                    ar[p] += gr * xr + gi * xi  # G conj(x_{t-1})
                    ai[p] += gi * xr - gr * xi
                    Gr[p] = g[b, t - 1, p, 0] + lr[p] * gr + li[p] * gi  # + conj(lam) G
                    Gi[p] = g[b, t - 1, p, 1] + lr[p] * gi - li[p] * gr
            for p in range(P):
                gr, gi, hr, hi = Gr[p], Gi[p], h0[b, p, 0], h0[b, p, 1]
                gv[b, 0, p, 0], gv[b, 0, p, 1] = gr, gi
                ar[p] += gr * hr + gi * hi
                ai[p] += gi * hr - gr * hi
                gh0[b, p, 0], gh0[b, p, 1] = lr[p] * gr + li[p] * gi, lr[p] * gi - li[p] * gr
        glam[:, 0], glam[:, 1] = ar, ai


class _NumbaDiagScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, lam: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
        v, lam = v.contiguous(), lam.contiguous()
        h0c = v.new_zeros(v.shape[0], v.shape[2], 2) if h0 is None else h0.contiguous()
        x = torch.empty_like(v)
        _nb_fwd(v.detach().numpy(), lam.detach().numpy(), h0c.detach().numpy(), x.numpy())
        ctx.save_for_backward(lam, x, h0c)
        ctx.has_h0 = h0 is not None
        return x, x[:, -1].clone()

    @staticmethod
    def backward(ctx, gx: Tensor | None, ghT: Tensor | None):
        lam, x, h0 = ctx.saved_tensors
        gx = torch.zeros_like(x) if gx is None else gx.contiguous()
        ghT = torch.zeros_like(h0) if ghT is None else ghT.contiguous()
        gv, glam, gh0 = torch.empty_like(x), torch.empty_like(lam), torch.empty_like(h0)
        _nb_bwd(*(t.numpy() for t in (gx, lam, x, h0, ghT, gv, glam, gh0)))
        return gv, glam, gh0 if ctx.has_h0 else None


def scan_uses_numba(x: Tensor) -> bool:
    """Whether `diag_scan` takes the numba loops for tensors on x's device: CPU with numba installed
    (a dependency). Elsewhere S5 runs its FFT convolution, the fast path on a GPU."""
    return _nb is not None and x.device.type == "cpu"


def diag_scan(v: Tensor, lam: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`diag_scan_ref`, through the numba loops where `scan_uses_numba`: v [B, L, P, 2], lam [P, 2],
    h0 [B, P, 2] or None -> (x [B, L, P, 2], final state [B, P, 2])."""
    if not scan_uses_numba(v):
        return diag_scan_ref(v, lam, h0)  # checks its inputs
    _check(v, lam, h0)
    return _NumbaDiagScan.apply(v, lam, h0)
