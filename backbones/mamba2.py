"""Mamba2 (state-space duality, SSD; Dao & Gu 2024), laid out as state-spaces/mamba's `Mamba2` module.

    in_proj: x -> (z, x, B, C, dt)
    causal depthwise conv + SiLU over (x, B, C)
    SSD: h_t = exp(dt_t * A) h_{t-1} + dt_t * x_t B_t^T,  y_t = h_t C_t + D * x_t
         (scalar A per head, dt = softplus(dt + dt_bias), B/C shared by the heads of a group)
    gated RMSNorm: y = rmsnorm(y * silu(z)) (per group), then out_proj

Training uses the chunked SSD algorithm: a pure-PyTorch version (CPU, and the GPU
fallback; no data-dependent Python control flow, so torch.compile can trace it) or,
on CUDA when `mamba_ssm` is installed, its Triton kernel `mamba_chunk_scan_combined`.
On CPU in float32 the conv + SiLU, the gated norm and the end of the SSD backward run as
numba kernels (`backbones.ops.fused_cpu`; kernel="reference" runs the torch code beside them),
and in_proj's product is padded to a multiple of 8 columns (MKL's faster shapes).
Both accept an initial state and return the final one, so `forward(x, state)`
continues a sequence (prefill). Decoding uses the recurrence one token at a time: on float32 CPU
tensors as one numba pass from in_proj's output to the gated norm (`fused_cpu.mamba2_step_fused`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import FlopCounterMode

from backbones.base import Backbone, Mixer, State, register, step_linear, while_unchanged
from backbones.ops import fused_cpu
from backbones.ops.dispatch import KernelSwitch, check_mode, kernel_available, load_kernel
from backbones.ops.fused_cpu import numba_note, numba_usable, step_usable

MAMBA2_KNOBS = ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "kernel", "use_kernel")

#: mamba_ssm's Triton SSD kernel (chunk scan with initial/final states, dt_bias and softplus fused)
SSD_KERNEL = ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")
#: its decoding step (one token through the recurrence, state updated in place)
STEP_KERNEL = ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update")
#: its gated RMSNorm, rmsnorm(y * silu(z)) per group (norm_before_gate=False)
NORM_KERNEL = ("mamba_ssm.ops.triton.layernorm_gated", "rmsnorm_fn")


def _chunk_scan_kernel():
    """mamba_ssm's Triton SSD kernel, or None when it does not import (the reason is in
    `backbones.ops.dispatch.load_kernel`'s error)."""
    return load_kernel(*SSD_KERNEL) if kernel_available(*SSD_KERNEL) else None


def _check_numba(t: Tensor) -> None:
    if not numba_usable(t):
        raise ValueError(f"numba=True needs numba installed and float32 CPU tensors, got {t.dtype} on "
                         f"{t.device.type} (numba {'installed' if fused_cpu.AVAILABLE else 'missing'})")


# ----------------------------------------------------------------------------- SSD


def segsum(x: Tensor) -> Tensor:
    """Stable segment sums: `x [..., T] -> [..., T, T]`, out[i, j] = x[j+1] + ... + x[i]
    for i >= j (0 on the diagonal) and -inf above it, so exp(out) is the decay from j to i."""
    T = x.shape[-1]
    keep = torch.ones(T, T, dtype=torch.bool, device=x.device)
    xx = x[..., :, None].expand(*x.shape, T)  # [..., T(i), T(j)] = x[i]
    xx = xx.masked_fill(~keep.tril(-1), 0.0)
    out = xx.cumsum(-2)  # out[i, j] = sum_{j < k <= i} x[k]
    return out.masked_fill(~keep.tril(0), -math.inf)


#: log of (a margin above) the smallest normal number of the SSM's dtypes: the lowest decay exponent kept
_DECAY_FLOOR = {torch.float32: math.log(torch.finfo(torch.float32).tiny) + 8.0,
                torch.float64: math.log(torch.finfo(torch.float64).tiny) + 8.0}


#: the largest spread of the cumulative log-decay within a chunk (its range, max - min) for which
#: `_SSDScan` factorises the decays: its factors exp(+-spread / 2) = exp(+-60) are normal float32
#: numbers and values up to 1e12 times them stay finite; float64 keeps the same limit (at spreads
#: of several hundred, dA's gradient, a sum of differences of large terms, drifts by ~1e-9)
_FACTOR_LIMIT = {torch.float32: 120.0, torch.float64: 120.0}


def _chunk_ways(spread: Tensor) -> bool | Tensor:
    """How `_SSDScan` runs each chunk's within-chunk part, from the spread of its cumulative
    log-decay [b, c, 1, h]: True (all factorised), False (all with the decay matrix) or a [b c]
    bool mask (True: factorised). A mix runs when at least 3/4 of the chunks factorise (the rest
    then run both ways; with more of them, the decay matrix alone is faster). Never factorised
    without data (torch.compile tracing: no data-dependent branch; fake or meta tensors: FLOP
    counting, where both ways run the same matmuls)."""
    if torch.compiler.is_compiling() or is_fake(spread) or spread.is_meta:
        return False
    ok = (spread <= _FACTOR_LIMIT.get(spread.dtype, -1.0)).all(-1).flatten()  # [b c]
    n = int(ok.sum())
    return True if n == ok.numel() else (False if 4 * n < 3 * ok.numel() else ok)


