"""S4D's convolution kernel from its parameters: K_l = 2 Re(sum_n W_n exp(l z_n)) for l < L, per channel.

    dt = exp(log_dt) [H]        A = -exp(log_A_real) + i A_imag [H, N/2]        z = dt A
    dA = exp(z)                 dB = (dA - 1) / A (zero-order hold)             W = C dB
    ->  K [H, L] (real), C stored as real pairs [H, N/2, 2]

- `discretize`: the discretisation in PyTorch (complex tensors, autograd); decoding uses it too.
- `s4d_kernel_ref`: `discretize`, then the sums with autograd. With l = a + m b (m ~ sqrt(L)),
  exp(l z) = exp(a z) exp(m b z), so K[:, a + m b] is one batched [m, N/2] @ [N/2, L/m] product per
  channel and only [H, N/2, sqrt(L)] tables of powers are built.
- `s4d_kernel`: discretisation and sums in one numba pass per channel, the powers exp(a z) and
  exp(m b z) by repeated multiplication with exp(z) and exp(m z) (at most ~sqrt(L) factors, so
  rounding grows by that many ulps; the reference's cos/sin of l Im(z) lose as much to argument
  rounding). The forward keeps the power tables (a few KB per channel) for a backward written from
  the closed forms (S0 = sum_l g_l conj(V_l), S1 = sum_l l g_l conj(V_l), V_l = exp(l z)):

      dL/dW = 2 S0        dL/dz = 2 conj(W) S1      (PyTorch's convention: dL/dRe + i dL/dIm)

  then the chain rule through W = C dB, dB = (dA - 1)/A, dA = exp(z), z = dt A by hand. The sums
  over l factor like the forward's: S0 = sum_b conj(exp(m b z)) sum_a g_{a+mb} conj(exp(a z)), and
  l = a + m b splits S1 the same way.
  At the demo's shapes (H 128, N/2 32, L 173), forward + backward per layer: the reference ~3-4 ms
  (~60 small ops through autograd); the discretisation through autograd followed by numba loops
  for the sums alone (the previous code) 1.8-1.9 ms; this pass 0.95-1.0 ms. It runs on one thread:
  splitting channels across a thread pool measured slower inside a training step (the pool's
  hand-offs and torch's OpenMP workers contend for the same 2 cores). Channels as the
  vectorised axis (no short sums over the modes) ran slower too (1.23 against 1.0 ms, paired).
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


def discretize(log_dt: Tensor, log_A_real: Tensor, A_imag: Tensor, C: Tensor,
               rtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """z = dt A, dA = exp(z), dB = (dA - 1) / A and C, each [H, N/2] complex (complex128 for float64),
    from log_dt [H], log_A_real, A_imag [H, N/2] and C as real pairs [H, N/2, 2]."""
    A = torch.complex(-torch.exp(log_A_real.to(rtype)), A_imag.to(rtype))  # [H, N/2]
    dtA = A * torch.exp(log_dt.to(rtype))[:, None]
    dA = torch.exp(dtA)
    return dtA, dA, (dA - 1) / A, torch.view_as_complex(C.to(rtype).contiguous())


def kernel_from_discrete(z: Tensor, W: Tensor, L: int) -> Tensor:
    """K [H, L] = 2 Re(sum_n W_n exp(l z_n)) through autograd (blocked powers); z, W [H, N/2] complex."""
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


def s4d_kernel_ref(log_dt: Tensor, log_A_real: Tensor, A_imag: Tensor, C: Tensor, L: int,
                   rtype: torch.dtype = torch.float32) -> Tensor:
    """K [H, L] through autograd: `discretize`, then `kernel_from_discrete`."""
    z, _, dB, Cc = discretize(log_dt, log_A_real, A_imag, C, rtype)
    return kernel_from_discrete(z, Cc * dB, L)


if _nb is not None:

    @_nb.njit(nogil=True, fastmath=True, cache=True)
    def _nb_kernel_fwd(log_dt, lar, aim, C, K, P1, P2, aux):  # pragma: no cover - jitted
        # log_dt [H]; lar, aim [H, N]; C [H, N, 2] -> K [H, L]; kept for the backward: the powers
        # P1 [H, 2, m, N] = exp(a z) and P2 [H, 2, nb, N] = exp(m b z) (Re, Im), and
        # aux [H, 8, N] = Re A, Im A, Re dA, Im dA, Re dB, Im dB, Re W, Im W
        H, N, L = lar.shape[0], lar.shape[1], K.shape[1]
        m, nb = P1.shape[2], P2.shape[2]
        qr, qi = _np.empty((m, N), K.dtype), _np.empty((m, N), K.dtype)
        for h in range(H):
            dt = _np.exp(log_dt[h])
            p1r, p1i, p2r, p2i = P1[h, 0], P1[h, 1], P2[h, 0], P2[h, 1]
            a8 = aux[h]
            for n in range(N):
                ar, ai = -_np.exp(lar[h, n]), aim[h, n]
                zr, zi = dt * ar, dt * ai
                e = _np.exp(zr)
                dar, dai = e * _np.cos(zi), e * _np.sin(zi)
                den = ar * ar + ai * ai
                nr = dar - 1
                dbr, dbi = (nr * ar + dai * ai) / den, (dai * ar - nr * ai) / den
                cr, ci = C[h, n, 0], C[h, n, 1]
                a8[0, n], a8[1, n], a8[2, n], a8[3, n] = ar, ai, dar, dai
                a8[4, n], a8[5, n] = dbr, dbi
                a8[6, n], a8[7, n] = cr * dbr - ci * dbi, cr * dbi + ci * dbr
                p1r[0, n], p1i[0, n], p2r[0, n], p2i[0, n] = 1, 0, 1, 0
                if m > 1:
                    p1r[1, n], p1i[1, n] = dar, dai
                if nb > 1:
                    e = _np.exp(zr * m)
                    p2r[1, n], p2i[1, n] = e * _np.cos(zi * m), e * _np.sin(zi * m)
            for a in range(2, m):
                for n in range(N):
                    p1r[a, n] = p1r[a - 1, n] * p1r[1, n] - p1i[a - 1, n] * p1i[1, n]
                    p1i[a, n] = p1r[a - 1, n] * p1i[1, n] + p1i[a - 1, n] * p1r[1, n]
            for b in range(2, nb):
                for n in range(N):
                    p2r[b, n] = p2r[b - 1, n] * p2r[1, n] - p2i[b - 1, n] * p2i[1, n]
                    p2i[b, n] = p2r[b - 1, n] * p2i[1, n] + p2i[b - 1, n] * p2r[1, n]
            wr, wi = aux[h, 6], aux[h, 7]
            for a in range(m):  # q = W exp(a z)
                for n in range(N):
                    qr[a, n] = wr[n] * p1r[a, n] - wi[n] * p1i[a, n]
                    qi[a, n] = wr[n] * p1i[a, n] + wi[n] * p1r[a, n]
            for b in range(nb):
                for a in range(m):
                    l = a + m * b
                    if l >= L:
                        break
                    acc = K.dtype.type(0)
                    for n in range(N):
                        acc += qr[a, n] * p2r[b, n] - qi[a, n] * p2i[b, n]
                    K[h, l] = 2 * acc

    @_nb.njit(nogil=True, fastmath=True, cache=True)
    def _nb_kernel_bwd(log_dt, C, gK, P1, P2, aux, g_log_dt, g_lar, g_aim, gC):  # pragma: no cover
        # gK [H, L], log_dt, C and what the forward kept -> the gradients of log_dt [H], lar, aim [H, N],
        # C [H, N, 2]
        H, L = gK.shape
        N, m, nb = aux.shape[2], P1.shape[2], P2.shape[2]
        t0r, t0i = _np.empty(N, gK.dtype), _np.empty(N, gK.dtype)
        t1r, t1i = _np.empty(N, gK.dtype), _np.empty(N, gK.dtype)
        s0r, s0i = _np.empty(N, gK.dtype), _np.empty(N, gK.dtype)
        s1r, s1i = _np.empty(N, gK.dtype), _np.empty(N, gK.dtype)
        for h in range(H):
            p1r, p1i, p2r, p2i = P1[h, 0], P1[h, 1], P2[h, 0], P2[h, 1]
            s0r[:], s0i[:], s1r[:], s1i[:] = 0, 0, 0, 0
            for b in range(nb):
                # T0 = sum_a g_{a+mb} conj(exp(a z)), T1 = sum_a a g_{a+mb} conj(exp(a z))
                t0r[:], t0i[:], t1r[:], t1i[:] = 0, 0, 0, 0
                for a in range(min(m, L - m * b)):
                    g = gK[h, a + m * b]
                    ga = g * a
                    for n in range(N):
                        t0r[n] += g * p1r[a, n]
                        t0i[n] -= g * p1i[a, n]
                        t1r[n] += ga * p1r[a, n]
                        t1i[n] -= ga * p1i[a, n]
                mb = gK.dtype.type(m * b)
                for n in range(N):  # S0 += conj(exp(m b z)) T0, S1 += conj(exp(m b z)) (T1 + m b T0)
                    vr, vi = p2r[b, n], -p2i[b, n]
                    ur, ui = t1r[n] + mb * t0r[n], t1i[n] + mb * t0i[n]
                    s0r[n] += vr * t0r[n] - vi * t0i[n]
                    s0i[n] += vr * t0i[n] + vi * t0r[n]
                    s1r[n] += vr * ur - vi * ui
                    s1i[n] += vr * ui + vi * ur
            dt = _np.exp(log_dt[h])
            gdt = gK.dtype.type(0)
            for n in range(N):
                ar, ai, dar, dai = aux[h, 0, n], aux[h, 1, n], aux[h, 2, n], aux[h, 3, n]
                dbr, dbi, wr, wi = aux[h, 4, n], aux[h, 5, n], aux[h, 6, n], aux[h, 7, n]
                cr, ci = C[h, n, 0], C[h, n, 1]
                gwr, gwi = 2 * s0r[n], 2 * s0i[n]  # dL/dW = 2 S0
                gzr = 2 * (wr * s1r[n] + wi * s1i[n])  # dL/dz = 2 conj(W) S1
                gzi = 2 * (wr * s1i[n] - wi * s1r[n])
                gC[h, n, 0], gC[h, n, 1] = gwr * dbr + gwi * dbi, gwi * dbr - gwr * dbi  # gW conj(dB)
                gbr, gbi = gwr * cr + gwi * ci, gwi * cr - gwr * ci  # gdB = gW conj(C)
                den = ar * ar + ai * ai
                # dB = (dA - 1) / A: gdA = gdB conj(1 / A) = gdB A / |A|^2, gA = -gdB conj(dB / A)
                gzr += ((gbr * ar - gbi * ai) * dar + (gbr * ai + gbi * ar) * dai) / den  # += gdA conj(dA)
                gzi += ((gbr * ai + gbi * ar) * dar - (gbr * ar - gbi * ai) * dai) / den
                qr, qi = dbr * ar + dbi * ai, dbr * ai - dbi * ar  # conj(dB) A = |A|^2 conj(dB / A)
                gar = -(gbr * qr - gbi * qi) / den + gzr * dt  # z = dt A: gA += gz dt
                gai = -(gbr * qi + gbi * qr) / den + gzi * dt
                gdt += gzr * ar + gzi * ai  # dL/d dt = Re(gz conj(A))
                g_lar[h, n] = gar * ar  # A = -exp(log_A_real) + i A_imag
                g_aim[h, n] = gai
            g_log_dt[h] = gdt * dt


class _NumbaKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_dt: Tensor, log_A_real: Tensor, A_imag: Tensor, C: Tensor, L: int) -> Tensor:
        ins = [t.contiguous() for t in (log_dt, log_A_real, A_imag, C)]
        (H, N), m, nb = log_A_real.shape, *kernel_blocks(L)
        new = ins[1].new_empty
        K, P1, P2, aux = new(H, L), new(H, 2, m, N), new(H, 2, nb, N), new(H, 8, N)
        _nb_kernel_fwd(*(t.numpy() for t in (*ins, K, P1, P2, aux)))
        ctx.save_for_backward(ins[0], ins[3], P1, P2, aux)
        return K

    @staticmethod
    def backward(ctx, gK: Tensor):
        log_dt, C, P1, P2, aux = ctx.saved_tensors
        H, N = aux.shape[0], aux.shape[2]
        grads = [torch.empty_like(log_dt), aux.new_empty(H, N), aux.new_empty(H, N), torch.empty_like(C)]
        _nb_kernel_bwd(*(t.numpy() for t in (log_dt, C, gK.contiguous(), P1, P2, aux, *grads)))
        return (*grads, None)


def kernel_uses_numba(x: Tensor) -> bool:
    """Whether `s4d_kernel` takes the numba loops for tensors on x's device: CPU with numba installed
    (a dependency); elsewhere the reference, which is also the fast path on a GPU."""
    return _nb is not None and x.device.type == "cpu"


def s4d_kernel(log_dt: Tensor, log_A_real: Tensor, A_imag: Tensor, C: Tensor, L: int,
               rtype: torch.dtype = torch.float32) -> Tensor:
    """`s4d_kernel_ref`, through the numba pass where `kernel_uses_numba`: log_dt [H], log_A_real,
    A_imag [H, N/2], C [H, N/2, 2] -> K [H, L] in `rtype` (float32 or float64)."""
    if rtype not in (torch.float32, torch.float64):
        raise ValueError(f"s4d_kernel: rtype must be float32 or float64, got {rtype}")
    if not kernel_uses_numba(log_dt):
        return s4d_kernel_ref(log_dt, log_A_real, A_imag, C, L, rtype)
    return _NumbaKernel.apply(*(p.to(rtype) for p in (log_dt, log_A_real, A_imag, C)), L)
