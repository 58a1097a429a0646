"""Fused CPU kernels (numba) for the Mamba mixers' elementwise work, apart from the modules that use
them. On CPU this work is memory-bound in eager PyTorch: every op streams a [B, L, C] tensor through
memory (the causal conv ran ~17 passes, the gated norm ~12, the end of the SSD backward ~20). Each
kernel here reads its inputs once per direction, keeps one sequence's rows in cache, and recomputes
cheap intermediates in the backward instead of saving them.

- `causal_conv_silu_fused`: silu(causal depthwise conv1d(x) + bias), channels last (Mamba1 and
  Mamba2, whose x, B and C it writes as three contiguous tensors); the references are
  `backbones.mamba2._CausalConvSiLU` and `F.conv1d`.
- `gated_rms_norm_fused`: rmsnorm(y * silu(z)) * weight per group (Mamba2); the reference is
  `backbones.mamba2.GatedRMSNorm.reference` (F.rms_norm and autograd).
- `ssd_grad_tail`: the chunked SSD's backward from d(x dt) to the gradients of x, dt, A and D
  (`backbones.mamba2._SSDScan`, its factorised way); the reference is the torch code beside the call.
- `selective_scan_gated`: Mamba1's selective SSM from x_proj's output on, dt = softplus(r W^T + b), the
  scan (`backbones.ops.selective_scan`'s numba kernels), its skip and its gate, (y + x D) * silu(z),
  in one launch each way; the reference is the torch lines of `backbones.mamba.MambaMixer.forward`.
- decoding steps, one token (no grad): `mamba2_step_fused` (in_proj's output to the gated norm),
  `mamba3_step_fused` (in_proj's output to the gate), `mamba_step_fused` (two passes around x_proj),
  `s4d_step_fused` (the recurrence, GELU and the output layer), `s5_step_fused` (its three products,
  the recurrence, GELU and the gate), and for the fla layers `recurrence_step` (one token of the gated
  (delta-rule) linear-attention recurrence; its reference is `backbones.fla.linear_recurrence`),
  `short_conv_step` (their short convolutions; its reference is `backbones.fla.ref_causal_conv1d`),
  both together as `conv_recurrence_step`, and `gated_rms_rows` (their output norm and its gate; the
  references are `backbones.fla`'s norm forwards), which the fla layers' fused steps
  (`backbones.fla._STEPS`) call and which share their per-row and per-head code with the first two.
  Eager torch ran a step as 20-40 small ops per layer, ~8 us of dispatch each; these run every row
  on the calling thread. What a mixer's pass reads of the parameters comes from its `*_step_consts`,
  kept by the mixer while they are unchanged (`backbones.base.while_unchanged`). The references are
  the mixers' torch steps (kernel="reference"; S4D, S5: `fused_step = False`).
- row kernels for a decoding step's few rows (<= STEP_ROWS_MAX, CFG included; `rows_usable`): `linear_rows`
  (`backbones.base.step_linear`: the heads and the Mamba mixers' projections), `mlp_rows` (`MLP.step`),
  `cross_attend_rows` (`CrossAttention.step`) and `self_attend_rows` (the Transformer's KV-cache step). At
  2 rows MKL's product ran 1.2-2.5x slower than one pass over the weight, SDPA ~60 us a call. The
  references are F.linear, `MLP.forward` and F.scaled_dot_product_attention.
- `rms_norm_rows` (`rms_norm_kept` with constants kept by `backbones.base.RMSNorm.step`): a decoding
  step's RMSNorm (every block's norms, every backbone; S4D's and S5's fused steps call its kernel themselves),
  F.rms_norm bit for bit: its sum runs in ATen's order.

The others agree with their references to float32 rounding (tests), not bit for bit: the sums run in
another order and exp is the vectorised Cephes exp of `backbones.ops.selective_scan`. Numba's
error model is numpy's (no zero-division check, which would keep the loops scalar). A loop meant to
vectorise runs over the last axis of a C-contiguous array: numba knows that stride alone and reads
the others at run time, which kept S4D's step loop over its interleaved (Re, Im) pairs of a 4-d state
scalar until it went through a 2-d view (2.5x). Batch slices
run on torch.get_num_threads() threads (the kernels release the GIL); per-parameter gradients are
summed per slice, then over slices. The mixers pick these kernels for float32 CPU tensors when
numba imports (`numba_usable`) and record it in their kernel paths.

A kernel calls no other jitted function compiled apart, only helpers inlined into it
(inline="always") and overloads: numba's cache gave such a caller other bits when it loaded it than
when it compiled it (tested). Kernels that run one after another are called one after the other.
"""

from __future__ import annotations

import functools

import numpy as _np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.autograd.function import once_differentiable

from backbones.ops.selective_scan import (
    _nb,
    _nb_scan_bwd,
    _nb_scan_fwd,
    _run_batched,
    _scan_buffers,
    _scan_grad_buffers,
    _vexp,
)

AVAILABLE = _nb is not None

