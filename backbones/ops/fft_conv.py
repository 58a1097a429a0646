"""Causal convolution along the last dim through FFTs of length >= 2L (S4D's and S5's training scan).

    y_t = sum_{s <= t} k_{t-s} u_s        u [..., C, L], k [C, L] (shared by the leading dims)
                                          or, with dim=-2, u [..., L, C], k [L, C]

`fft_causal_conv_ref` is the autograd reference. `fft_causal_conv` computes the same forward
with a hand-written backward: the gradients are correlations, each one FFT product,

    grad_u = irfft(FFT(g) * conj(FFT(k)))[:L]      grad_k = irfft(sum_lead FFT(g) * conj(FFT(u)))[:L]

reusing the forward's spectra, so a backward costs one forward FFT of g and one inverse FFT
per input (autograd takes a complex FFT for each rfft, plus the padding and slicing copies;
~30% of the convolution's time at the demo's shapes). Real inputs use rfft/irfft, complex inputs
fft/ifft (complex gradients in PyTorch's convention: the adjoint applied to the conjugate).

`fft_causal_conv_skip` is S4D's whole SSM in training, y = K * u + D u on channels-last [B, L, H]
tensors, one autograd node: the input is transposed straight into the zero-padded buffer the FFT
reads, and the transposed output is added onto D u, so the transposes cost no copies of their own.
It computes the same bits as `fft_causal_conv` on the transposed input plus D u.
"""

from __future__ import annotations

import scipy.fft
import torch
from torch import Tensor


def fft_len(L: int) -> int:
    """FFT length for a causal convolution of L points: the smallest fast length (factors 2, 3, 5, 7,
    11) >= 2L. A length with a large prime factor is 2-3x slower (344 = 8 x 43: 1.8 ms for a
    [16, 128] batch of real FFTs here, 360: 0.8 ms)."""
    return scipy.fft.next_fast_len(2 * L, real=True)


def _ffts(x: Tensor) -> tuple:
    return (torch.fft.fft, torch.fft.ifft) if x.is_complex() else (torch.fft.rfft, torch.fft.irfft)


def fft_causal_conv_ref(u: Tensor, k: Tensor, dim: int = -1) -> Tensor:
    """The reference (autograd through torch.fft): u [..., C, L], k [C, L] -> [..., C, L]
    (dim=-2: [..., L, C])."""
    L = u.shape[dim]
    n = fft_len(L)
    fwd, inv = _ffts(u)
    return inv(fwd(u, n=n, dim=dim) * fwd(k, n=n, dim=dim), n=n, dim=dim).narrow(dim, 0, L)


class _FFTCausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, k: Tensor, dim: int) -> Tensor:
        L = u.shape[dim]
        n = fft_len(L)
        fwd, inv = _ffts(u)
        U, Kf = fwd(u, n=n, dim=dim), fwd(k, n=n, dim=dim)  # [..., C, F], [C, F] (or F before C)
        ctx.save_for_backward(U, Kf)
        ctx.ffts, ctx.dim = (fwd, inv), dim
        return inv(U * Kf, n=n, dim=dim).narrow(dim, 0, L)

    @staticmethod
    def backward(ctx, g: Tensor):
        U, Kf = ctx.saved_tensors
        dim = ctx.dim
        L = g.shape[dim]
        n = fft_len(L)
        fwd, inv = ctx.ffts
        G = fwd(g, n=n, dim=dim)  # as U
        gu = gk = None
        if ctx.needs_input_grad[0]:
            gu = inv(G * Kf.conj(), n=n, dim=dim).narrow(dim, 0, L)
        if ctx.needs_input_grad[1]:
            gk = inv((G * U.conj()).reshape(-1, *Kf.shape).sum(0), n=n, dim=dim).narrow(dim, 0, L)
        return gu, gk, None


def fft_causal_conv(u: Tensor, k: Tensor, dim: int = -1) -> Tensor:
    """y_t = sum_{s<=t} k_{t-s} u_s along the last dim: u [..., C, L], k [C, L] -> [..., C, L]
    (both real or both complex); dim=-2: along the second last, u [..., L, C], k [L, C].
    FFTs along a strided dim are slower on a CPU than along contiguous rows (real ~2x, complex
    ~1.6x: the library copies each batch into rows first), more than the transposes that make the
    rows contiguous cost (S4D and S5 run channel-major). The two layouts agree to float tolerance,
    not always bit for bit (the FFT library picks its algorithm by layout and batch)."""
    if dim not in (-1, -2) or u.is_complex() != k.is_complex() or u.shape[-2:] != k.shape:
        raise ValueError(
            f"fft_causal_conv: u [..., C, L] and k [C, L] (dim -1) or u [..., L, C] and k [L, C] (dim -2), "
            f"both real or both complex, expected; got u {u.dtype} {tuple(u.shape)}, k {k.dtype} "
            f"{tuple(k.shape)}, dim {dim}"
        )
    return _FFTCausalConv.apply(u.contiguous(), k.contiguous(), dim)


def _rfft_channels(x: Tensor, n: int) -> Tensor:
    """rfft of length n along L of channels-last x [B, L, H] -> [B, H, n // 2 + 1]: x transposed straight
    into the zero-padded buffer the transform reads (one copy; rfft(n=n) of the transpose pads a second)."""
    buf = x.new_zeros(x.shape[0], x.shape[2], n)
    buf[..., : x.shape[1]].copy_(x.transpose(1, 2))
    return torch.fft.rfft(buf)


class _FFTCausalConvSkip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, k: Tensor, D: Tensor) -> Tensor:  # u [B, L, H], k [H, L], D [H]
        L = u.shape[1]
        n = fft_len(L)
        U, Kf = _rfft_channels(u, n), torch.fft.rfft(k, n=n)  # [B, H, F], [H, F]
        ctx.save_for_backward(u, D, U, Kf)
        return torch.mul(u, D).add_(torch.fft.irfft(U * Kf, n=n)[..., :L].transpose(1, 2))  # [B, L, H]

    @staticmethod
    def backward(ctx, g: Tensor):  # g [B, L, H]
        u, D, U, Kf = ctx.saved_tensors
        L = g.shape[1]
        n = fft_len(L)
        G = _rfft_channels(g, n)
        gu = gk = gD = None
        if ctx.needs_input_grad[0]:
            gu = torch.mul(g, D).add_(torch.fft.irfft(G * Kf.conj(), n=n)[..., :L].transpose(1, 2))
        if ctx.needs_input_grad[1]:
            gk = torch.fft.irfft((G * U.conj()).sum(0), n=n)[..., :L]
        if ctx.needs_input_grad[2]:
            gD = (g * u).sum((0, 1))
        return gu, gk, gD


def fft_causal_conv_skip(u: Tensor, k: Tensor, D: Tensor) -> Tensor:
    """y = K * u + D u along L for real channels-last u [B, L, H], k [H, L], D [H] -> y [B, L, H]
    (contiguous); `fft_causal_conv(u.transpose(1, 2), k).transpose(1, 2) + u * D` bit for bit."""
    if (u.dim() != 3 or u.is_complex() or k.shape != (u.shape[2], u.shape[1]) or D.shape != (u.shape[2],)
            or k.dtype != u.dtype or D.dtype != u.dtype):
        raise ValueError(
            f"fft_causal_conv_skip: real u [B, L, H], k [H, L] and D [H] of one dtype expected; got u {u.dtype} "
            f"{tuple(u.shape)}, k {k.dtype} {tuple(k.shape)}, D {D.dtype} {tuple(D.shape)}"
        )
    return _FFTCausalConvSkip.apply(u.contiguous(), k.contiguous(), D)