def _diag_by_matrix(CB: Tensor, Acs: Tensor, xdt: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Within-chunk outputs with the decay matrix L = exp(Acs_i - Acs_j) per head, any decays:
    CB [N, g, q, q] (causal), Acs [N, q, h], xdt [N, q, h, p] -> y [N, q, h, p], and (xh, L, S) for
    the backward. L's upper triangle is exp(0) (exp is slower at -inf; CB masks it) and decays
    below the smallest normal number are clamped there (denormals are slow): exact to float tolerance."""
    N, q, h, p = xdt.shape
    g = CB.shape[1]
    Ah = Acs.view(N, q, g, h // g).permute(0, 2, 3, 1).contiguous()  # [N, g, hg, q]
    xh = xdt.view(N, q, g, h // g, p).permute(0, 2, 3, 1, 4).contiguous()  # [N, g, hg, q, p]
    L = (Ah[..., :, None] - Ah[..., None, :]).clamp_(_DECAY_FLOOR.get(xdt.dtype, -math.inf), 0.0).exp_()
    S = L * CB[:, :, None]  # [N, g, hg, q, q]
    return (S @ xh).permute(0, 3, 1, 2, 4).reshape(N, q, h, p), (xh, L, S)


def _diag_by_matrix_backward(saved: tuple[Tensor, ...], gy: Tensor) -> tuple[Tensor, Tensor]:
    """`_diag_by_matrix` backwards: gy [N, q, h, p] -> (d CB [N, g, q, q], d xdt [N, q, h, p])."""
    xh, L, S = saved
    N, g, hg, q, p = xh.shape
    gyh = gy.reshape(N, q, g, hg, p).permute(0, 2, 3, 1, 4).contiguous()  # [N, g, hg, q, p]
    gCB = (gyh @ xh.transpose(-1, -2)).mul_(L).sum(2).tril_()  # one [.., q, q] product, summed over heads
    return gCB, (S.transpose(-1, -2) @ gyh).permute(0, 3, 1, 2, 4).reshape(N, q, g * hg, p)


def _pass_states(states: Tensor, decay: Tensor, initial: Tensor) -> tuple[Tensor, Tensor]:
    """h_in(z + 1) = decay(z) h_in(z) + states(z) over the c chunks: states [b, c, g, n, hg, p],
    decay [b, c, g, 1, hg, 1], initial [b, g, n, hg, p] -> (h_in(0 .. c-1) [b, c, g, n, hg, p],
    the final state h_in(c) [b, g, n, hg, p])."""
    c = states.shape[1]
    hin = torch.empty_like(states)
    hin[:, 0] = initial
    for z in range(c - 1):  # written straight into hin (no copy per chunk)
        torch.addcmul(states[:, z], hin[:, z], decay[:, z], out=hin[:, z + 1])
    return hin, torch.addcmul(states[:, -1], hin[:, -1], decay[:, -1])


def _pass_states_backward(gH: Tensor, gfinal: Tensor, decay: Tensor) -> tuple[Tensor, Tensor]:
    """`_pass_states` backwards: d h_in(z) [b, c, g, n, hg, p] (z < c) -> (d states, d initial)."""
    c = gH.shape[1]
    gstates = torch.empty_like(gH)  # d states(z) = d h_in(z + 1)
    gstates[:, -1] = gfinal
    for z in range(c - 1, 0, -1):
        torch.addcmul(gH[:, z], gstates[:, z], decay[:, z], out=gstates[:, z - 1])
    return gstates, torch.addcmul(gH[:, 0], gstates[:, 0], decay[:, 0])


class _SSDScan(torch.autograd.Function):
    """The chunked SSD scan as one autograd Function, forward and backward written out: x [b, l, h, p],
    dt [b, l, h], A [h], B, C [b, l, g, n], D [h] or None, initial state [b, h, p, n] or None
    -> y [b, l, h, p], final state [b, h, p, n]. In the layout of the input, [b, c, q, h, p]
    (heads of a group side by side, so the matmuls run over hg p columns), with Acs the
    cumulative log-decay within each chunk:
      1. within each chunk   y_i = sum_{j <= i} (C_i . B_j) exp(Acs_i - Acs_j) x_j dt_j
      2. chunk-end states    B^T (x dt exp(Acs_last - Acs))
      3. state passing       h_in(z + 1) = exp(Acs_last(z)) h_in(z) + states(z)  (c steps)
      4. entering state      y_i += exp(Acs_i) C_i h_in,  and the skip  y_i += D x_i

    Step 1 runs one of two ways per chunk, the same to float tolerance:
      - factorised, when Acs spans at most _FACTOR_LIMIT in the chunk:
        exp(Acs_i - Acs_j) = exp(Acs_i - m) exp(m - Acs_j) (m the middle of the chunk's range), so
        y = exp(Acs - m) * (tril(C B^T) @ (x dt exp(m - Acs))) is one matmul per (batch, chunk,
        group) over all its heads, sharing C B^T, and no [b, c, h, q, q] tensor exists (no factor
        over- or underflows within the limit);
      - else with the decay matrix L = exp(Acs_i - Acs_j) per head (`_diag_by_matrix`, any decays).
    Backward: by the chain rule, the decays' gradient in two reductions,
    d Acs = (gy * y).sum(p) - (x dt * d(x dt)).sum(p), plus d h_in(z + 1) . h_in(z + 1) at each
    chunk's last position (every exp(+-Acs) factor cancels into these)."""

    @staticmethod
    def forward(ctx, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                initial_state: Tensor | None, chunk_size: int, numba: bool) -> tuple[Tensor, Tensor]:
        ctx.numba = numba
        with torch.autocast(x.device.type, enabled=False):  # the SSM's dtype (>= fp32), as the backward
            return _SSDScan._forward(ctx, x, dt, A, B, C, D, initial_state, chunk_size)

    @staticmethod
    def _forward(ctx, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                 initial_state: Tensor | None, chunk_size: int) -> tuple[Tensor, Tensor]:
        b, l, h, p = x.shape
        g, n = B.shape[-2:]
        hg = h // g
        x, dt, B, C, q, c = _pad_to_chunks(x, dt, B, C, chunk_size)
        xdt = (x * dt[..., None]).view(b, c, q, h, p)
        Acs = (dt * A).view(b, c, q, h).cumsum(2)  # [b, c, q, h]
        Bt = B.view(b, c, q, g, n).permute(0, 1, 3, 4, 2)  # [b, c, g, n, q]
        Cg = C.view(b, c, q, g, n).transpose(2, 3)  # [b, c, g, q, n]
        CB = (Cg @ Bt).tril_()  # [b, c, g, q, q]

        # 2.-4. chunk-end states, passed across chunks, entering each chunk's outputs
        last = Acs[:, :, -1:]  # [b, c, 1, h]
        xw = xdt * torch.exp(last - Acs)[..., None]  # [b, c, q, h, p]
        states = (Bt @ _grouped(xw, g)).view(b, c, g, n, hg, p)
        decay = torch.exp(last).view(b, c, g, 1, hg, 1)
        if initial_state is None:
            h0 = x.new_zeros(b, g, n, hg, p)
        else:
            h0 = initial_state.to(x.dtype).view(b, g, hg, p, n).permute(0, 1, 4, 2, 3)  # [b, g, n, hg, p]
        hin, final = _pass_states(states, decay, h0)  # [b, c, g, n, hg, p], [b, g, n, hg, p]
        E = torch.exp(Acs)[..., None]  # [b, c, q, h, 1]
        y = _ungrouped(Cg @ hin.view(b, c, g, n, hg * p), h).mul_(E)  # [b, c, q, h, p]

        # 1. within each chunk: factorised where the decays allow, else with the decay matrix
        lo, hi = Acs.amin(2, keepdim=True), Acs.amax(2, keepdim=True)  # [b, c, 1, h]
        way, N = _chunk_ways(hi - lo), b * c
        if way is False:
            yd, saved = _diag_by_matrix(CB.view(N, g, q, q), Acs.view(N, q, h), xdt.view(N, q, h, p))
            y += yd.view(b, c, q, h, p)
        else:
            half = _FACTOR_LIMIT[x.dtype] / 2
            rel = (Acs - (lo + hi) / 2).clamp_(-half, half)  # exact where factorised, finite elsewhere
            eo, ei = rel.exp()[..., None], rel.neg_().exp_()[..., None]  # [b, c, q, h, 1]
            u = xdt * ei  # [b, c, q, h, p]
            yd = _ungrouped(CB @ _grouped(u, g), h).mul_(eo)
            saved = (eo, ei, u)
            if way is not True:  # the chunks past the limit, again with the decay matrix
                idx = (~way).nonzero()[:, 0]
                ym, sm = _diag_by_matrix(CB.view(N, g, q, q)[idx], Acs.view(N, q, h)[idx],
                                         xdt.view(N, q, h, p)[idx])
                yd.view(N, q, h, p)[idx] = ym
                saved = (*saved, idx, *sm)
            y += yd
        y = y.view(b, c * q, h, p)  # kept without the skip for the backward (d Acs, no cancellation)
        # contiguous (no copy after), the skip added here: its gradients are two terms of the backward
        out = y[:, :l] if D is None else torch.addcmul(y[:, :l], x[:, :l], D[:, None])
        ctx.save_for_backward(x, dt, A, Bt, Cg, CB, D, Acs, xdt, xw, hin, final, y, *saved)
        ctx.shape = (b, l, h, p, g, n, q, c, initial_state is not None, way is False)
        return out, final.permute(0, 1, 3, 4, 2).reshape(b, h, p, n)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: Tensor, gfinal: Tensor):
        x, dt, A, Bt, Cg, CB, D, Acs, xdt, xw, hin, final, y, *saved = ctx.saved_tensors
        b, l, h, p, g, n, q, c, has_init, by_matrix = ctx.shape
        hg = h // g
        gy = gy.to(x.dtype)
        if c * q != l:
            gy = F.pad(gy, (0, 0, 0, 0, 0, c * q - l))
        gy = gy.contiguous().view(b, c, q, h, p)

        # 4.-2.: y += exp(Acs) C h_in, h_in passed across chunks, states = B^T xw
        gZ = _grouped(gy * torch.exp(Acs)[..., None], g)  # [b, c, g, q, hg p]
        gH = (Cg.transpose(-1, -2) @ gZ).view(b, c, g, n, hg, p)
        gC = gZ @ hin.view(b, c, g, n, hg * p).transpose(-1, -2)  # [b, c, g, q, n]
        gfinal = gfinal.to(x.dtype).view(b, g, hg, p, n).permute(0, 1, 4, 2, 3)  # [b, g, n, hg, p]
        gstates, ginit = _pass_states_backward(gH, gfinal, torch.exp(Acs[:, :, -1:]).view(b, c, g, 1, hg, 1))
        gend = torch.empty(b, c, g, hg, dtype=x.dtype, device=x.device)  # d Acs_last through decay and xw:
        gend[:, :-1] = (gstates[:, :-1] * hin[:, 1:]).sum((3, 5))  # d h_in(z + 1) . h_in(z + 1)
        gend[:, -1] = (gstates[:, -1] * final).sum((2, 4))
        gs = gstates.view(b, c, g, n, hg * p)
        gBt = gs @ _grouped(xw, g).transpose(-1, -2)  # [b, c, g, n, q]
        G1 = _ungrouped(Bt.transpose(-1, -2) @ gs, h)  # d(x dt) through the states, times f1
        f1 = torch.exp(Acs[:, :, -1:] - Acs)  # [b, c, q, h]

        # 1. within each chunk
        N = b * c
        fast = ctx.numba and not by_matrix and len(saved) == 3
        if by_matrix:
            gCB, gxd = _diag_by_matrix_backward(saved, gy.view(N, q, h, p))
            gCB = gCB.view(b, c, g, q, q)
        else:
            eo, ei, u = saved[:3]
            gin = _grouped(gy * eo, g)  # [b, c, g, q, hg p]
            gCB = (gin @ _grouped(u, g).transpose(-1, -2)).tril_()  # [b, c, g, q, q]
            gxd = _ungrouped(CB.transpose(-1, -2) @ gin, h)  # times ei
            if not fast:
                gxd.mul_(ei)
            if len(saved) > 3:  # the chunks run with the decay matrix
                idx, *sm = saved[3:]
                gCB.view(N, g, q, q)[idx], gxd.view(N, q, h, p)[idx] = _diag_by_matrix_backward(
                    sm, gy.view(N, q, h, p)[idx])
        gC += gCB @ Bt.transpose(-1, -2)
        gBt += Cg.transpose(-1, -2) @ gCB

        if fast:  # the decays, d x, d dt, d A and d D in one pass
            gx, gdt, gA, gD = fused_cpu.ssd_grad_tail(
                gy, y.view(b, c, q, h, p), xdt, G1, f1, gxd, ei[..., 0], x.view(b, c, q, h, p),
                dt.view(b, c, q, h), A, D, gend.view(b, c, h))
            gx, gdt = gx.view(b, c * q, h, p), gdt.view(b, c * q, h)
        else:
            gxdt = G1.mul_(f1[..., None]).add_(gxd.view(b, c, q, h, p))
            # the decays, then x dt = x * dt and Acs = cumsum(dt * A)
            gAcs = (gy * y.view(b, c, q, h, p)).sum(-1) - (xdt * gxdt).sum(-1)  # [b, c, q, h]
            gAcs[:, :, -1] += gend.view(b, c, h)
            gdA = gAcs.flip(2).cumsum(2).flip(2).view(b, c * q, h)  # reverse cumsum within each chunk
            gxdt, gy = gxdt.view(b, c * q, h, p), gy.view(b, c * q, h, p)
            gdt = gdA * A + (gxdt * x).sum(-1)
            gA = (gdA * dt).sum((0, 1))
            gx = gxdt * dt[..., None]
            gD = None
            if D is not None:
                gx.addcmul_(gy, D[:, None])
                gD = (gy * x).sum((0, 1, 3))
        gB = gBt.permute(0, 1, 4, 2, 3).reshape(b, c * q, g, n)
        gC = gC.transpose(2, 3).reshape(b, c * q, g, n)
        ginit = ginit.permute(0, 1, 3, 4, 2).reshape(b, h, p, n) if has_init else None
        return gx[:, :l], gdt[:, :l], gA, gB[:, :l], gC[:, :l], gD, ginit, None, None


def _grouped(t: Tensor, g: int) -> Tensor:
    """[b, c, q, h, p] -> [b, c, g, q, hg p] (a view; contiguous for one group)."""
    b, c, q, h, p = t.shape
    return t.view(b, c, q, g, h // g * p).transpose(2, 3)


def _ungrouped(t: Tensor, h: int) -> Tensor:
    """[b, c, g, q, hg p] -> [b, c, q, h, p] (a view for one group, else a copy)."""
    b, c, g, q, hgp = t.shape
    return t.transpose(2, 3).reshape(b, c, q, h, hgp // (h // g))


def _pad_to_chunks(x: Tensor, dt: Tensor, B: Tensor, C: Tensor, chunk_size: int):
    """Zero-pad the time axis to whole chunks: (x, dt, B, C, chunk q, number of chunks c)."""
    l = x.shape[1]
    q = min(chunk_size, l)
    pad = (-l) % q
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    return x, dt, B, C, q, (l + pad) // q


def _ssd_fused(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor | None,
    initial_state: Tensor | None, numba: bool,
) -> tuple[Tensor, Tensor]:
    """`ssd_chunked(fused=True)`."""
    if numba:
        _check_numba(x)
    return _SSDScan.apply(x, dt, A, B, C, D, initial_state, chunk_size, numba)


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    fused: bool = True,
    numba: bool = False,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan (the "minimal SSD" algorithm of the Mamba2 paper).

    x [b, l, h, p], dt [b, l, h] (already positive: after softplus), A [h] (negative),
    B, C [b, l, g, n] (head i uses group i // (h // g)), D [h], initial_state [b, h, p, n].
    Returns y [b, l, h, p] and the final state [b, h, p, n]. A length that is not a
    multiple of the chunk is zero-padded: dt = 0 there, so padding neither decays nor
    feeds the state.

    `fused=True` runs the whole scan as one autograd Function (`_SSDScan`: in-place mask/exp,
    a hand-written backward with no graph of small ops and no [b, h, c, q, q] gradient products
    beyond one); `fused=False` is the plain-autograd reference (tests check that both agree,
    forward and backward). `numba=True` (fused only; float32 CPU tensors) runs the last part of its
    backward, from d(x dt) to the gradients of x, dt, A and D, as one numba pass
    (`backbones.ops.fused_cpu.ssd_grad_tail`, equal to the torch lines to float rounding).
    """
    if fused:
        return _ssd_fused(x, dt, A, B, C, chunk_size, D, initial_state, numba)
    if numba:
        raise ValueError("ssd_chunked: numba=True needs fused=True (the reference is plain autograd)")
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    hg = h // g
    x0 = x
    x, dt, B, C, q, c = _pad_to_chunks(x, dt, B, C, chunk_size)
    x = x.reshape(b, c, q, h, p)
    B = B.reshape(b, c, q, g, n)
    C = C.reshape(b, c, q, g, n)
    dt = dt.reshape(b, c, q, h)

    dA = (dt * A).permute(0, 3, 1, 2)  # [b, h, c, q]
    Acs = dA.cumsum(-1)  # [b, h, c, q]
    xdt = x * dt[..., None]  # [b, c, q, h, p]

    # 1. within each chunk: y = (C B^T * decay mask) x dt  (the quadratic, attention-like form)
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp((Acs[..., :, None] - Acs[..., None, :]).masked_fill(~causal, -math.inf))  # [b, h, c, q, q]
    CB = torch.einsum("bclgn,bcsgn->bgcls", C, B)  # [b, g, c, q, q]
    scores = CB[:, :, None] * decay.view(b, g, hg, c, q, q)  # [b, g, hg, c, q, q]
    xh = xdt.permute(0, 3, 1, 2, 4).reshape(b, g, hg, c, q, p)  # [b, g, hg, c, q, p]
    y = scores @ xh  # [b, g, hg, c, q, p]

    # 2. the state each chunk leaves behind, starting from zero
    to_end = torch.exp(Acs[..., -1:] - Acs)  # [b, h, c, q]
    xw = (xh * to_end.view(b, g, hg, c, q, 1)).transpose(-1, -2)  # [b, g, hg, c, p, q]
    Bg = B.permute(0, 3, 1, 2, 4)[:, :, None]  # [b, g, 1, c, q, n]
    states = (xw @ Bg).reshape(b, h, c, p, n)  # [b, h, c, p, n]

    # 3. pass states across chunks: entering chunk z = sum_j decay(j -> z) * state_j
    if initial_state is None:
        initial_state = x.new_zeros(b, h, p, n)
    states = torch.cat([initial_state[:, :, None].to(states.dtype), states], dim=2)  # [b, h, c+1, p, n]
    chunk_decay = torch.exp(segsum(F.pad(Acs[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    states = (chunk_decay @ states.reshape(b, h, c + 1, p * n)).view(b, h, c + 1, p, n)
    final = states[:, :, -1]  # [b, h, p, n]
    states = states[:, :, :-1]  # [b, h, c, p, n]

    # 4. contribution of the entering state to each position: C_t h_in * decay(start -> t)
    Cg = C.permute(0, 3, 1, 2, 4)[:, :, None]  # [b, g, 1, c, q, n]
    y_off = Cg @ states.view(b, g, hg, c, p, n).transpose(-1, -2)  # [b, g, hg, c, q, p]
    y = y + y_off * torch.exp(Acs).view(b, g, hg, c, q, 1)

    y = y.reshape(b, h, c * q, p).transpose(1, 2)[:, :l]  # [b, l, h, p]
    if D is not None:
        y = y + x0 * D[:, None]
    return y, final


def pure_chunk_size(chunk_size: int, headdim: int, d_state: int, seq_len: int | None = None) -> int:
    """Chunk length of the pure-PyTorch scan: at most `chunk_size` and 1.5x the power of two
    nearest sqrt(P N), where the within-chunk work (~ L H Q) balances the chunk states
    (~ L H P N / Q); given `seq_len`, the sequence is then cut into equal chunks of at most that
    (at most c - 1 padded positions). The result does not depend on the chunk (up to rounding);
    the speed does: demo shapes (P 16, N 47, 176 positions) run 4 chunks of 44 about 5% faster
    per training step than 6 of 32 (16 padded) or 4 of 48 (CPU, factorised `_SSDScan`)."""
    q = max(1, min(chunk_size, 3 * 2 ** max(3, round(math.log2(math.sqrt(headdim * d_state)))) // 2))
    # ceil(seq_len / ceil(seq_len / q)): as many chunks as at length q, of equal length
    return q if not seq_len else -(-seq_len // -(-seq_len // q))


def ssd_flops_per_token(seq_len: int, chunk_size: int, nheads: int, headdim: int, d_state: int, ngroups: int) -> int:
    """Analytic FLOPs per token of one chunked SSD scan (forward), Q = min(chunk, seq_len):

        C B^T within the chunk          2 Q G N
        decay mask on the scores          Q H
        scores @ (x dt)                 2 Q H P
        chunk-end states B^T (x dt)     2 H P N
        state passing between chunks    2 H P N / Q
        C h_in for each position        2 H P N
        x * dt, D skip                  3 H P

    Multiply-adds count as 2. The in/out projections and the conv are matmuls, counted
    elsewhere. One recurrent decoding step costs about 5 H P N + 3 H P instead.
    """
    Q = max(1, min(chunk_size, seq_len))
    H, P, N, G = nheads, headdim, d_state, ngroups
    return int(2 * Q * G * N + Q * H + 2 * Q * H * P + 4 * H * P * N + 2 * H * P * N / Q + 3 * H * P)


# ----------------------------------------------------------------------------- conv


class _CausalConvSiLU(torch.autograd.Function):
    """silu(causal depthwise conv1d(x) + bias) in the channels-last layout of in_proj's output:
    x [b, l, c], weight [c, K], bias [c] -> [b, l, c], with zero history before t = 0.

    y_t = silu(bias + sum_k w_k x_{t-K+1+k}) as K shifted multiply-adds, so no transpose or
    channels-first copy is made; the backward is written out (silu', then K shifted
    multiply-adds for dx and K channel sums for dw) instead of the grouped-conv backward,
    which is slow for depthwise weights on CPU. `F.conv1d` is the reference (tests)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        l, K = x.shape[1], weight.shape[1]
        xp = F.pad(x, (0, 0, K - 1, 0))  # [b, K-1+l, c]
        wt = weight.t().contiguous()  # [K, c]
        pre = torch.addcmul(bias, xp[:, :l], wt[0])  # [b, l, c]
        for k in range(1, K):
            pre.addcmul_(xp[:, k : k + l], wt[k])
        ctx.save_for_backward(xp, wt, pre)
        return F.silu(pre)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        xp, wt, pre = ctx.saved_tensors
        K, l = wt.shape[0], pre.shape[1]
        gp = torch.ops.aten.silu_backward(g.contiguous(), pre)  # [b, l, c]: gradient of the pre-activation
        gx = gp * wt[K - 1]  # x_s feeds y_{s+K-1-k} through tap k (when s+K-1-k < l)
        for k in range(K - 1):
            shift = K - 1 - k
            if shift < l:
                gx[:, : l - shift].addcmul_(gp[:, shift:], wt[k])
        gw = torch.stack([(gp * xp[:, k : k + l]).sum((0, 1)) for k in range(K)], 1)  # [c, K]
        return gx, gw, gp.sum((0, 1))


def causal_conv_silu(x: Tensor, weight: Tensor, bias: Tensor, numba: bool = False,
                     sizes: tuple[int, ...] | None = None):
    """silu(causal depthwise conv(x)): x [b, l, c], weight [c, 1, K] (nn.Conv1d's), bias [c];
    computed in x's dtype, as F.conv1d under autocast. `sizes`: the output's consecutive channel
    segments (up to three), as `torch.split` gives them. `numba=True` (float32 CPU): the fused kernel
    `backbones.ops.fused_cpu.causal_conv_silu_fused` (each segment contiguous), else `_CausalConvSiLU`."""
    if numba:
        _check_numba(x)
        return fused_cpu.causal_conv_silu_fused(x, weight, bias, sizes)
    y = _CausalConvSiLU.apply(x, weight[:, 0].to(x.dtype), bias.to(x.dtype))
    return y if sizes is None else torch.split(y, list(sizes), -1)


# ----------------------------------------------------------------------------- mixer


class _GatedRMSNormFn(torch.autograd.Function):
    """rmsnorm(y * silu(z)) * weight per group of gs channels, forward and backward written out:
    y, z [..., G, gs], weight [G, gs] -> [..., G, gs]. With u = y silu(z), r = rsqrt(mean(u^2) + eps)
    and n = u r (per group): d u = r (gn - n mean(gn n)), gn = g * weight; d weight = sum g n."""

    @staticmethod
    def forward(ctx, y: Tensor, z: Tensor, weight: Tensor, eps: float) -> Tensor:
        s = F.silu(z)
        u = y * s
        uf = u.to(torch.promote_types(u.dtype, torch.float32))  # the mean square in at least float32
        r = torch.rsqrt(uf.square().mean(-1, keepdim=True).add_(eps))  # [..., G, 1]
        n = (u * r).to(u.dtype)
        ctx.save_for_backward(y, z, s, n, r, weight)
        return n * weight

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        y, z, s, n, r, weight = ctx.saved_tensors
        gw = (g * n).sum(tuple(range(g.dim() - 2)))  # [G, gs]
        gn = g * weight
        gu = gn.addcmul_(n, (gn * n).mean(-1, keepdim=True), value=-1.0).mul_(r.to(gn.dtype))
        gy = gu * s
        gz = torch.ops.aten.silu_backward(gu.mul_(y), z)
        return gy, gz, gw, None


class GatedRMSNorm(nn.Module):
    """rmsnorm(y * silu(z)) over groups of `group_size` channels (mamba_ssm's norm_before_gate=False)."""

    fused = True  # `_GatedRMSNormFn`; False runs `reference` (F.rms_norm and autograd)

    def __init__(self, d: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y: Tensor, z: Tensor, numba: bool = False) -> Tensor:
        """`numba=True` (float32 CPU, fused): `backbones.ops.fused_cpu.gated_rms_norm_fused`."""
        if not self.fused:
            return self.reference(y, z)
        shape, gs = y.shape, self.group_size
        fn = _GatedRMSNormFn.apply
        if numba:
            _check_numba(y)
            _check_numba(z)
            fn = fused_cpu.gated_rms_norm_fused
        out = fn(y.reshape(*shape[:-1], -1, gs), z.reshape(*shape[:-1], -1, gs), self.weight.view(-1, gs), self.eps)
        return out.reshape(shape)

    def reference(self, y: Tensor, z: Tensor) -> Tensor:
        y = y * F.silu(z)
        if self.group_size == y.shape[-1]:  # one group: the weight goes into rms_norm (one pass less)
            return F.rms_norm(y, (self.group_size,), self.weight, eps=self.eps)
        shape = y.shape
        y = y.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        y = F.rms_norm(y, (self.group_size,), eps=self.eps)
        return y.reshape(shape) * self.weight


#: in_proj's product is padded to a multiple of this many columns (`Mamba2Mixer._in_proj_split`)
_PAD = 8


class Mamba2Mixer(KernelSwitch, Mixer):
    """The Mamba2 sequence mixer. Decoding state: the conv window `[B, conv_dim, d_conv-1]`
    and the SSM state `[B, nheads, headdim, d_state]` (kept in at least float32)."""

    constant_state = True
    fused_ssd = True  # the pure path's scan: ssd_chunked(fused=True); False runs the autograd reference
    fused_conv = True  # the conv without a state: causal_conv_silu; False runs F.conv1d (the reference)

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 16,
        ngroups: int = 1,
        chunk_size: int = 64,
        kernel: str = "auto",
        use_kernel: bool | None = None,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        for knob, v in {"d_state": d_state, "d_conv": d_conv, "expand": expand, "headdim": headdim,
                            "ngroups": ngroups, "chunk_size": chunk_size}.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"mamba2: {knob} must be a positive integer, got {v!r}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.headdim, self.ngroups, self.chunk_size = headdim, ngroups, chunk_size
        self.kernel = check_mode("mamba2", kernel)
        if use_kernel is not None:  # the knob of runs before `kernel` existed: True meant "auto"
            self.kernel = "auto" if use_kernel else "reference"
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"mamba2: expand * d_model = {self.d_inner} is not divisible by headdim = {headdim}")
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"mamba2: nheads = {self.nheads} is not divisible by ngroups = {ngroups}")
        self.conv_dim = self.d_inner + 2 * ngroups * d_state

        # order: [z, x, B, C, dt]
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.ones(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self._init_ssm(A_init_range, dt_min, dt_max, dt_init_floor)
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    @torch.no_grad()
    def _init_ssm(self, A_init_range, dt_min, dt_max, dt_init_floor) -> None:
        """mamba_ssm's init: A uniform in A_init_range; dt log-uniform in [dt_min, dt_max],
        stored as dt_bias = softplus^-1(dt). Skipped on the meta device (shapes only, for
        parameter counting: arithmetic on meta tensors is slow the first time)."""
        if self.dt_bias.is_meta:
            return
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(*A_init_range).log())
        u = torch.rand_like(self.dt_bias)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    # -- helpers
    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _in_proj_split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """in_proj(x) split into z, xBC, dt, with the product's width padded to a multiple of
        `_PAD` by zero weight rows whose columns the split drops: MKL's GEMMs run 1.1x faster
        forward and backward on 624 columns than on 622 (the demo's width)."""
        w = self.in_proj.weight  # [width, d_model]
        pad = -w.shape[0] % _PAD
        if pad == 0:
            return self._split(self.in_proj(x))
        zxbcdt = F.linear(x, torch.cat([w, w.new_zeros(pad, w.shape[1])]))  # [..., width + pad]
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads, pad], dim=-1)[:3]

    def _ssm_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.promote_types(dtype, torch.float32)

    def forward(self, x: Tensor, state: State | None = None) -> Tensor:
        b, l, _ = x.shape
        z, xBC, dt = self._in_proj_split(x)  # [b, l, d_inner], [b, l, conv_dim], [b, l, h]
        nb = self.kernel != "reference" and numba_usable(xBC)  # the fused CPU kernels (backbones.ops.fused_cpu)
        via = numba_note(nb)

        # causal depthwise conv, continuing from the state's window when given
        sizes = [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state]
        if state is None and self.fused_conv:  # x, B, C: [b, l, d_inner], [b, l, g n] twice
            xs, Bm, Cm = causal_conv_silu(xBC, self.conv1d.weight, self.conv1d.bias, numba=nb, sizes=sizes)
            self.record_path("conv", None, "", "", f"backbones.mamba2.causal_conv_silu{via}")
        else:
            self.record_path("conv", None, "", "", "torch.nn.functional.conv1d")
            xt = xBC.transpose(1, 2)  # [b, conv_dim, l]
            if state is None:
                xt = F.pad(xt, (self.d_conv - 1, 0))
            else:
                xt = torch.cat([state["conv"].to(xt.dtype), xt], dim=-1)  # [b, conv_dim, d_conv-1+l]
                state["conv"].copy_(xt[:, :, xt.shape[-1] - (self.d_conv - 1) :])
            xBC = F.silu(F.conv1d(xt, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)).transpose(1, 2)
            xs, Bm, Cm = torch.split(xBC, sizes, -1)
        xs = xs.reshape(b, l, self.nheads, self.headdim)
        Bm = Bm.reshape(b, l, self.ngroups, self.d_state)
        Cm = Cm.reshape(b, l, self.ngroups, self.d_state)
        init = None if state is None else state["ssm"]

        kernel = self.pick_kernel(x, *SSD_KERNEL)  # CPU tensors too when asked (Triton interpreter)
        sd = self._ssm_dtype(x.dtype)
        snb = nb and self.fused_ssd and sd == torch.float32
        self.record_path("scan", kernel, *SSD_KERNEL, "backbones.mamba2.ssd_chunked" + (via if snb else ""))
        if kernel is not None:
            A = -torch.exp(self.A_log.float())
            out = kernel(
                xs, dt, A, Bm, Cm, chunk_size=self.chunk_size, D=self.D, dt_bias=self.dt_bias,
                dt_softplus=True, initial_states=None if init is None else init.float(),
                return_final_states=state is not None,
            )
            y, final = (out if state is not None else (out, None))
        else:
            dts = F.softplus(dt.to(sd) + self.dt_bias.to(sd))  # [b, l, h]
            A = -torch.exp(self.A_log.to(sd))  # [h]
            y, final = ssd_chunked(
                xs.to(sd), dts, A, Bm.to(sd), Cm.to(sd),
                pure_chunk_size(self.chunk_size, self.headdim, self.d_state, l),
                self.D.to(sd), None if init is None else init.to(sd), fused=self.fused_ssd,
                numba=snb,
            )
        if state is not None:
            state["ssm"].copy_(final)
        y = y.to(x.dtype).reshape(b, l, self.d_inner)
        return self.out_proj(self._gated_norm(y, z, nb, record=True))

    def _gated_norm(self, y: Tensor, z: Tensor, numba: bool = False, record: bool = False) -> Tensor:
        """`numba`: the fused CPU kernel (the parallel forward; decoding steps run the eager norm and
        record their path under "step"); `record`: record the path under "norm"."""
        kernel = self.pick_kernel(y, *NORM_KERNEL)
        numba = numba and kernel is None and self.norm.fused
        if record:
            self.record_path("norm", kernel, *NORM_KERNEL, f"backbones.mamba2.GatedRMSNorm{numba_note(numba)}")
        if kernel is None:
            return self.norm(y, z, numba=numba)
        return kernel(y, self.norm.weight, None, z=z, eps=self.norm.eps, group_size=self.norm.group_size,
                      norm_before_gate=False)

    def step(self, x: Tensor, state: State) -> Tensor:  # [b, d_model] -> [b, d_model]
        kernel = self.pick_kernel(x, *STEP_KERNEL)
        # decoding (no grad) on float32 CPU tensors and states, without mamba_ssm's step kernel: one numba pass,
        # the products as row kernels (step_linear)
        fused = kernel is None and self.kernel != "reference"
        zxbcdt = step_linear(self.in_proj, x) if fused else self.in_proj(x)
        nb = fused and step_usable(zxbcdt, state["ssm"], state["conv"])
        self.record_path("step", kernel, *STEP_KERNEL, f"backbones.mamba2.Mamba2Mixer.step{numba_note(nb)}")
        if nb:
            consts = while_unchanged(self, "_fused_cache", None, lambda: fused_cpu.mamba2_step_consts(
                self.conv1d.weight[:, 0], self.conv1d.bias, self.dt_bias, self.A_log, self.D, self.norm.weight,
                self.norm.eps), self.norm.eps)
            y = fused_cpu.mamba2_step_fused(zxbcdt, state["conv"], state["ssm"], consts, self.d_inner, self.ngroups)
            return step_linear(self.out_proj, y)
        b = x.shape[0]
        z, xBC, dt = self._split(zxbcdt)  # [b, d_inner], [b, conv_dim], [b, h]
        conv = state["conv"]  # [b, conv_dim, d_conv-1]: the last inputs, oldest first
        w = self.conv1d.weight[:, 0]  # [conv_dim, d_conv]
        xc = torch.addcmul(self.conv1d.bias, xBC, w[:, -1])  # newest tap
        if self.d_conv > 1:
            xc = xc + (conv.to(xBC.dtype) * w[:, :-1]).sum(-1)
            conv.copy_(torch.cat([conv[:, :, 1:], xBC[:, :, None].to(conv.dtype)], -1))
        xs, Bm, Cm = torch.split(F.silu(xc), [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], -1)

        h = state["ssm"]  # [b, H, P, N]
        if kernel is not None:  # per-(head, channel) views of the per-head parameters, as mamba_ssm's step
            P, N = self.headdim, self.d_state
            y = kernel(
                h, xs.view(b, self.nheads, P), dt[:, :, None].expand(-1, -1, P),
                (-torch.exp(self.A_log.float()))[:, None, None].expand(-1, P, N),
                Bm.view(b, self.ngroups, N), Cm.view(b, self.ngroups, N), D=self.D[:, None].expand(-1, P),
                dt_bias=self.dt_bias[:, None].expand(-1, P), dt_softplus=True,
            )  # [b, H, P], h updated in place
            return self.out_proj(self._gated_norm(y.to(x.dtype).reshape(b, self.d_inner), z))
        sd = h.dtype
        g, hgp, n = self.ngroups, self.nheads // self.ngroups * self.headdim, self.d_state
        dt = F.softplus(dt.to(sd) + self.dt_bias.to(sd))  # [b, H]
        dA = torch.exp(dt * -torch.exp(self.A_log.to(sd)))  # [b, H]
        xh = xs.to(sd).view(b, self.nheads, self.headdim)  # [b, H, P]
        u = (dt[:, :, None] * xh).reshape(b * g, hgp, 1)  # heads of a group share B and C
        Bn = Bm.to(sd).reshape(b * g, 1, n)
        if torch.is_grad_enabled():  # differentiable: a new state (in-place updates would break autograd)
            hv = torch.baddbmm((h * dA[:, :, None, None]).reshape(b * g, hgp, n), u, Bn)
            state["ssm"] = hv.view_as(h)
        else:  # decoding: update the preallocated state in place, no temporaries
            hv = h.view(b * g, hgp, n)
            h.mul_(dA[:, :, None, None])
            hv.baddbmm_(u, Bn)  # += x dt B^T
        y = torch.bmm(hv, Cm.to(sd).reshape(b * g, n, 1)).view(b, self.nheads, self.headdim)  # h C: [b, H, P]
        y = y + self.D.to(sd)[:, None] * xh
        y = y.to(x.dtype).reshape(b, self.d_inner)
        return self.out_proj(self._gated_norm(y, z))

    def allocate_state(self, batch_size: int, max_len: int, device=None, dtype=None) -> State:
        dtype = dtype or self.in_proj.weight.dtype
        return {
            "conv": torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            "ssm": torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                               dtype=self._ssm_dtype(dtype)),
        }

    def _scan_kernel(self):
        """The SSD kernel a training forward runs on this mixer's device, or None (ssd_chunked)."""
        return self.pick_kernel(self.in_proj.weight, *SSD_KERNEL)

    def scan_chunk_size(self, seq_len: int | None = None) -> int:
        """The chunk length the training scan runs with (on `seq_len` positions): `chunk_size` in
        the kernel, `pure_chunk_size` in ssd_chunked."""
        if self._scan_kernel() is not None:
            return self.chunk_size
        return pure_chunk_size(self.chunk_size, self.headdim, self.d_state, seq_len)

    def scan_flops_per_token(self, seq_len: int) -> int:
        return ssd_flops_per_token(seq_len, self.scan_chunk_size(seq_len), self.nheads, self.headdim,
                                   self.d_state, self.ngroups)

    def scan_flops_counted(self, batch: int, seq_len: int) -> int:
        """The matmuls of ssd_chunked (forward, and the gradients of every input as in training),
        counted on fake tensors of the training shapes (no data, no compute); 0 for the Triton kernel."""
        if self._scan_kernel() is not None:
            return 0
        b, l, h, p, g, n = batch, seq_len, self.nheads, self.headdim, self.ngroups, self.d_state
        with FakeTensorMode(), FlopCounterMode(display=False) as fc:
            ins = [torch.empty(*s, requires_grad=True) for s in ((b, l, h, p), (b, l, h), (h,), (b, l, g, n),
                                                                 (b, l, g, n), (h,))]
            y, _ = ssd_chunked(*ins[:5], self.scan_chunk_size(l), ins[5], fused=self.fused_ssd)
            torch.autograd.grad(y, ins, torch.empty_like(y))
        return int(fc.get_total_flops())

    def train_flops_uncounted(self, batch: int, seq_len: int) -> int:
        """causal_conv_silu's taps (the counter saw F.conv1d's): 2 K FLOPs per channel and
        token forward, as much again for each of the input and weight gradients; less the
        counted products of in_proj's padded columns (zero weights, no model FLOPs: forward and
        both gradients)."""
        pad = -self.in_proj.weight.shape[0] % _PAD
        conv = 3 * 2 * batch * seq_len * self.conv_dim * self.d_conv if self.fused_conv else 0
        return conv - 3 * 2 * batch * seq_len * self.d_model * pad