if _nb is not None:

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy", inline="always")
    def _nb_conv_pre(x, wt, bias, b, t, acc):  # pragma: no cover - jitted
        # acc [C] = bias + sum_k w_k x_{t-K+1+k}: the pre-activation of sequence b at step t
        Cn, K = x.shape[2], wt.shape[0]
        for c in range(Cn):
            acc[c] = bias[c]
        for k in range(max(0, K - 1 - t), K):
            s = t - (K - 1) + k
            for c in range(Cn):
                acc[c] += x[b, s, c] * wt[k, c]

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy", inline="always")
    def _nb_copy(src, s0, dst, d0, n):  # pragma: no cover - jitted
        # dst[d0 : d0 + n] = src[s0 : s0 + n] on 1-d arrays, as a plain loop (numba's slice assignment,
        # with its overlap check, made the segmented conv 3-4% slower)
        for c in range(n):
            dst[d0 + c] = src[s0 + c]

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_conv_fwd(x, wt, bias, o0, o1, o2, b0, b1):  # pragma: no cover - jitted
        # x [B, L, C]; wt [K, C]; bias [C]; o0, o1, o2 [B, L, C0], [B, L, C1], [B, L, C2] with
        # C0 + C1 + C2 = C: the output's channels in three consecutive segments (each may be empty).
        # silu runs over all C channels of a row at once, then the row is copied out: the vectorised
        # loop and its scalar tail gave a few channels other bits when a segment ran on its own.
        L, Cn = x.shape[1], x.shape[2]
        n0, n1 = o0.shape[2], o1.shape[2]
        acc = _np.empty(Cn, _np.float32)
        row = _np.empty(Cn, _np.float32)
        one = _np.float32(1.0)
        for b in range(b0, b1):
            for t in range(L):
                _nb_conv_pre(x, wt, bias, b, t, acc)
                for c in range(Cn):
                    a = acc[c]
                    row[c] = a / (one + _vexp(-a))
                _nb_copy(row, 0, o0[b, t], 0, n0)
                _nb_copy(row, n0, o1[b, t], 0, n1)
                _nb_copy(row, n0 + n1, o2[b, t], 0, Cn - n0 - n1)

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_conv_bwd(x, wt, bias, g0, g1, g2, gx, gw, gb, b0, b1):  # pragma: no cover - jitted
        # x, gx [B, L, C]; g0, g1, g2: the output's gradient in _nb_conv_fwd's segments; wt [K, C];
        # gw [B, K, C], gb [B, C]: per-sequence partial sums
        L, Cn, K = x.shape[1], x.shape[2], wt.shape[0]
        n0, n1 = g0.shape[2], g1.shape[2]
        gp = _np.empty((L, Cn), _np.float32)  # d pre-activation of one sequence
        grow = _np.empty(Cn, _np.float32)  # the output's gradient at one step, gathered
        one = _np.float32(1.0)
        for b in range(b0, b1):
            gw[b] = 0
            gb[b] = 0
            for t in range(L):  # recompute the pre-activation, then silu'
                _nb_conv_pre(x, wt, bias, b, t, gp[t])
                _nb_copy(g0[b, t], 0, grow, 0, n0)
                _nb_copy(g1[b, t], 0, grow, n0, n1)
                _nb_copy(g2[b, t], 0, grow, n0 + n1, Cn - n0 - n1)
                for c in range(Cn):
                    a = gp[t, c]
                    sg = one / (one + _vexp(-a))
                    v = grow[c] * sg * (one + a * (one - sg))
                    gp[t, c] = v
                    gb[b, c] += v
                for k in range(max(0, K - 1 - t), K):  # x_s feeds tap k of output t
                    s = t - (K - 1) + k
                    for c in range(Cn):
                        gw[b, k, c] += gp[t, c] * x[b, s, c]
            for s in range(L):  # gx_s = sum_k gp_{s + K-1-k} w_k
                for c in range(Cn):
                    gx[b, s, c] = 0
                for k in range(max(0, s + K - L), K):
                    t = s + (K - 1) - k
                    for c in range(Cn):
                        gx[b, s, c] += gp[t, c] * wt[k, c]

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_norm_fwd(y, z, w, eps, out, r, b0, b1):  # pragma: no cover - jitted
        # y, z, out [B, R, G, S]; w [G, S]; r [B, R, G] (1 / rms, kept for the backward)
        R, G, S = y.shape[1], y.shape[2], y.shape[3]
        u = _np.empty(S, _np.float32)
        one = _np.float32(1.0)
        for b in range(b0, b1):
            for i in range(R):
                for gi in range(G):
                    ss = _np.float32(0.0)
                    for j in range(S):
                        zv = z[b, i, gi, j]
                        v = y[b, i, gi, j] * (zv / (one + _vexp(-zv)))
                        u[j] = v
                        ss += v * v
                    rv = one / _np.sqrt(ss / _np.float32(S) + eps)
                    r[b, i, gi] = rv
                    for j in range(S):
                        out[b, i, gi, j] = u[j] * rv * w[gi, j]

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_norm_bwd(y, z, w, r, g, gy, gz, gw, b0, b1):  # pragma: no cover - jitted
        # gw [B, G, S]: per-sequence partial sums; the rest as in _nb_norm_fwd
        R, G, S = y.shape[1], y.shape[2], y.shape[3]
        n = _np.empty(S, _np.float32)
        sg = _np.empty(S, _np.float32)
        gn = _np.empty(S, _np.float32)
        one = _np.float32(1.0)
        for b in range(b0, b1):
            gw[b] = 0
            for i in range(R):
                for gi in range(G):
                    rv = r[b, i, gi]
                    dot = _np.float32(0.0)
                    for j in range(S):
                        zv = z[b, i, gi, j]
                        s = one / (one + _vexp(-zv))
                        sg[j] = s
                        nv = y[b, i, gi, j] * zv * s * rv  # n = u r, u = y silu(z)
                        n[j] = nv
                        gv = g[b, i, gi, j]
                        gw[b, gi, j] += gv * nv
                        gnv = gv * w[gi, j]
                        gn[j] = gnv
                        dot += gnv * nv
                    dot = dot / _np.float32(S)
                    for j in range(S):
                        gu = rv * (gn[j] - n[j] * dot)
                        zv = z[b, i, gi, j]
                        s = sg[j]
                        gy[b, i, gi, j] = gu * zv * s
                        gz[b, i, gi, j] = gu * y[b, i, gi, j] * s * (one + zv * (one - s))


    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_ssd_grad_tail(gy, y, xdt, G1, f1, G2, f2, x, dt, A, D, gend, gx, gdt, gA, gD, b0, b1):  # pragma: no cover
        # gy, y, xdt, G1, G2, x, gx [B, C, Q, H, P]; f1, f2, dt, gdt [B, C, Q, H]; A, D [H];
        # gend [B, C, H]; gA, gD [B, H]: per-sequence partial sums. d(x dt) = G1 f1 + G2 f2.
        C, Q, H, P = gy.shape[1], gy.shape[2], gy.shape[3], gy.shape[4]
        gacs = _np.empty((Q, H), _np.float32)  # d Acs of one chunk
        s3 = _np.empty((Q, H), _np.float32)  # d(x dt) . x
        run = _np.empty(H, _np.float32)
        for b in range(b0, b1):
            gA[b] = 0
            gD[b] = 0
            for c in range(C):
                for q in range(Q):
                    for h in range(H):
                        a1, a2, d, dd = f1[b, c, q, h], f2[b, c, q, h], dt[b, c, q, h], D[h]
                        s1 = _np.float32(0.0)
                        s2 = _np.float32(0.0)
                        s3v = _np.float32(0.0)
                        s4 = _np.float32(0.0)
                        for p in range(P):
                            g = gy[b, c, q, h, p]
                            gxd = G1[b, c, q, h, p] * a1 + G2[b, c, q, h, p] * a2
                            xv = x[b, c, q, h, p]
                            s1 += g * y[b, c, q, h, p]
                            s2 += xdt[b, c, q, h, p] * gxd
                            s3v += gxd * xv
                            s4 += g * xv
                            gx[b, c, q, h, p] = gxd * d + g * dd
                        gacs[q, h] = s1 - s2
                        s3[q, h] = s3v
                        gD[b, h] += s4
                for h in range(H):
                    gacs[Q - 1, h] += gend[b, c, h]
                    run[h] = 0
                for q in range(Q - 1, -1, -1):  # d (dt A) = reverse cumsum of d Acs within the chunk
                    for h in range(H):
                        run[h] += gacs[q, h]
                        gdt[b, c, q, h] = run[h] * A[h] + s3[q, h]
                        gA[b, h] += run[h] * dt[b, c, q, h]

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_skip_gate_fwd(y, x, D, z, out, b0, b1):  # pragma: no cover - jitted
        # y, x, z, out [B, L, C]; D [C]: out = (y + x D) silu(z)
        L, Cn = y.shape[1], y.shape[2]
        one = _np.float32(1.0)
        for b in range(b0, b1):
            for t in range(L):
                for c in range(Cn):
                    zv = z[b, t, c]
                    out[b, t, c] = (y[b, t, c] + x[b, t, c] * D[c]) * (zv / (one + _vexp(-zv)))

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_skip_gate_bwd(y, x, D, z, g, gy, gx, gz, gD, b0, b1):  # pragma: no cover - jitted
        # gD [B, C]: per-sequence partial sums; the rest as in _nb_skip_gate_fwd. With v = y + x D and
        # s = sigmoid(z): d v = g z s, d z = g v s (1 + z (1 - s)), d x = d v D, d D = sum d v x
        L, Cn = y.shape[1], y.shape[2]
        one = _np.float32(1.0)
        for b in range(b0, b1):
            gD[b] = 0
            for t in range(L):
                for c in range(Cn):
                    zv = z[b, t, c]
                    s = one / (one + _vexp(-zv))
                    gv = g[b, t, c] * zv * s
                    gy[b, t, c] = gv
                    gx[b, t, c] = gv * D[c]
                    gD[b, c] += gv * x[b, t, c]
                    gz[b, t, c] = g[b, t, c] * (y[b, t, c] + x[b, t, c] * D[c]) * s * (one + zv * (one - s))

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy", inline="always")
    def _softplus_parts(v):  # pragma: no cover - jitted
        # (softplus(v), sigmoid(v)) as torch's (threshold 20: softplus(v) = v above it), from one exp:
        # with e = exp(-|v|) in (0, 1], softplus = max(v, 0) + log1p(e) and log1p(e) = 2 atanh(s),
        # s = e / (2 + e) <= 1/3, by its odd series to s^15 (relative error < 1e-9: no cancellation
        # for small e, and the loop vectorises, unlike libm's log1p)
        one = _np.float32(1.0)
        e = _vexp(-abs(v))
        s = e / (_np.float32(2.0) + e)
        s2 = s * s
        p = _np.float32(1 / 15)
        p = p * s2 + _np.float32(1 / 13)
        p = p * s2 + _np.float32(1 / 11)
        p = p * s2 + _np.float32(1 / 9)
        p = p * s2 + _np.float32(1 / 7)
        p = p * s2 + _np.float32(1 / 5)
        p = p * s2 + _np.float32(1 / 3)
        p = p * s2 + one
        sp = max(v, _np.float32(0.0)) + _np.float32(2.0) * s * p
        r = one / (one + e)
        return (v if v > _np.float32(20.0) else sp), (r if v >= _np.float32(0.0) else e * r)

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_softplus_fwd(pre, out, b0, b1):  # pragma: no cover - jitted
        # pre, out [B, L, C]: out = softplus(pre)
        L, Cn = pre.shape[1], pre.shape[2]
        for b in range(b0, b1):
            for t in range(L):
                for c in range(Cn):
                    out[b, t, c] = _softplus_parts(pre[b, t, c])[0]

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_softplus_bwd(pre, g, gpre, gb, b0, b1):  # pragma: no cover - jitted
        # gpre [B, L, C] = g sigmoid(pre); gb [B, C]: its per-sequence sums (the bias gradient)
        L, Cn = pre.shape[1], pre.shape[2]
        for b in range(b0, b1):
            gb[b] = 0
            for t in range(L):
                for c in range(Cn):
                    v = g[b, t, c] * _softplus_parts(pre[b, t, c])[1]
                    gpre[b, t, c] = v
                    gb[b, c] += v


    # ------------------------------------------------------------------ decoding steps
    # One token through a mixer's recurrence, every row of the batch on the calling thread (a few
    # thousand multiply-adds per row: a hand-off to another thread costs more than the work).

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy", inline="always")
    def _silu(v):  # pragma: no cover - jitted
        return v / (_np.float32(1.0) + _vexp(-v))

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy", inline="always")
    def _conv_window_silu(xn, win, w, cb, xc):  # pragma: no cover - jitted
        # xc [C] = silu(cb + sum_k w_k window_k), the window [C, K-1] (oldest first) then the new input
        # xn [C]; the window slides by one (updated in place). Loops over contiguous channels.
        Cn, Km1 = win.shape
        for c in range(Cn):
            xc[c] = cb[c] + xn[c] * w[c, Km1]
        for k in range(Km1):
            for c in range(Cn):
                xc[c] += win[c, k] * w[c, k]
        for k in range(Km1 - 1):
            for c in range(Cn):
                win[c, k] = win[c, k + 1]
        if Km1 > 0:
            for c in range(Cn):
                win[c, Km1 - 1] = xn[c]
        for c in range(Cn):
            xc[c] = _silu(xc[c])

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy", inline="always")
    def _conv_tap_step(x, win, w, bias, act, y):  # pragma: no cover - jitted
        # One row of a depthwise causal conv's token: x [C] the new input, win [C, W] (the last W inputs,
        # oldest first) slid by one in place, w [C, W], bias [C] or empty -> y [C] = bias + sum_j w_j win_j,
        # through silu when act (in a loop of its own over contiguous channels: inside the taps' loop it
        # ran 5x slower)
        Cn, W = win.shape
        for c in range(Cn):
            acc = bias[c] if bias.shape[0] > 0 else _np.float32(0.0)
            for j in range(W - 1):
                acc += win[c, j + 1] * w[c, j]
                win[c, j] = win[c, j + 1]
            win[c, W - 1] = x[c]
            y[c] = acc + x[c] * w[c, W - 1]
        if act:
            for c in range(Cn):
                y[c] = _silu(y[c])

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy", inline="always")
    def _recurrence_head(q, k, v, Sb, g, gk, beta, scale, l2, qs, ks, u, o):  # pragma: no cover - jitted
        # One (row, head) of the gated (delta-rule) linear-attention recurrence: q, k [K], v [V]; Sb [K, V]
        # updated in place; g [1] (log decay) or empty, gk [K] or empty, beta [1] or empty (no delta rule);
        # qs, ks [K], u [V] scratch -> o [V]. l2: q, k / max(|.|_2, 1e-6) first (F.normalize), then q * scale.
        K, V = Sb.shape
        dq = _np.float32(1.0)
        dk = _np.float32(1.0)
        if l2:
            nq = _np.float32(0.0)
            nk = _np.float32(0.0)
            for i in range(K):
                nq += q[i] * q[i]
                nk += k[i] * k[i]
            dq = max(_np.sqrt(nq), _np.float32(1e-6))
            dk = max(_np.sqrt(nk), _np.float32(1e-6))
        for i in range(K):
            qs[i] = q[i] / dq * scale
            ks[i] = k[i] / dk
        hgk, hb = gk.shape[0] > 0, beta.shape[0] > 0
        eg = _np.exp(g[0]) if g.shape[0] > 0 else _np.float32(1.0)
        for j in range(V):
            u[j] = 0
        for i in range(K):  # decay S, and (delta rule) u = S^T k, in one pass over S
            e = eg * _np.exp(gk[i]) if hgk else eg
            row = Sb[i]
            if hb:
                for j in range(V):
                    sv = row[j] * e
                    row[j] = sv
                    u[j] += sv * ks[i]
            else:
                for j in range(V):
                    row[j] *= e
        for j in range(V):  # the delta rule's u = beta (v - S^T k), else v
            u[j] = beta[0] * (v[j] - u[j]) if hb else v[j]
        for j in range(V):
            o[j] = 0
        for i in range(K):  # S += k u^T, then o = S^T q
            row = Sb[i]
            for j in range(V):
                sv = row[j] + ks[i] * u[j]
                row[j] = sv
                o[j] += sv * qs[i]

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_short_conv_step(x, win, w, bias, act):  # pragma: no cover - jitted
        # x [B, C] (one token); win [B, C, W] (slid by one in place); w [C, W]; bias [C] or empty -> y [B, C]
        y = _np.empty(x.shape, _np.float32)
        for b in range(x.shape[0]):
            _conv_tap_step(x[b], win[b], w, bias, act, y[b])
        return y

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_recurrence_step(q, k, v, g, gk, beta, S, scale, l2):  # pragma: no cover - jitted
        # q, k [B, Hk, K]; v [B, H, V] (head h reads q, k head h // (H / Hk)); g [B, H], gk [B, H, K],
        # beta [B, H], each with a 0-length first axis when absent; S [B, H, K, V], updated in place
        # -> o [B, H, V]
        B, H, V = v.shape
        Hk, K = q.shape[1], q.shape[2]
        rep = H // Hk
        o = _np.empty((B, H, V), _np.float32)
        qs, ks, u = _np.empty(K, _np.float32), _np.empty(K, _np.float32), _np.empty(V, _np.float32)
        none1, none2 = _np.empty(0, _np.float32), _np.empty((1, 0), _np.float32)
        for b in range(B):
            for h in range(H):
                _recurrence_head(q[b, h // rep], k[b, h // rep], v[b, h], S[b, h],
                                 g[b, h:h + 1] if g.shape[0] > 0 else none1,
                                 gk[b, h] if gk.shape[0] > 0 else none2[0],
                                 beta[b, h:h + 1] if beta.shape[0] > 0 else none1, scale, l2, qs, ks, u, o[b, h])
        return o

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_conv_recurrence_step(proj, win_q, win_k, win_v, w, cb, acts, g, gk, beta, S, scale, l2):  # pragma: no cover
        # An fla layer's token from its projections to its recurrence's output: proj [B, >= C], its first
        # C = Ck + Ck + Cv columns q, k, v before their short convs; win_q, win_k, win_v [B, C_*, W] (slid in
        # place); w [C, W], cb [C] or empty: the three convs' weights and biases in that order; acts [3]:
        # silu after each conv; then `_recurrence_head` per (row, head) with q, k in Hk heads of K and v in
        # H heads of V (S [B, H, K, V], updated in place); g [B, H], gk [B, H, K], beta [B, H] or 0-length
        # first axis -> o [B, H, V]
        B, H, K, V = S.shape
        Ck, Cv = win_q.shape[1], win_v.shape[1]
        rep = H // (Ck // K)
        o = _np.empty((B, H, V), _np.float32)
        xc = _np.empty(Ck + Ck + Cv, _np.float32)
        qs, ks, u = _np.empty(K, _np.float32), _np.empty(K, _np.float32), _np.empty(V, _np.float32)
        none1, none2 = _np.empty(0, _np.float32), _np.empty((1, 0), _np.float32)
        nb = cb.shape[0] > 0
        for b in range(B):
            _conv_tap_step(proj[b, :Ck], win_q[b], w[:Ck], cb[:Ck] if nb else cb, acts[0], xc[:Ck])
            _conv_tap_step(proj[b, Ck:2 * Ck], win_k[b], w[Ck:2 * Ck], cb[Ck:2 * Ck] if nb else cb, acts[1],
                           xc[Ck:2 * Ck])
            _conv_tap_step(proj[b, 2 * Ck:2 * Ck + Cv], win_v[b], w[2 * Ck:], cb[2 * Ck:] if nb else cb, acts[2],
                           xc[2 * Ck:])
            for h in range(H):
                hk = h // rep
                _recurrence_head(xc[hk * K:(hk + 1) * K], xc[Ck + hk * K:Ck + (hk + 1) * K],
                                 xc[2 * Ck + h * V:2 * Ck + (h + 1) * V], S[b, h],
                                 g[b, h:h + 1] if g.shape[0] > 0 else none1,
                                 gk[b, h] if gk.shape[0] > 0 else none2[0],
                                 beta[b, h:h + 1] if beta.shape[0] > 0 else none1, scale, l2, qs, ks, u, o[b, h])
        return o

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_gated_rms_rows(x, w, bias, eps, z, act):  # pragma: no cover - jitted
        # x [R, V] -> rmsnorm(x) * w (+ bias), times silu(z) (act 1) or sigmoid(z) (act 2), z [R, V] (act 0:
        # not read). Not `_nb_rms_norm` (ATen's sum order, no fastmath): this one also gates, in the same pass
        R, V = x.shape
        out = _np.empty((R, V), _np.float32)
        for r in range(R):
            ss = _np.float32(0.0)
            for j in range(V):
                ss += x[r, j] * x[r, j]
            rs = _np.float32(1.0) / _np.sqrt(ss / _np.float32(V) + eps)
            for j in range(V):
                y = x[r, j] * rs * w[j]
                if bias.shape[0] > 0:
                    y += bias[j]
                out[r, j] = y
            if act == 1:
                for j in range(V):
                    out[r, j] *= _silu(z[r, j])
            elif act == 2:
                for j in range(V):
                    out[r, j] *= _np.float32(1.0) / (_np.float32(1.0) + _vexp(-z[r, j]))
        return out

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_mamba2_step(zxbcdt, conv, w, cb, dt_bias, A_log, D, nw, eps, h, d_inner, ngroups):  # pragma: no cover
        # zxbcdt [B, d_inner + conv_dim + H] (in_proj's output: z, x B C, dt); conv [B, conv_dim, K-1] (the
        # last inputs, oldest first) and h [B, H, P, N], both updated in place; w [conv_dim, K], cb
        # [conv_dim]; dt_bias, A_log, D [H]; nw [d_inner] (the gated norm's weight) -> out [B, d_inner].
        # Each part is a loop over contiguous channels (vectorised), not one loop per channel.
        Bn, conv_dim = conv.shape[0], conv.shape[1]
        H, P, N = h.shape[1], h.shape[2], h.shape[3]
        hg, gs = H // ngroups, d_inner // ngroups
        out = _np.empty((Bn, d_inner), _np.float32)
        xc = _np.empty(conv_dim, _np.float32)
        y = _np.empty(d_inner, _np.float32)
        for b in range(Bn):
            _conv_window_silu(zxbcdt[b, d_inner:d_inner + conv_dim], conv[b], w, cb, xc)
            for hd in range(H):  # h = exp(dt A) h + dt x B^T, y = h C + D x
                dt = _softplus_parts(zxbcdt[b, d_inner + conv_dim + hd] + dt_bias[hd])[0]
                dA = _np.exp(-dt * _np.exp(A_log[hd]))
                Bv = xc[d_inner + (hd // hg) * N:]  # this head's group's B; C follows all groups' B
                Cv = Bv[ngroups * N:]
                for p in range(P):
                    xv = xc[hd * P + p]
                    u = dt * xv
                    s = _np.float32(0.0)
                    for n in range(N):
                        hv = h[b, hd, p, n] * dA + u * Bv[n]
                        h[b, hd, p, n] = hv
                        s += hv * Cv[n]
                    y[hd * P + p] = s + D[hd] * xv
            for j in range(d_inner):  # rmsnorm(y silu(z)) per group
                y[j] = y[j] * _silu(zxbcdt[b, j])
            for gi in range(ngroups):
                ss = _np.float32(0.0)
                for j in range(gi * gs, (gi + 1) * gs):
                    ss += y[j] * y[j]
                r = _np.float32(1.0) / _np.sqrt(ss / _np.float32(gs) + eps)
                for j in range(gi * gs, (gi + 1) * gs):
                    out[b, j] = y[j] * r * nw[j]
        return out

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_mamba3_step(proj, dt_bias, B_bias, C_bias, B_norm, C_norm, D, A_floor, eps, theta, h, kp, vp,
                        d_inner, ngroups):  # pragma: no cover - jitted
        # proj [B, width] (in_proj's output: z, x, B, C, dt, A, trap, angle); theta [B, H, A] (the last angles),
        # h [B, H, P, N], kp [B, H, N] (the last rotated k) and vp [B, H, P] (the last v), all updated in place;
        # dt_bias, D [H]; B_bias, C_bias [H, N]; B_norm, C_norm [N] -> out [B, d_inner] = (h q + D v) silu(z)
        Bn, H, P, N = h.shape[0], h.shape[1], h.shape[2], h.shape[3]
        An, G = theta.shape[2], ngroups
        hg = H // G
        out = _np.empty((Bn, d_inner), _np.float32)
        o_B = 2 * d_inner
        o_C = o_B + G * N
        o_dt = o_C + G * N
        o_A, o_tr, o_an = o_dt + H, o_dt + 2 * H, o_dt + 3 * H
        # 2-d views: numba vectorises a loop over the last axis of a C array only (it knows that stride alone)
        hs = h.reshape(Bn * H * P, N)
        ks = kp.reshape(Bn * H, N)
        qn = _np.empty((G, N), _np.float32)
        kn = _np.empty((G, N), _np.float32)
        q = _np.empty(N, _np.float32)
        k = _np.empty(N, _np.float32)
        one, zero = _np.float32(1.0), _np.float32(0.0)
        pi, twopi = _np.float32(_np.pi), _np.float32(2 * _np.pi)
        for b in range(Bn):
            for gi in range(G):  # rmsnorm over the state of B (-> k) and C (-> q), per group
                sb = zero
                sc = zero
                for n in range(N):
                    sb += proj[b, o_B + gi * N + n] * proj[b, o_B + gi * N + n]
                    sc += proj[b, o_C + gi * N + n] * proj[b, o_C + gi * N + n]
                rb = one / _np.sqrt(sb / _np.float32(N) + eps)
                rc = one / _np.sqrt(sc / _np.float32(N) + eps)
                for n in range(N):
                    kn[gi, n] = proj[b, o_B + gi * N + n] * rb * B_norm[n]
                    qn[gi, n] = proj[b, o_C + gi * N + n] * rc * C_norm[n]
            for hd in range(H):
                dt = _softplus_parts(proj[b, o_dt + hd] + dt_bias[hd])[0]
                adt = min(-_softplus_parts(proj[b, o_A + hd])[0], -A_floor) * dt
                lam = _softplus_parts(proj[b, o_tr + hd])[1]  # sigmoid(trap)
                alpha = _np.exp(adt)
                beta = alpha * (dt * (one - lam))  # the trapezoid's left end: the last v k^T
                gamma = lam * dt
                for n in range(N):
                    q[n] = qn[hd // hg, n] + C_bias[hd, n]
                    k[n] = kn[hd // hg, n] + B_bias[hd, n]
                for a in range(An):  # theta += pi tanh(angle) dt (mod 2 pi); rotate pairs (2a, 2a + 1)
                    th = theta[b, hd, a] + pi * _np.tanh(proj[b, o_an + a]) * dt
                    th = th - twopi * _np.floor(th / twopi)
                    theta[b, hd, a] = th
                    c, sn = _np.cos(th), _np.sin(th)
                    q0, q1 = q[2 * a], q[2 * a + 1]
                    q[2 * a], q[2 * a + 1] = q0 * c - q1 * sn, q0 * sn + q1 * c
                    k0, k1 = k[2 * a], k[2 * a + 1]
                    k[2 * a], k[2 * a + 1] = k0 * c - k1 * sn, k0 * sn + k1 * c
                r = b * H + hd
                for p in range(P):  # h = alpha h + beta v_prev k_prev^T + gamma v k^T, y = h q + D v
                    v = proj[b, d_inner + hd * P + p]
                    bv = beta * vp[b, hd, p]
                    gv = gamma * v
                    row = r * P + p
                    acc = zero
                    for n in range(N):
                        hv = alpha * hs[row, n] + bv * ks[r, n] + gv * k[n]
                        hs[row, n] = hv
                        acc += hv * q[n]
                    out[b, hd * P + p] = (acc + D[hd] * v) * _silu(proj[b, hd * P + p])
                    vp[b, hd, p] = v
                for n in range(N):
                    ks[r, n] = k[n]
        return out

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_mamba_conv_step(xz, conv, w, cb):  # pragma: no cover - jitted
        # xz [B, 2D] (in_proj's output: x, z); conv [B, D, K-1] updated in place; w [D, K]; cb [D] -> xc [B, D]
        D = conv.shape[1]
        xc = _np.empty((conv.shape[0], D), _np.float32)
        for b in range(conv.shape[0]):
            _conv_window_silu(xz[b, :D], conv[b], w, cb, xc[b])
        return xc

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_neg_exp(v):  # pragma: no cover - jitted
        # -exp(v) elementwise (the vectorised exp), v 1-d: Mamba1's A from A_log
        out = _np.empty(v.shape[0], _np.float32)
        for i in range(v.shape[0]):
            out[i] = -_vexp(v[i])
        return out

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_mamba_ssm_step(xdbl, dtwt, dtb, A, Dp, xc, xz, h):  # pragma: no cover - jitted
        # xdbl [B, R + 2N] (x_proj's output: dt's rank-R input, B, C); dtwt [R, D] (dt_proj's weight,
        # transposed), dtb [D]; A [D N] (-exp(A_log), _nb_neg_exp); Dp [D]; xc [B, D] (the conv's output);
        # xz [B, 2D] (z is its second half); h [B, D, N] updated in place -> out [B, D] = (h C + D x) silu(z)
        Bn, D, N = h.shape
        R = dtwt.shape[0]
        out = _np.empty((Bn, D), _np.float32)
        dt = _np.empty(D, _np.float32)
        for b in range(Bn):
            for d in range(D):  # dt = softplus(dt_proj(dt's input)), a loop over the channels each
                dt[d] = dtb[d]
            for r in range(R):
                v = xdbl[b, r]
                for d in range(D):
                    dt[d] += dtwt[r, d] * v
            for d in range(D):
                dt[d] = _softplus_parts(dt[d])[0]
            Bv = xdbl[b, R:R + N]
            Cv = xdbl[b, R + N:R + 2 * N]
            for d in range(D):
                xv = xc[b, d]
                u = dt[d] * xv
                s = _np.float32(0.0)
                for n in range(N):
                    hv = h[b, d, n] * _vexp(dt[d] * A[d * N + n]) + u * Bv[n]
                    h[b, d, n] = hv
                    s += hv * Cv[n]
                out[b, d] = s + Dp[d] * xv
            for d in range(D):
                out[b, d] *= _silu(xz[b, D + d])
        return out

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy", inline="always")
    def _gelu(v):  # pragma: no cover - jitted
        # GELU (the erf form) = v (1 - erfc(v / sqrt 2) / 2) for v >= 0, v erfc(-v / sqrt 2) / 2 below: erfc by
        # Numerical Recipes' Chebyshev fit (relative error < 1.2e-7 everywhere, so no cancellation for
        # v < 0), through _vexp so that the loop vectorises
        z = abs(v) * _np.float32(0.7071067811865476)
        t = _np.float32(1.0) / (_np.float32(1.0) + _np.float32(0.5) * z)
        p = _np.float32(0.17087277)
        p = p * t + _np.float32(-0.82215223)
        p = p * t + _np.float32(1.48851587)
        p = p * t + _np.float32(-1.13520398)
        p = p * t + _np.float32(0.27886807)
        p = p * t + _np.float32(-0.18628806)
        p = p * t + _np.float32(0.09678418)
        p = p * t + _np.float32(0.37409196)
        p = p * t + _np.float32(1.00002368)
        c = t * _vexp(-z * z - _np.float32(1.26551223) + t * p)  # erfc(z)
        half = _np.float32(0.5)
        return v * (_np.float32(1.0) - half * c) if v >= _np.float32(0.0) else half * v * c

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy", inline="always")
    def _dot(W, j, v):  # pragma: no cover - jitted
        # W[j] . v: a decoding step's product, one output at a time (a [B, H] x [H, O] torch product
        # would be MKL's, waking its second thread at 2 threads: `s4d_step_fused`)
        acc = _np.float32(0.0)
        for k in range(v.shape[0]):
            acc += W[j, k] * v[k]
        return acc

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_s4d_step(u, st, dA, dB, C, D, W, bias, glu):  # pragma: no cover - jitted
        # u [B, H]; st [B, H, M, 2] (the complex state as (Re, Im) pairs) updated in place; dA, dB, C
        # [H, M, 2]; D [H]; W [O, H], bias [O] (the output layer) -> out [B, O // 2] = glu(g W^T + bias) (glu) or
        # [B, O] = g W^T + bias, with g [B, H] = gelu(2 Re(sum_m C_m h_m) + D u) and h = dA h + dB u
        Bn, H, M = st.shape[0], st.shape[1], st.shape[2]
        g = _np.empty((Bn, H), _np.float32)
        out = _np.empty((Bn, W.shape[0] // 2 if glu else W.shape[0]), _np.float32)
        # 2-d views: numba knows the stride of a C array's last axis only, and vectorises the mode loop
        # through these (2.5x over indexing the 4-d state, whose mode stride it reads at run time)
        s = st.reshape(Bn * H, 2 * M)
        a, bb, c = dA.reshape(H, 2 * M), dB.reshape(H, 2 * M), C.reshape(H, 2 * M)
        for b in range(Bn):
            for hh in range(H):
                r, uv = b * H + hh, u[b, hh]
                acc = _np.float32(0.0)
                for m in range(M):
                    re, im = 2 * m, 2 * m + 1
                    sr, si = s[r, re], s[r, im]
                    nr = a[hh, re] * sr - a[hh, im] * si + bb[hh, re] * uv
                    ni = a[hh, re] * si + a[hh, im] * sr + bb[hh, im] * uv
                    s[r, re] = nr
                    s[r, im] = ni
                    acc += nr * c[hh, re] - ni * c[hh, im]
                g[b, hh] = _np.float32(2.0) * acc + D[hh] * uv
            for hh in range(H):
                g[b, hh] = _gelu(g[b, hh])
        Ho = out.shape[1]  # O // 2 with the GLU: out = (g W_a + bias_a) sigmoid(g W_b + bias_b)
        for j in range(Ho):  # rows inside: W's rows j and Ho + j stay in L1 over the batch
            for b in range(Bn):
                x = _dot(W, j, g[b]) + bias[j]
                out[b, j] = x / (_np.float32(1.0) + _vexp(-(_dot(W, Ho + j, g[b]) + bias[Ho + j]))) if glu else x
        return out

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_s5_step(u, h, lam, bwt, cwt, D, W, bias, act):  # pragma: no cover - jitted
        # u [B, H]; h [B, P, 2] ((Re, Im) pairs) updated in place; lam [P, 2] (Lambda_bar); bwt [2P, H]
        # (rows: Re then Im of B_bar); cwt [H, 2P] ([Re C, -Im C]); D [H]; W [H, H], bias [H] (the gate;
        # unused when act == 0) -> [B, H]: with s = Re(C h) + D u, h = Lambda_bar h + B_bar u and
        # y = gelu(s), act 0: y; 1 (half_glu1): y sigmoid(y W^T + bias); 2 (half_glu2): s sigmoid(y W^T + bias)
        Bn, P, H = h.shape[0], h.shape[1], u.shape[1]
        bu = _np.empty(2 * P, _np.float32)
        hc = _np.empty(2 * P, _np.float32)
        sv = _np.empty(H, _np.float32)
        y = _np.empty(H, _np.float32)
        out = _np.empty((Bn, H), _np.float32)
        for b in range(Bn):
            for j in range(2 * P):
                bu[j] = _dot(bwt, j, u[b])
            for p in range(P):
                lr, li = lam[p, 0], lam[p, 1]
                hr, hi = h[b, p, 0], h[b, p, 1]
                nr = lr * hr - li * hi + bu[p]
                ni = lr * hi + li * hr + bu[P + p]
                h[b, p, 0] = nr
                h[b, p, 1] = ni
                hc[p] = nr
                hc[P + p] = ni
            for c in range(H):
                v = _dot(cwt, c, hc) + D[c] * u[b, c]
                sv[c] = v
                y[c] = _gelu(v)
            if act == 0:
                for c in range(H):
                    out[b, c] = y[c]
            else:
                for c in range(H):
                    sig = _np.float32(1.0) / (_np.float32(1.0) + _vexp(-(_dot(W, c, y) + bias[c])))
                    out[b, c] = (y[c] if act == 1 else sv[c]) * sig
        return out

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy", inline="always")
    def _rows_product(x, W, bias, out):  # pragma: no cover - jitted
        # out [R, O] = x W^T + bias: x [R, I], W [O, I], bias [O] (or [0]: none). Output j at a time, over
        # the rows: four rows share one read of W's row j (four sums in one loop), the last R % 4 use _dot
        R, I = x.shape
        for j in range(W.shape[0]):
            bj = bias[j] if bias.shape[0] else _np.float32(0.0)
            b = 0
            while b + 4 <= R:
                a0, a1, a2, a3 = _np.float32(0.0), _np.float32(0.0), _np.float32(0.0), _np.float32(0.0)
                for k in range(I):
                    w = W[j, k]
                    a0 += w * x[b, k]
                    a1 += w * x[b + 1, k]
                    a2 += w * x[b + 2, k]
                    a3 += w * x[b + 3, k]
                out[b, j] = a0 + bj
                out[b + 1, j] = a1 + bj
                out[b + 2, j] = a2 + bj
                out[b + 3, j] = a3 + bj
                b += 4
            while b < R:
                out[b, j] = _dot(W, j, x[b]) + bj
                b += 1

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_linear_rows(x, W, bias):  # pragma: no cover - jitted
        # x [R, I], W [O, I], bias [O] or [0] -> [R, O] = x W^T + bias
        out = _np.empty((x.shape[0], W.shape[0]), _np.float32)
        _rows_product(x, W, bias, out)
        return out

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_mlp_rows(x, W1, b1, W2, b2):  # pragma: no cover - jitted
        # x [R, D], W1 [F, D], b1 [F], W2 [D, F], b2 [D] -> [R, D] = gelu(x W1^T + b1) W2^T + b2
        R = x.shape[0]
        hid = _np.empty((R, W1.shape[0]), _np.float32)
        _rows_product(x, W1, b1, hid)
        for r in range(R):
            for f in range(hid.shape[1]):
                hid[r, f] = _gelu(hid[r, f])
        out = _np.empty((R, W2.shape[0]), _np.float32)
        _rows_product(hid, W2, b2, out)
        return out

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy", inline="always")
    def _attend(q, kc, vc, b, h, n, keep, s, o):  # pragma: no cover - jitted
        # o [Dh] = softmax_t(q . kc[b, h, t]) vc[b, h, t] over t < n where keep[t] (keep [n] or [0]: all);
        # q [Dh], already scaled; s [>= n] scratch. Masked positions are skipped, not set to -inf (fastmath)
        Dh = q.shape[0]
        masked = keep.shape[0] > 0
        m = _np.float32(-3.0e38)
        for t in range(n):
            if masked and not keep[t]:
                continue
            acc = _np.float32(0.0)
            for d in range(Dh):
                acc += q[d] * kc[b, h, t, d]
            s[t] = acc
            m = max(m, acc)
        tot = _np.float32(0.0)
        for d in range(Dh):
            o[d] = 0
        for t in range(n):
            if masked and not keep[t]:
                continue
            e = _vexp(s[t] - m)
            tot += e
            for d in range(Dh):
                o[d] += e * vc[b, h, t, d]
        inv = _np.float32(1.0) / tot
        for d in range(Dh):
            o[d] *= inv

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_cross_attend(q, kc, vc, keep, scale):  # pragma: no cover - jitted
        # q [B, H * Dh]; kc, vc [B, H, L, Dh] (the text memory's keys and values); keep [B, L] (True: attend)
        # -> [B, H * Dh]: per row and head, softmax(q k^T scale) v over the kept positions
        Bn, H, L, Dh = kc.shape
        s = _np.empty(L, _np.float32)
        qs = _np.empty(Dh, _np.float32)
        out = _np.empty((Bn, H * Dh), _np.float32)
        for b in range(Bn):
            for h in range(H):
                for d in range(Dh):
                    qs[d] = q[b, h * Dh + d] * scale
                _attend(qs, kc, vc, b, h, L, keep[b], s, out[b, h * Dh:(h + 1) * Dh])
        return out

    @_nb.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
    def _nb_self_attend(qkv, kc, vc, p, scale):  # pragma: no cover - jitted
        # qkv [B, 3 * H * Dh] (q, k, v, each heads-major); kc, vc [B, H, T, Dh] a KV cache holding positions < p:
        # writes k, v at position p, then -> [B, H * Dh], each head's query attending to positions <= p
        Bn, H, Dh = kc.shape[0], kc.shape[1], kc.shape[3]
        HD = H * Dh
        s = _np.empty(p + 1, _np.float32)
        qs = _np.empty(Dh, _np.float32)
        every = _np.empty(0, _np.bool_)
        out = _np.empty((Bn, HD), _np.float32)
        for b in range(Bn):
            for h in range(H):
                for d in range(Dh):
                    qs[d] = qkv[b, h * Dh + d] * scale
                    kc[b, h, p, d] = qkv[b, HD + h * Dh + d]
                    vc[b, h, p, d] = qkv[b, 2 * HD + h * Dh + d]
                _attend(qs, kc, vc, b, h, p + 1, every, s, out[b, h * Dh:(h + 1) * Dh])
        return out

    @_nb.njit(nogil=True, cache=True, error_model="numpy")
    def _nb_rms_norm(x, w, eps, lanes):  # pragma: no cover - jitted
        # -> [R, D] = x / sqrt(mean(x^2) + eps) * w, x [R, D], w [D]: ATen's CPU rms_norm bit for bit (no
        # fastmath: every sum in its order). The mean is ATen's cascade_sum of x^2 over a contiguous row
        # (SumKernel.cpp): `lanes`-wide vectors (Vectorized<float>'s width) in four interleaved accumulators,
        # folded into levels every 16 groups of four (more past 2^16 groups); the accumulators are then
        # summed in order, the scalar tail added to 0, then the lanes in order. Below one vector's width
        # a row is summed as scalars the same way (lanes 1).
        R, D = x.shape
        L = lanes if D >= lanes else 1
        nv = D // L  # vectors in a row
        n4 = nv // 4
        lp, m = 0, n4 - 1  # lp = utils::CeilLog2(n4) (1 up to 2), then the level's power
        while m > 0:
            lp, m = lp + 1, m >> 1
        lp = max(4, max(lp, 1) // 4)
        mask = (1 << lp) - 1
        acc = _np.empty((4, 4, L), _np.float32)  # [level, accumulator, lane]
        sq = _np.empty(D, _np.float32)
        out = _np.empty((R, D), _np.float32)
        for r in range(R):
            for e in range(D):
                sq[e] = x[r, e] * x[r, e]
            acc[:] = 0
            for i in range(n4):  # groups of four vectors
                for k in range(4):
                    for l in range(L):
                        acc[0, k, l] += sq[(4 * i + k) * L + l]
                if (i + 1) & mask == 0:  # a whole level's worth: fold it up (the groups after the last stay)
                    for j in range(1, 4):
                        for k in range(4):
                            for l in range(L):
                                acc[j, k, l] += acc[j - 1, k, l]
                                acc[j - 1, k, l] = 0
                        if ((i + 1) & (mask << (j * lp))) != 0:
                            break
            for j in range(1, 4):
                for k in range(4):
                    for l in range(L):
                        acc[0, k, l] += acc[j, k, l]
            for v in range(4 * n4, nv):  # vectors past the last group of four
                for l in range(L):
                    acc[0, 0, l] += sq[v * L + l]
            for k in range(1, 4):
                for l in range(L):
                    acc[0, 0, l] += acc[0, k, l]
            s = _np.float32(0.0)
            for e in range(nv * L, D):  # the scalar tail
                s += sq[e]
            for l in range(L):
                s += acc[0, 0, l]
            rs = _np.float32(1.0) / _np.sqrt(s / _np.float32(D) + eps)
            for e in range(D):
                out[r, e] = x[r, e] * rs * w[e]
        return out


def numba_usable(t: Tensor) -> bool:
    """Whether the fused numba kernels here can run on tensors like t (float32 on CPU, numba installed).
    The mixers pass `numba=` explicitly; False runs the eager torch code beside each kernel (`_SSDScan`'s
    torch lines, `_CausalConvSiLU`, `_GatedRMSNormFn`, the decoding steps' torch code). Never while
    torch.compile traces (numpy calls break its graph) or on fake tensors (FLOP counting: no data)."""
    return (AVAILABLE and t.is_cpu and t.dtype == torch.float32 and not torch.compiler.is_compiling()
            and not _maybe_fake(t))


_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _maybe_fake(t: Tensor) -> bool:
    """is_fake(t), answered without it for a plain tensor (neither a subclass, functional nor functorch-wrapped:
    what is_fake then returns False for); is_fake took 2 us, a tenth of a decoding step's norm."""
    if type(t) in (Tensor, torch.nn.Parameter) and not torch._is_functional_tensor(t) and not _functorch_wrapped(t):
        return False
    return is_fake(t)


def numba_note(numba: bool) -> str:
    """The suffix a recorded reference path carries when these kernels ran in it."""
    return f" (numba: {__name__})" if numba else ""


def step_usable(t: Tensor, *states: Tensor) -> bool:
    """Whether a mixer's decoding step can run as its numba pass: no autograd recording, no autocast (the
    torch step then runs its products in the autocast dtype), `t` (the step's input or its projection) as
    `numba_usable`, and every state it updates in float32."""
    return (not torch.is_grad_enabled() and numba_usable(t) and not torch.is_autocast_enabled("cpu")
            and all(s.dtype == torch.float32 for s in states))


@functools.cache
def _sum_lanes() -> int | None:
    """Vectorized<float>'s width in this torch build's CPU kernels (8 with AVX2, 16 with AVX-512), found
    once per process as the width at which `_nb_rms_norm` equals F.rms_norm bit for bit on a probe (rows
    of seven widths, with and without tails); None when none does (`rms_norm_rows` is then not used)."""
    if not AVAILABLE:
        return None
    g = torch.Generator().manual_seed(0)
    probe = [(torch.randn(5, d, generator=g) * torch.rand(5, 1, generator=g) * 4, torch.randn(d, generator=g))
             for d in (3, 8, 37, 128, 200, 1000, 5000)]
    with torch.no_grad():
        ref = [F.rms_norm(x, (x.shape[1],), w, 1e-6) for x, w in probe]
        for lanes in (8, 16, 4):
            if all(torch.equal(rms_norm_rows(x, w, 1e-6, lanes), r) for (x, w), r in zip(probe, ref)):
                return lanes
    return None


def rms_norm_usable(x: Tensor, weight: Tensor) -> bool:
    """Whether `rms_norm_rows` can stand in for F.rms_norm on x: a decoding step's rows ([B, D], `step_usable`)
    with a float32 weight [D] (otherwise F.rms_norm runs, and raises on a mismatch), and this torch build's
    summation order known (`_sum_lanes`)."""
    return (x.dim() == 2 and weight.shape == x.shape[1:] and weight.dtype == torch.float32 and step_usable(x)
            and _sum_lanes() is not None)


def rms_norm_consts(weight: Tensor, eps: float, lanes: int | None = None) -> tuple:
    """What `rms_norm_kept` reads besides the rows: the weight [D] as a numpy array, eps as float32 and the
    vector width (default `_sum_lanes()`). A decoding step's norm keeps them while its weight is unchanged."""
    return _np32(weight), _np.float32(eps), lanes or _sum_lanes()


def rms_norm_kept(x: Tensor, consts: tuple) -> Tensor:
    """`rms_norm_rows` with its constants from `rms_norm_consts`: x [R, D] float32 CPU -> [R, D]."""
    return torch.from_numpy(_nb_rms_norm(_np32(x), *consts))


def rms_norm_rows(x: Tensor, weight: Tensor, eps: float, lanes: int | None = None) -> Tensor:
    """F.rms_norm(x, (D,), weight, eps) bit for bit, as one pass: x [R, D] float32 CPU, weight [D] (use where
    `rms_norm_usable`; `lanes`: the vector width to sum at, default `_sum_lanes()`). F.rms_norm runs ~12 ops
    on CPU (pow, sum, div, add, rsqrt, two muls and their casts), 15-25 us of dispatch for a decoding step's
    [B, D] rows; this 8 us. The reference is F.rms_norm."""
    return rms_norm_kept(x, rms_norm_consts(weight, eps, lanes))


#: the most rows (a decoding step's batch, CFG's doubling included) the row kernels below take: MKL's
#: [R, I] x [I, O] product ran 1.2-2.5x slower than `_rows_product` from 2 to 8 rows (1 and 2 threads);
#: from 16 rows on, MKL's is faster
STEP_ROWS_MAX = 8
_NO_BIAS = _np.zeros(0, _np.float32)
_NONE2, _NONE3 = _np.zeros((0, 0), _np.float32), _np.zeros((0, 0, 0), _np.float32)  # an absent 2-d / 3-d input


def rows_usable(x: Tensor, weight: Tensor) -> bool:
    """Whether a decoding step's rows x [R, D] and a float32 `weight` they meet run the row kernels here
    (`linear_rows`, `mlp_rows`, `cross_attend_rows`, `self_attend_rows`): `step_usable` and R <= STEP_ROWS_MAX."""
    return x.dim() == 2 and x.shape[0] <= STEP_ROWS_MAX and weight.dtype == torch.float32 and step_usable(x)


def rows_note(rows: int, like: Tensor) -> str:
    """Which products the decoding steps (`TTMLM.generate`: inference mode, no autocast) of `rows` rows on
    tensors like `like` (a parameter) run: what a generation records."""
    return (f"numba: {__name__} row kernels (linear, MLP, attention)"
            if rows <= STEP_ROWS_MAX and numba_usable(like) else "torch")


def linear_rows(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) on a decoding step's rows (`rows_usable`), one pass over the weight per
    four rows: x [R, I] float32 CPU, weight [O, I], bias [O] -> [R, O]. Agrees with F.linear to float32
    rounding (its sums run in another order); the reference is F.linear."""
    return torch.from_numpy(_nb_linear_rows(_np32(x), _np32(weight), _NO_BIAS if bias is None else _np32(bias)))


def mlp_rows(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """`backbones.base.MLP` on a decoding step's rows, one pass: gelu(x w1^T + b1) w2^T + b2, x [R, D]
    float32 CPU -> [R, D]; GELU is erf's (`_gelu`). The reference is MLP.forward (F.linear, F.gelu)."""
    return torch.from_numpy(_nb_mlp_rows(_np32(x), _np32(w1), _np32(b1), _np32(w2), _np32(b2)))


def cross_attend_rows(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
    """One query row per sequence attending to a memory: q [B, H * Dh] (projected), k, v [B, H, L, Dh], keep
    [B, L] bool (True: attend; None: every position) -> [B, H * Dh], softmax(q k^T / sqrt(Dh)) v per head.
    Every row must keep a position (`backbones.base.CrossAttention` checks once per decoding). The
    reference is F.scaled_dot_product_attention."""
    B, Dh = k.shape[0], k.shape[3]
    if keep is not None and keep.shape != k.shape[:1] + k.shape[2:3]:
        raise ValueError(f"cross_attend_rows: keep must be [B, L] = {[B, k.shape[2]]}, got {list(keep.shape)}")
    kp = _np.ones((B, 0), _np.bool_) if keep is None else keep.detach().contiguous().numpy()
    return torch.from_numpy(_nb_cross_attend(_np32(q), _np32(k), _np32(v), kp, _np.float32(Dh ** -0.5)))


def self_attend_rows(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int) -> Tensor:
    """One decoding step of causal self-attention from its KV cache: qkv [B, 3 * H * Dh] (the qkv product's
    row: q, k, v, each heads-major); k_cache, v_cache [B, H, T, Dh] holding positions < pos, into which k, v
    are written at `pos` (in place) -> [B, H * Dh], each head's query attending to positions <= pos with
    scale 1 / sqrt(Dh). The reference is `backbones.transformer.SelfAttention.forward` (SDPA)."""
    kc, vc = _inplace(k_cache, "transformer: state['k']"), _inplace(v_cache, "transformer: state['v']")
    if not 0 <= pos < kc.shape[2]:
        raise ValueError(f"KV cache holds {kc.shape[2]} positions; asked to write position {pos}")
    return torch.from_numpy(_nb_self_attend(_np32(qkv), kc, vc, pos, _np.float32(kc.shape[3] ** -0.5)))


def _np32(t: Tensor):
    """A C-contiguous numpy view of t (a copy when t is strided: numba vectorises the channel
    loops only over arrays it knows to be contiguous; a strided one ran 3-4x slower)."""
    return t.detach().contiguous().numpy()


def _launch(kernel, batch: int, *args) -> None:
    """kernel(*args, b0, b1) over slices of the batch (`_run_batched`), each tensor argument passed as
    a C-contiguous numpy view (`_np32`; a new output tensor is one already, so the kernel writes it)."""
    arrs = [_np32(a) if isinstance(a, Tensor) else a for a in args]
    _run_batched(lambda b0, b1: kernel(*arrs, b0, b1), batch)


class _ConvSiLU(torch.autograd.Function):
    """x [B, L, C], wt [K, C], bias [C] -> silu(causal conv) as its channel segments `sizes` (up to three,
    summing to C), each a contiguous [B, L, size]; the backward recomputes the pre-activation from x
    (nothing but the inputs is saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, wt: Tensor, bias: Tensor, sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
        x = x.contiguous()  # [B, L, C]
        outs = [x.new_empty(*x.shape[:2], n) for n in sizes]
        _launch(_nb_conv_fwd, x.shape[0], x, wt, bias, *_segments(outs))
        ctx.save_for_backward(x, wt, bias)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *g: Tensor):
        x, wt, bias = ctx.saved_tensors
        B = x.shape[0]
        gx = torch.empty_like(x)
        gw = x.new_empty(B, *wt.shape)
        gb = x.new_empty(B, wt.shape[1])
        _launch(_nb_conv_bwd, B, x, wt, bias, *_segments(list(g)), gx, gw, gb)
        return gx, gw.sum(0), gb.sum(0), None


def _segments(ts: list[Tensor]) -> list[Tensor]:
    """A segmented kernel's three channel segments: ts [B, L, C_i] padded with empty [B, L, 0] ones."""
    return ts + [ts[0].new_empty(*ts[0].shape[:2], 0)] * (3 - len(ts))


def causal_conv_silu_fused(x: Tensor, weight: Tensor, bias: Tensor, sizes: tuple[int, ...] | None = None):
    """silu(causal depthwise conv1d(x) + bias): x [b, l, c] float32 CPU, weight [c, 1, K]
    (nn.Conv1d's), bias [c] -> [b, l, c]; given `sizes` (up to three channel counts summing to c), the
    output's consecutive channel segments instead, each contiguous (Mamba2's x, B and C): the same
    values as `torch.split` of the whole, with no split and no gradient concatenation after."""
    segs = (x.shape[-1],) if sizes is None else tuple(sizes)
    if not 1 <= len(segs) <= 3 or sum(segs) != x.shape[-1] or min(segs) < 0:
        raise ValueError(f"causal_conv_silu_fused: sizes must be 1 to 3 channel counts summing to {x.shape[-1]}, "
                         f"got {list(segs)}")
    outs = _ConvSiLU.apply(x, weight[:, 0].t().contiguous(), bias, segs)
    return outs[0] if sizes is None else outs


class _GatedNorm(torch.autograd.Function):
    """y, z [B, R, G, S], weight [G, S] -> [B, R, G, S]; saves the inputs and 1 / rms per group, the
    backward recomputes silu(z) and the normalised values."""

    @staticmethod
    def forward(ctx, y: Tensor, z: Tensor, weight: Tensor, eps: float) -> Tensor:
        y, z = y.contiguous(), z.contiguous()  # [B, R, G, S]
        out = torch.empty_like(y)
        r = y.new_empty(y.shape[:-1])
        _launch(_nb_norm_fwd, y.shape[0], y, z, weight, _np.float32(eps), out, r)
        ctx.save_for_backward(y, z, weight, r)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        y, z, weight, r = ctx.saved_tensors
        B = y.shape[0]
        gy, gz = torch.empty_like(y), torch.empty_like(y)
        gw = y.new_empty(B, *weight.shape)
        _launch(_nb_norm_bwd, B, y, z, weight, r, g, gy, gz, gw)
        return gy, gz, gw.sum(0), None


def gated_rms_norm_fused(y: Tensor, z: Tensor, weight: Tensor, eps: float) -> Tensor:
    """rmsnorm(y * silu(z)) * weight per group: y, z [b, r, G, S] float32 CPU, weight [G, S]
    -> [b, r, G, S]."""
    return _GatedNorm.apply(y, z, weight, eps)


def ssd_grad_tail(gy: Tensor, y: Tensor, xdt: Tensor, G1: Tensor, f1: Tensor, G2: Tensor, f2: Tensor,
                  x: Tensor, dt: Tensor, A: Tensor, D: Tensor | None, gend: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The last part of the chunked SSD's backward (`backbones.mamba2._SSDScan.backward`), one pass:
    gy, y, xdt, G1, G2, x [b, c, q, h, p]; f1, f2, dt [b, c, q, h]; A, D [h]; gend [b, c, h] (d Acs at
    each chunk's last position through the state passing). With d(x dt) = G1 f1 + G2 f2:
    d Acs = (gy . y) - (x dt . d(x dt)) (+ gend), d(dt A) its reverse cumsum within each chunk, and
    returns d x = d(x dt) dt + gy D [b, c, q, h, p], d dt = d(dt A) A + d(x dt) . x [b, c, q, h],
    d A [h] and d D [h] (None without D)."""
    b, c, q, h = gy.shape[:4]
    gx = torch.empty_like(gy)
    gdt = dt.new_empty(b, c, q, h)
    gA, gD = A.new_empty(b, h), A.new_empty(b, h)
    Dv = A.new_zeros(h) if D is None else D
    _launch(_nb_ssd_grad_tail, b, gy, y, xdt, G1, f1, G2, f2, x, dt, A, Dv, gend, gx, gdt, gA, gD)
    return gx, gdt, gA.sum(0), None if D is None else gD.sum(0)


class _MambaInner(torch.autograd.Function):
    """Mamba1's selective SSM between x_proj and out_proj (`selective_scan_gated`), one launch each way.
    x enters twice (the scan's and the skip's): autograd sums its two gradients as it did when they
    came from two functions. Saves the inputs, the pre-activation of dt, dt, the scan's output and its
    states every `chunk` steps."""

    @staticmethod
    def forward(ctx, x, r, W, bias, A, Bm, Cm, h0, D, z, x_skip, chunk: int):
        pre = F.linear(r, W, bias)  # [B, L, C], contiguous
        z = z.contiguous()
        At, h0t, y, bounds, hT = _scan_buffers(x, A, h0, chunk)  # y: the scan's output
        dt, out = torch.empty_like(x), torch.empty_like(x)  # out: gated
        pre_, x_, At_, Bm_, Cm_, h0_, dt_, y_, bounds_, hT_, D_, z_, out_ = (t.detach().numpy() for t in (
            pre, x, At, Bm, Cm, h0t, dt, y, bounds, hT, D, z, out))

        def run(b0: int, b1: int) -> None:
            for i in range(b0, b1):  # one sequence at a time, its rows in cache (~1 us a call)
                _nb_softplus_fwd(pre_, dt_, i, i + 1)
                _nb_scan_fwd(x_, dt_, At_, Bm_, Cm_, h0_, chunk, y_, bounds_, hT_, i, i + 1)
                _nb_skip_gate_fwd(y_, x_, D_, z_, out_, i, i + 1)

        _run_batched(run, x.shape[0])
        ctx.save_for_backward(r, W, pre, x, dt, At, Bm, Cm, bounds, D, z, y)
        ctx.chunk = chunk
        return out, hT.transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, g, ghT):
        r, W, pre, x, dt, At, Bm, Cm, bounds, D, z, y = ctx.saved_tensors
        B, L, C = x.shape
        g = torch.zeros_like(x) if g is None else g.contiguous()
        ghT, gx, gdt, gAt, gBm, gC, gh0 = _scan_grad_buffers(x, At, Bm, Cm, bounds, ghT)
        gy, gxs, gz, gpre = (torch.empty_like(x) for _ in range(4))  # gy: the scan's, from the gate's backward
        gD, gb = x.new_empty(B, C), x.new_empty(B, C)  # per-sequence partial sums
        pre_, x_, dt_, At_, Bm_, Cm_, bounds_, D_, z_, y_, g_, ghT_ = (t.detach().numpy() for t in (
            pre, x, dt, At, Bm, Cm, bounds, D, z, y, g, ghT))
        gy_, gxs_, gz_, gD_, gx_, gdt_, gAt_, gBm_, gC_, gh0_, gpre_, gb_ = (t.numpy() for t in (
            gy, gxs, gz, gD, gx, gdt, gAt, gBm, gC, gh0, gpre, gb))

        def run(b0: int, b1: int) -> None:
            for i in range(b0, b1):  # per sequence, back through the three kernels
                _nb_skip_gate_bwd(y_, x_, D_, z_, g_, gy_, gxs_, gz_, gD_, i, i + 1)  # the scan's gy
                _nb_scan_bwd(x_, dt_, At_, Bm_, Cm_, bounds_, ctx.chunk, gy_, ghT_, gx_, gdt_, gAt_, gBm_, gC_,
                             gh0_, i, i + 1)
                _nb_softplus_bwd(pre_, gdt_, gpre_, gb_, i, i + 1)  # d pre, the bias's per-sequence sums

        _run_batched(run, B)
        # dt's low-rank products in the layouts MKL is fast at for a small rank R: (W^T d^T) [R, BL] and
        # (r^T d) [R, C], each used transposed (autograd's d W and d^T r ran 2.5-5x slower at R = 8)
        d = gpre.view(B * L, C)
        gr = (W.t() @ d.t()).t().view(B, L, -1) if ctx.needs_input_grad[1] else None  # [B, L, R]
        gW = (r.reshape(B * L, -1).t() @ d).t() if ctx.needs_input_grad[2] else None  # [C, R]
        return (gx, gr, gW, gb.sum(0), gAt.sum(0).t(), gBm, gC, gh0.transpose(1, 2), gD.sum(0), gz, gxs, None)


def selective_scan_gated(x: Tensor, dt_low: Tensor, dt_weight: Tensor, dt_bias: Tensor, A: Tensor, B: Tensor,
                         C: Tensor, D: Tensor, z: Tensor, h0: Tensor | None = None, chunk: int = 16
                         ) -> tuple[Tensor, Tensor]:
    """Mamba1's selective SSM from x_proj's output to the gated output, as mamba_ssm's
    `selective_scan_fn(..., D, z, delta_softplus=True)` with dt's low-rank projection folded in:

        dt = softplus(dt_low dt_weight^T + dt_bias)
        y  = (selective_scan(x, dt, A, B, C, h0) + x D) * silu(z)

    x, z [b, l, c]; dt_low [b, l, R]; dt_weight [c, R]; dt_bias, D [c]; A [c, n]; B, C [b, l, n];
    h0 [b, c, n]; float32 CPU. Returns y [b, l, c] and the final state [b, c, n]. One numba launch
    each way runs the softplus, the scan and the gate one sequence after the other (one hand-off to
    the worker threads instead of three, the sequence's rows still in cache; the three kernels called
    apart, not from one jitted function: numba's cache compiled such a caller's copy of them with other
    bits, depending on whether the kernels had been loaded first); the softplus is
    `_softplus_parts`, the exp the Cephes one of `backbones.ops.selective_scan`. The reference is
    `backbones.mamba.MambaMixer.forward`'s torch lines (kernel="reference")."""
    if h0 is None:
        h0 = x.new_zeros(x.shape[0], x.shape[2], A.shape[1])
    x, B, C = (t.contiguous() for t in (x, B, C))
    return _MambaInner.apply(x, dt_low, dt_weight, dt_bias, A.contiguous(), B, C, h0, D, z, x, chunk)


def _inplace(t: Tensor, name: str):
    """A numpy view of a decoding state the kernel updates in place (a copy would lose the update)."""
    if t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous float32 CPU tensor (updated in place), "
                         f"got {t.dtype} on {t.device.type}, contiguous={t.is_contiguous()}")
    return t.detach().numpy()


def mamba2_step_consts(conv_weight: Tensor, conv_bias: Tensor, dt_bias: Tensor, A_log: Tensor, D: Tensor,
                       norm_weight: Tensor, eps: float) -> tuple:
    """The constants of `mamba2_step_fused` as its pass reads them: conv_weight [conv_dim, K], conv_bias
    [conv_dim], dt_bias, A_log, D [H] and the gated norm's weight [d_inner] as numpy arrays, and eps. The
    caller keeps them while the parameters are unchanged (a step then converts none of them)."""
    return (*(_np32(t) for t in (conv_weight, conv_bias, dt_bias, A_log, D, norm_weight)), _np.float32(eps))


def mamba2_step_fused(zxbcdt: Tensor, conv_state: Tensor, ssm_state: Tensor, consts: tuple, d_inner: int,
                      ngroups: int) -> Tensor:
    """One decoding step of Mamba2's mixer between in_proj and out_proj, one pass per row: the conv
    window and silu, dt = softplus(dt + dt_bias), h = exp(dt A) h + dt x B^T, y = h C + D x, and the
    gated norm rmsnorm(y silu(z)) per group. zxbcdt [B, width] float32 CPU (in_proj's output),
    conv_state [B, conv_dim, K-1] and ssm_state [B, H, P, N] (updated in place), consts from
    `mamba2_step_consts` -> [B, d_inner]. The reference is the torch code of
    `backbones.mamba2.Mamba2Mixer.step` (kernel="reference")."""
    w, cb, dt_bias, A_log, D, nw, eps = consts
    return torch.from_numpy(_nb_mamba2_step(
        _np32(zxbcdt), _inplace(conv_state, "mamba2: state['conv']"), w, cb, dt_bias, A_log, D, nw, eps,
        _inplace(ssm_state, "mamba2: state['ssm']"), d_inner, ngroups))


def short_conv_step(x: Tensor, window: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    """One token through a depthwise causal conv from its window: x [B, C] float32 CPU, window [B, C, W]
    (the last W inputs, oldest first; slid by one in place), weight [C, W], bias [C] or None -> [B, C],
    silu'd when `silu`. The reference is `backbones.fla.ref_causal_conv1d` (fla's ShortConvolution)."""
    b = _np.zeros(0, _np.float32) if bias is None else _np32(bias)
    return torch.from_numpy(_nb_short_conv_step(_np32(x), _inplace(window, "short_conv_step: window"),
                                                _np32(weight), b, silu))


def recurrence_step(q: Tensor, k: Tensor, v: Tensor, state: Tensor, g: Tensor | None = None,
                    gk: Tensor | None = None, beta: Tensor | None = None, scale: float | None = None,
                    l2norm_qk: bool = False) -> Tensor:
    """One token of the gated (delta-rule) linear-attention recurrence (`backbones.fla.linear_recurrence`,
    its reference, at T = 1), one pass per (row, head): q, k [B, Hk, K], v [B, H, V], g [B, H] or gk
    [B, H, K] (log decays), beta [B, H] or None, state [B, H, K, V] float32 (updated in place) -> o
    [B, H, V]. scale defaults to K^-1/2."""
    return torch.from_numpy(_nb_recurrence_step(
        _np32(q), _np32(k), _np32(v), *_gates(g, gk, beta), _inplace(state, "recurrence_step: state"),
        _scale(q.shape[-1], scale), l2norm_qk))


def _gates(g: Tensor | None, gk: Tensor | None, beta: Tensor | None) -> tuple:
    """g [B, H], gk [B, H, K], beta [B, H] as the recurrence passes read them: an absent one as a
    0-length array of its rank."""
    return (_NONE2 if g is None else _np32(g), _NONE3 if gk is None else _np32(gk),
            _NONE2 if beta is None else _np32(beta))


def _scale(K: int, scale: float | None) -> _np.float32:
    return _np.float32(K**-0.5 if scale is None else scale)


def conv_recurrence_step(proj: Tensor, windows: tuple[Tensor, Tensor, Tensor], weight: Tensor, bias: Tensor | None,
                         acts: tuple[bool, bool, bool], state: Tensor, g: Tensor | None = None,
                         gk: Tensor | None = None, beta: Tensor | None = None, scale: float | None = None,
                         l2norm_qk: bool = False) -> Tensor:
    """`short_conv_step` on q, k and v, then `recurrence_step`, as one pass per row: proj [B, >= C] float32
    CPU, its first C = Ck + Ck + Cv columns q, k, v before their convs; windows ([B, C_*, W] each, slid in
    place), weight [C, W] and bias [C] or None (the three convs' in that order), acts (silu after each);
    state [B, H, K, V] (updated in place), g [B, H] / gk [B, H, K] / beta [B, H] -> o [B, H, V]."""
    return torch.from_numpy(_nb_conv_recurrence_step(
        _np32(proj), *(_inplace(w, "conv_recurrence_step: window") for w in windows), _np32(weight),
        _NO_BIAS if bias is None else _np32(bias), _np.array(acts, _np.bool_), *_gates(g, gk, beta),
        _inplace(state, "conv_recurrence_step: state"), _scale(state.shape[2], scale), l2norm_qk))


def gated_rms_rows(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, gate: Tensor | None = None,
                   activation: str = "silu") -> Tensor:
    """rms_norm(x) * weight (+ bias), times silu(gate) or sigmoid(gate) when given: x, gate [R, V] float32
    CPU -> [R, V] (fla's RMSNorm and FusedRMSNormGated on a decoding step's rows, equal to float32
    rounding; the references are `backbones.fla`'s `_rms_norm_ref` and `_rms_norm_gated_ref`)."""
    act = 0 if gate is None else 2 if activation == "sigmoid" else 1
    return torch.from_numpy(_nb_gated_rms_rows(
        _np32(x), _np32(weight), _NO_BIAS if bias is None else _np32(bias), _np.float32(eps),
        _NONE2 if gate is None else _np32(gate), act))


def mamba3_step_consts(dt_bias: Tensor, B_bias: Tensor, C_bias: Tensor, B_norm: Tensor, C_norm: Tensor,
                       D: Tensor, A_floor: float, eps: float) -> tuple:
    """The constants of `mamba3_step_fused` as its pass reads them: dt_bias [H], B_bias and C_bias [H, N],
    B_norm and C_norm [N], D [H] as numpy arrays, A_floor and eps. The caller keeps them while the
    parameters are unchanged (a step then converts none of them)."""
    return (*(_np32(t) for t in (dt_bias, B_bias, C_bias, B_norm, C_norm, D)), _np.float32(A_floor), _np.float32(eps))


def mamba3_step_fused(proj: Tensor, state: dict, consts: tuple, d_inner: int, ngroups: int) -> Tensor:
    """One decoding step of Mamba3's (SISO) mixer between in_proj and out_proj, one pass per row: dt, A and
    the trapezoid's weight, the B and C norms and biases, the rotation angles and the pairs they turn, h =
    alpha h + beta v_prev k_prev^T + gamma v k^T, y = h q + D v, times silu(z). proj [B, width] float32 CPU
    (in_proj's output); state {"angle" [B, H, A], "ssm" [B, H, P, N], "k" [B, H, N], "v" [B, H, P]} in that
    order (updated in place); consts from `mamba3_step_consts` -> [B, d_inner]. The reference is `backbones.mamba3.Mamba3Mixer.forward` on one token
    (kernel="reference"); `backbones.ops.mamba3.mamba3_siso_ref` writes the recurrence out."""
    st = [_inplace(t, f"mamba3: state[{key!r}]") for key, t in state.items()]
    return torch.from_numpy(_nb_mamba3_step(_np32(proj), *consts, *st, d_inner, ngroups))


def mamba_step_consts(conv_weight: Tensor, conv_bias: Tensor | None, dt_weight: Tensor, dt_bias: Tensor,
                      A_log: Tensor, D: Tensor) -> tuple:
    """The constants of `mamba_step_fused` as the numpy arrays its passes read: the conv's weight [D, K] and
    bias [D] (zeros without one), dt_proj's weight transposed [R, D] and bias [D], A = -exp(A_log) [D N]
    (the passes' exp) and D [D]. The caller keeps them while the parameters are unchanged: a step then
    converts, copies and exponentiates nothing of them (~60 us a layer at the demo's width)."""
    cb = conv_bias if conv_bias is not None else conv_weight.new_zeros(conv_weight.shape[0])
    return (_np32(conv_weight), _np32(cb), _np32(dt_weight.t()), _np32(dt_bias), _nb_neg_exp(_np32(A_log).ravel()),
            _np32(D))


def mamba_step_fused(xz: Tensor, conv_state: Tensor, ssm_state: Tensor, x_proj, consts: tuple) -> Tensor:
    """One decoding step of Mamba1's mixer between in_proj and out_proj: the conv window and silu (one
    pass), x_proj (a torch product), then one pass per row for dt = softplus(dt_proj(.)), h = exp(dt A) h
    + dt x B^T, y = h C + D x and the gate y silu(z). xz [B, 2D] float32 CPU (in_proj's output),
    conv_state [B, D, K-1] and ssm_state [B, D, N] (updated in place), x_proj a callable, consts from
    `mamba_step_consts` -> [B, D]. The reference is the torch code of `backbones.mamba.MambaMixer.step`."""
    cw, cb, dtwt, dtb, A, Dp = consts
    xzn = _np32(xz)
    xc = _nb_mamba_conv_step(xzn, _inplace(conv_state, "mamba: state['conv']"), cw, cb)
    xdbl = _np32(x_proj(torch.from_numpy(xc)))
    return torch.from_numpy(_nb_mamba_ssm_step(xdbl, dtwt, dtb, A, Dp, xc, xzn, _inplace(ssm_state, "mamba: state['ssm']")))


def s4d_step_consts(dA: Tensor, dB: Tensor, C: Tensor, D: Tensor, weight: Tensor, bias: Tensor) -> tuple:
    """The constants of `s4d_step_fused` as the numpy arrays its pass reads: dA, dB, C [H, N/2] complex64
    as (Re, Im) pairs [H, N/2, 2], D [H], the output layer's weight [O, H] and bias [O]. The caller keeps
    them while the parameters are unchanged (a step then converts no tensor)."""
    return (*(_np32(torch.view_as_real(t)) for t in (dA, dB, C)), _np32(D), _np32(weight), _np32(bias))


def s4d_step_fused(u: Tensor, state: Tensor, consts: tuple, glu: bool, norm: tuple | None = None) -> Tensor:
    """One decoding step of an S4D layer, one pass per row: h = dA h + dB u (complex, per channel and mode),
    y = 2 Re(sum C h) + D u, GELU, then the output layer and its GLU (O = 2H) when `glu`. u [B, H] float32
    CPU; state [B, H, N/2, 2] (Re, Im pairs, updated in place); consts from `s4d_step_consts` -> [B, O // 2]
    (glu) or [B, O]. The output layer runs here, not as a torch product: at 2 threads MKL splits its
    [B, H] x [H, O] product over both threads, and waking the second cost more than the product (and
    slowed every op after it). The reference is `backbones.s4d.S4DMixer._recurrent` and `_post`. norm: the
    block's `rms_norm_consts`, u then its input, normed first by `_nb_rms_norm` (F.rms_norm's bits)."""
    st = _inplace(state, "s4d: state['ssm']")
    if norm is None:
        return torch.from_numpy(_nb_s4d_step(_np32(u), st, *consts, bool(glu)))
    return torch.from_numpy(_nb_s4d_step(_nb_rms_norm(_np32(u), *norm), st, *consts, bool(glu)))


#: `s5_step_fused`'s activation codes (backbones.s5's activation names)
S5_ACTIVATIONS = {"gelu": 0, "half_glu1": 1, "half_glu2": 2}


def s5_step_consts(lbar: Tensor, bw: Tensor, cw: Tensor, D: Tensor, weight: Tensor | None,
                   bias: Tensor | None) -> tuple:
    """The constants of `s5_step_fused` as the numpy arrays its pass reads: Lambda_bar [P] complex64 as
    (Re, Im) pairs [P, 2], B_bar's rows [2P, H] (bw [H, 2P] transposed), [Re C, -Im C] as [H, 2P] (cw
    [2P, H] transposed), D [H], the gate's weight [H, H] and bias [H] (zeros without a gate). The caller
    keeps them while the parameters are unchanged (a step then converts no tensor)."""
    H = D.shape[0]
    weight = weight if weight is not None else D.new_zeros(H, H)
    bias = bias if bias is not None else D.new_zeros(H)
    return (_np32(torch.view_as_real(lbar)), _np32(bw.t()), _np32(cw.t()), _np32(D), _np32(weight), _np32(bias))


def s5_step_fused(u: Tensor, state: Tensor, consts: tuple, activation: str, norm: tuple | None = None) -> Tensor:
    """One decoding step of an S5 layer, one pass per row: B_bar u, h = Lambda_bar h + B_bar u (complex, on
    the state's (Re, Im) pairs), s = Re(C h) + D u, y = GELU(s), then the activation (`S5_ACTIVATIONS`:
    y, or y or s times sigmoid(y W^T + bias) through the gate). u [B, H] float32 CPU; state [B, P, 2]
    (updated in place); consts from `s5_step_consts` -> [B, H]. The three products run here, not as
    torch products: each is [B, H] x [H, H]-sized, ~20 us of dispatch apiece over 14 layers a token (as
    S4D's output layer, `s4d_step_fused`). The reference is `backbones.s5.S5Mixer._step`, F.gelu and
    `_gate`. norm: as in `s4d_step_fused`."""
    st, act = _inplace(state, "s5: state['ssm']"), S5_ACTIVATIONS[activation]
    if norm is None:
        return torch.from_numpy(_nb_s5_step(_np32(u), st, *consts, act))
    return torch.from_numpy(_nb_s5_step(_nb_rms_norm(_np32(u), *norm), st, *consts, act))
