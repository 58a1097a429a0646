"""S4D's convolution kernel: K_l = 2 Re(sum_n W_n exp(l z_n)) for l < L, per channel.

    z = dt A [H, N/2] (complex, Re z < 0), W = C dB [H, N/2] (complex)  ->  K [H, L] (real)

- `s4d_kernel_ref`: PyTorch with autograd. With l = a + m b (m ~ sqrt(L)), exp(l z) =
  exp(a z) exp(m b z), so K[:, a + m b] is one batched [m, N/2] @ [N/2, L/m] product per
  channel and only [H, N/2, sqrt(L)] tables of powers are built.
- `s4d_kernel`: the same sums in fused numba loops per channel, the powers exp(a z) and
  exp(m b z) by repeated multiplication with exp(z) and exp(m z) (at most ~sqrt(L) factors,
  so rounding grows by that many ulps; the reference's cos/sin of l Im(z) lose as much to
  argument rounding), and a hand-written backward from the closed forms
  (S0 = sum_l g_l conj(V_l), S1 = sum_l l g_l conj(V_l), V_l = exp(l z)):

      dL/dW = 2 S0        dL/dz = 2 conj(W) S1      (PyTorch's convention: dL/dRe + i dL/dIm)

  At the demo's shapes (H 128, N/2 32, L ~176) autograd runs ~50 small broadcast ops per
  layer (~3-4 ms forward + backward); the fused loops take ~1 ms. They run on one thread:
  splitting channels across a thread pool measured slower inside a training step (the pool's
  hand-offs and torch's OpenMP workers contend for the same 2 cores).
"""

from __future__ import annotations

import math

import numpy as _np
import torch
from torch import Tensor

try:
    import numba as _nb
except ImportError:  # pragma: no cover - numba is a dependency; without it the reference runs
    _nb = None