def mamba2_mixer_kwargs(backbone: str, mixer_kwargs: dict[str, Any], own: tuple[str, ...] = ()) -> dict[str, Any]:
    """The Mamba2 knobs among a backbone's mixer kwargs; an unknown knob raises ValueError."""
    unknown = sorted(set(mixer_kwargs) - set(MAMBA2_KNOBS) - set(own))
    if unknown:
        raise ValueError(
            f"{backbone}: unknown knob(s) {', '.join(unknown)}; expected some of {', '.join(MAMBA2_KNOBS + own)}"
        )
    return {k: v for k, v in mixer_kwargs.items() if k in MAMBA2_KNOBS}


@register("mamba2")
class Mamba2(Backbone):
    """Mamba2 blocks only (the study's "Prefix Mamba"); pass mlp_ratio for an MLP sublayer.

    Knobs: d_state (64), d_conv (4), expand (2), headdim (16), ngroups (1), chunk_size (64),
    kernel ("auto": mamba_ssm's Triton SSD kernel on CUDA when it imports, else the PyTorch
    ssd_chunked; "kernel": the Triton kernel or an error; "reference": ssd_chunked).
    """

    default_mlp_ratio = None
    size_knob = ("d_state", 1, 4096, 1)

    def make_mixer(self, layer_idx: int) -> Mixer:
        return Mamba2Mixer(self.d_model, **mamba2_mixer_kwargs(self.name, self.mixer_kwargs))