def kernel_blocks(L: int) -> tuple[int, int]:
    """The split of L positions into m ~ sqrt(L) offsets times nb blocks (l = a + m b)."""
    m = max(1, math.isqrt(max(L - 1, 0)) + 1)
    return m, -(-L // m)


def s4d_kernel_ref(z: Tensor, W: Tensor, L: int) -> Tensor:
    """K [H, L] = 2 Re(sum_n W_n exp(l z_n)) through autograd; z, W [H, N/2] complex."""
    m, nb = kernel_blocks(L)
    re, im = z.real[:, :, None], z.imag[:, :, None]  # [H, N/2, 1]
    a = torch.arange(m, device=z.device, dtype=re.dtype)
    mb = torch.arange(nb, device=z.device, dtype=re.dtype) * m
    m1, m2 = torch.exp(re * a), torch.exp(re * mb)  # [H, N/2, m], [H, N/2, nb]
    p1r, p1i = m1 * torch.cos(im * a), m1 * torch.sin(im * a)
    p2r, p2i = m2 * torch.cos(im * mb), m2 * torch.sin(im * mb)
    wr, wi = W.real[:, :, None], W.imag[:, :, None]
    ar, ai = wr * p1r - wi * p1i, wr * p1i + wi * p1r  # W exp(a z): [H, N/2, m]
    K = 2 * (ar.transpose(1, 2) @ p2r - ai.transpose(1, 2) @ p2i)  # [H, m, nb]: K[:, a, b] = K_{a + m b}
    return K.transpose(1, 2).reshape(K.shape[0], m * nb)[:, :L]


if _nb is not None:

    @_nb.njit(nogil=True, fastmath=True, cache=True, inline="always")
    def _powers(zr, zi, h, p1r, p1i, p2r, p2i):  # pragma: no cover - jitted
        # exp(a z) into p1 [m, N] and exp(m b z) into p2 [nb, N] for channel h, by repeated
        # multiplication with exp(z) and exp(m z) (at most ~sqrt(L) factors each)
        m, nb, N = p1r.shape[0], p2r.shape[0], p1r.shape[1]
        p1r[0], p1i[0], p2r[0], p2i[0] = 1, 0, 1, 0
        if m > 1:
            for n in range(N):
                mag = _np.exp(zr[h, n])
                p1r[1, n], p1i[1, n] = mag * _np.cos(zi[h, n]), mag * _np.sin(zi[h, n])
        if nb > 1:
            for n in range(N):
                mag = _np.exp(zr[h, n] * m)
                p2r[1, n], p2i[1, n] = mag * _np.cos(zi[h, n] * m), mag * _np.sin(zi[h, n] * m)
        for a in range(2, m):
            for n in range(N):
                p1r[a, n] = p1r[a - 1, n] * p1r[1, n] - p1i[a - 1, n] * p1i[1, n]
                p1i[a, n] = p1r[a - 1, n] * p1i[1, n] + p1i[a - 1, n] * p1r[1, n]
        for b in range(2, nb):
            for n in range(N):
                p2r[b, n] = p2r[b - 1, n] * p2r[1, n] - p2i[b - 1, n] * p2i[1, n]
                p2i[b, n] = p2r[b - 1, n] * p2i[1, n] + p2i[b - 1, n] * p2r[1, n]

    @_nb.njit(nogil=True, fastmath=True, cache=True)
    def _nb_kernel_fwd(wr, wi, zr, zi, K, m, nb, h0, h1):  # pragma: no cover - jitted
        # wr, wi, zr, zi [H, N]; K [H, L] for channels h0 <= h < h1
        N, L = wr.shape[1], K.shape[1]
        p1r, p1i = _np.empty((m, N), wr.dtype), _np.empty((m, N), wr.dtype)
        p2r, p2i = _np.empty((nb, N), wr.dtype), _np.empty((nb, N), wr.dtype)
        for h in range(h0, h1):
            _powers(zr, zi, h, p1r, p1i, p2r, p2i)
            for a in range(m):  # q = W exp(a z), in place of p1
                for n in range(N):
                    qr = wr[h, n] * p1r[a, n] - wi[h, n] * p1i[a, n]
                    p1i[a, n] = wr[h, n] * p1i[a, n] + wi[h, n] * p1r[a, n]
                    p1r[a, n] = qr
            for b in range(nb):
                for a in range(m):
                    l = a + m * b
                    if l >= L:
                        break
                    acc = wr.dtype.type(0)
                    for n in range(N):
                        acc += p1r[a, n] * p2r[b, n] - p1i[a, n] * p2i[b, n]
                    K[h, l] = 2 * acc

    @_nb.njit(nogil=True, fastmath=True, cache=True)
    def _nb_kernel_bwd(wr, wi, zr, zi, gK, gzr, gzi, gwr, gwi, m, nb, h0, h1):  # pragma: no cover
        # as _nb_kernel_fwd; gK [H, L] in, the gradients [H, N] out
        N, L = wr.shape[1], gK.shape[1]
        p1r, p1i = _np.empty((m, N), wr.dtype), _np.empty((m, N), wr.dtype)
        p2r, p2i = _np.empty((nb, N), wr.dtype), _np.empty((nb, N), wr.dtype)
        s0r, s0i = _np.empty(N, wr.dtype), _np.empty(N, wr.dtype)
        s1r, s1i = _np.empty(N, wr.dtype), _np.empty(N, wr.dtype)
        for h in range(h0, h1):
            _powers(zr, zi, h, p1r, p1i, p2r, p2i)
            s0r[:], s0i[:], s1r[:], s1i[:] = 0, 0, 0, 0
            for b in range(nb):
                for a in range(m):
                    l = a + m * b
                    if l >= L:
                        break
                    g = gK[h, l]
                    gl = g * l
                    for n in range(N):  # V_l = exp(a z) exp(m b z); S += g conj(V)
                        vr = p1r[a, n] * p2r[b, n] - p1i[a, n] * p2i[b, n]
                        vi = p1r[a, n] * p2i[b, n] + p1i[a, n] * p2r[b, n]
                        s0r[n] += g * vr
                        s0i[n] -= g * vi
                        s1r[n] += gl * vr
                        s1i[n] -= gl * vi
            for n in range(N):
                gwr[h, n], gwi[h, n] = 2 * s0r[n], 2 * s0i[n]  # 2 S0
                gzr[h, n] = 2 * (wr[h, n] * s1r[n] + wi[h, n] * s1i[n])  # 2 conj(W) S1
                gzi[h, n] = 2 * (wr[h, n] * s1i[n] - wi[h, n] * s1r[n])


class _NumbaKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, W: Tensor, L: int) -> Tensor:
        m, nb = kernel_blocks(L)
        ins = [t.contiguous() for t in (W.real, W.imag, z.real, z.imag)]  # [H, N/2] each
        K = ins[0].new_empty(ins[0].shape[0], L)
        arr = [t.numpy() for t in ins]
        _nb_kernel_fwd(*arr, K.numpy(), m, nb, 0, K.shape[0])
        ctx.save_for_backward(*ins)
        ctx.blocks = m, nb
        return K

    @staticmethod
    def backward(ctx, gK: Tensor):
        ins = ctx.saved_tensors
        gK = gK.contiguous()
        grads = [torch.empty_like(ins[0]) for _ in range(4)]  # gzr, gzi, gwr, gwi
        arr = [t.numpy() for t in (*ins, gK, *grads)]
        _nb_kernel_bwd(*arr, *ctx.blocks, 0, gK.shape[0])
        gzr, gzi, gwr, gwi = grads
        return torch.complex(gzr, gzi), torch.complex(gwr, gwi), None


def kernel_uses_numba(x: Tensor) -> bool:
    """Whether `s4d_kernel` takes the numba loops for tensors on x's device: CPU with numba installed
    (a dependency); elsewhere the reference, which is also the fast path on a GPU."""
    return _nb is not None and x.device.type == "cpu"


def s4d_kernel(z: Tensor, W: Tensor, L: int) -> Tensor:
    """`s4d_kernel_ref`, through the numba loops where `kernel_uses_numba`:
    z, W [H, N/2] complex -> K [H, L]."""
    if not kernel_uses_numba(z):
        return s4d_kernel_ref(z, W, L)
    if z.dtype not in (torch.complex64, torch.complex128) or W.dtype != z.dtype:
        raise ValueError(f"s4d_kernel: z and W must share a complex dtype, got {z.dtype} and {W.dtype}")
    return _NumbaKernel.apply(z, W, L)
