"""Mamba2 (state-space duality, SSD; Dao & Gu 2024), laid out as state-spaces/mamba's `Mamba2` module.

    in_proj: x -> (z, x, B, C, dt)
    causal depthwise conv + SiLU over (x, B, C)
    SSD: h_t = exp(dt_t * A) h_{t-1} + dt_t * x_t B_t^T,  y_t = h_t C_t + D * x_t
         (scalar A per head, dt = softplus(dt + dt_bias), B/C shared by the heads of a group)
    gated RMSNorm: y = rmsnorm(y * silu(z)) (per group), then out_proj

Training uses the chunked SSD algorithm: a pure-PyTorch version (CPU, and the GPU
fallback; no data-dependent Python control flow, so torch.compile can trace it) or,
on CUDA when `mamba_ssm` is installed, its Triton kernel `mamba_chunk_scan_combined`.
Both accept an initial state and return the final one, so `forward(x, state)`
continues a sequence (prefill). Decoding uses the recurrence one token at a time.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from backbones.base import Backbone, Mixer, State, register
from backbones.ops.dispatch import KernelSwitch, check_mode, kernel_available, load_kernel

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


class _ChunkDiag(torch.autograd.Function):
    """Within-chunk SSD output y = (CB * L) @ xdt with L[i, j] = exp(Acs[i] - Acs[j]) for
    i >= j (0 above the diagonal), for every (batch, head, chunk).

    CB [..., 1, q, q] (shared by the hg heads of a group), Acs [..., hg, q],
    xdt [..., hg, q, p] -> y [..., hg, q, p] (leading dims: batch, chunk, group in any order). With S = CB * L and gS = gy xdt^T:
        d xdt = S^T gy,   d CB = sum_heads gS * L,
        d Acs = rowsum(gS * S) - colsum(gS * S) = (gy * y).sum(p) - (xdt * d xdt).sum(p)
    (the last identity: rowsum_i(gS * S) = gy_i . (S xdt)_i, colsum_j(gS * S) = xdt_j . (S^T gy)_j),
    so the backward forms one [.., q, q] product (gS) instead of autograd's several.
    """

    @staticmethod
    def forward(ctx, CB: Tensor, Acs: Tensor, xdt: Tensor) -> Tensor:
        Acs = Acs.contiguous()  # else L inherits a permuted layout and every matmul on it copies
        with torch.autocast(Acs.device.type, enabled=False):  # the SSM's dtype (>= fp32), fwd and bwd alike
            CB, xdt = CB.to(Acs.dtype), xdt.to(Acs.dtype).contiguous()  # one copy, reused by both matmuls
            # the causal mask goes on CB (shared by the heads, hg times smaller than L); L's upper
            # triangle is clamped to exp(0) instead of masked to exp(-inf) (exp is slower at -inf),
            # and decays below the smallest normal number are clamped there (denormals are slow);
            # both are exact to float tolerance: the decays clamped are < 1e-34 (float32)
            L = (Acs[..., :, None] - Acs[..., None, :]).clamp_(_DECAY_FLOOR.get(Acs.dtype, -math.inf), 0.0).exp_()  # [..., hg, q, q]
            S = L * CB.tril()
            y = S @ xdt  # [..., hg, q, p]
        ctx.save_for_backward(L, S, xdt, y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        L, S, xdt, y = ctx.saved_tensors
        gy = gy.to(S.dtype).contiguous()  # a permuted view of y's gradient: one copy, not one per matmul
        gxdt = S.transpose(-1, -2) @ gy  # [..., hg, q, p]
        gCB = (gy @ xdt.transpose(-1, -2)).mul_(L).sum(-3, keepdim=True).tril_()  # [..., 1, q, q]
        gAcs = (gy * y).sum(-1) - (xdt * gxdt).sum(-1)  # [..., hg, q]
        return gCB, gAcs, gxdt


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
    initial_state: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """`ssd_chunked(fused=True)`: the same four steps in the layout of the input, [b, c, q, h, p],
    so that every matmul contracts over long dims and no [b, h, c, q, q] gradient product
    other than `_ChunkDiag`'s one is formed:
      - chunk states  B^T (x dt w) as [n, q] @ [q, hg p] per (batch, chunk, group)
        (its gradient w.r.t. B contracts over hg p, not p alone, and needs no head sum);
      - state passing as a recurrence over the c chunks (c is small: l / q);
      - C h_in as [q, n] @ [n, hg p] per (batch, chunk, group).
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    hg = h // g
    x0 = x
    x, dt, B, C, q, c = _pad_to_chunks(x, dt, B, C, chunk_size)
    Acs = (dt * A).view(b, c, q, h).cumsum(2)  # [b, c, q, h]
    xdt = (x * dt[..., None]).view(b, c, q, h, p)  # [b, c, q, h, p]
    Bt = B.view(b, c, q, g, n).permute(0, 1, 3, 4, 2)  # [b, c, g, n, q]
    Cg = C.view(b, c, q, g, n).permute(0, 1, 3, 2, 4)  # [b, c, g, q, n]

    # 1. within each chunk (heads of a group share C B^T)
    CB = (Cg @ Bt)[:, :, :, None]  # [b, c, g, 1, q, q]
    Ah = Acs.view(b, c, q, g, hg).permute(0, 1, 3, 4, 2)  # [b, c, g, hg, q]
    xh = xdt.view(b, c, q, g, hg, p).permute(0, 1, 3, 4, 2, 5)  # [b, c, g, hg, q, p]
    y = _ChunkDiag.apply(CB, Ah, xh)  # [b, c, g, hg, q, p]

    # 2. the state each chunk leaves behind, starting from zero: [b, c, g, n, hg p]
    to_end = torch.exp(Acs[:, :, -1:] - Acs)  # [b, c, q, h]
    xw = (xdt * to_end[..., None]).view(b, c, q, g, hg * p).transpose(2, 3)  # [b, c, g, q, hg p]
    states = Bt @ xw  # [b, c, g, n, hg p]

    # 3. pass states across chunks: h_in(z + 1) = exp(sum of dA over chunk z) h_in(z) + states(z)
    chunk_decay = torch.exp(Acs[:, :, -1]).view(b, c, g, 1, hg, 1)  # [b, c, g, 1, hg, 1]
    states = states.view(b, c, g, n, hg, p)
    if initial_state is None:
        hin = x.new_zeros(b, g, n, hg, p)
    else:
        hin = initial_state.to(x.dtype).view(b, g, hg, p, n).permute(0, 1, 4, 2, 3)  # [b, g, n, hg, p]
    entering = []
    # unbind, not states[:, z]: the backward of c selects would zero-fill c full-size gradients
    for dz, sz in zip(chunk_decay.unbind(1), states.unbind(1), strict=True):
        entering.append(hin)
        hin = torch.addcmul(sz, hin, dz)  # hin * decay + state
    final = hin.permute(0, 1, 3, 4, 2).reshape(b, h, p, n)  # [b, h, p, n]
    H = torch.stack(entering, 1).view(b, c, g, n, hg * p)  # [b, c, g, n, hg p]

    # 4. contribution of the entering state: C_t h_in * decay(start -> t)
    y_off = (Cg @ H).view(b, c, g, q, hg, p) * torch.exp(Ah).transpose(-1, -2)[..., None]  # [b, c, g, q, hg, p]
    y = (y.permute(0, 1, 4, 2, 3, 5) + y_off.transpose(2, 3)).reshape(b, c * q, h, p)[:, :l]  # [b, l, h, p]
    if D is not None:
        y = y + x0 * D[:, None]
    return y, final


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
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan (the "minimal SSD" algorithm of the Mamba2 paper).

    x [b, l, h, p], dt [b, l, h] (already positive: after softplus), A [h] (negative),
    B, C [b, l, g, n] (head i uses group i // (h // g)), D [h], initial_state [b, h, p, n].
    Returns y [b, l, h, p] and the final state [b, h, p, n]. A length that is not a
    multiple of the chunk is zero-padded: dt = 0 there, so padding neither decays nor
    feeds the state.

    `fused=True` runs the within-chunk quadratic form as one autograd Function (`_ChunkDiag`:
    in-place mask/exp, a hand-written backward that never forms the [b, h, c, q, q]
    gradient products autograd would); `fused=False` is the plain-autograd reference
    (tests check that both agree, forward and backward).
    """
    if fused:
        return _ssd_fused(x, dt, A, B, C, chunk_size, D, initial_state)
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


def pure_chunk_size(chunk_size: int, headdim: int, d_state: int) -> int:
    """Chunk length of the pure-PyTorch scan: at most `chunk_size`, and near sqrt(P N), where the
    within-chunk work (~ L H Q) balances the chunk states (~ L H P N / Q). The result does not
    depend on the chunk (up to rounding); the speed does (demo shapes P 16, N 47-64: 32 runs
    about 1.5x faster than 64 on a CPU)."""
    return max(1, min(chunk_size, 2 ** max(3, round(math.log2(math.sqrt(headdim * d_state))))))


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


def causal_conv_silu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """silu(causal depthwise conv(x)): x [b, l, c], weight [c, 1, K] (nn.Conv1d's), bias [c];
    computed in x's dtype, as F.conv1d under autocast."""
    return _CausalConvSiLU.apply(x, weight[:, 0].to(x.dtype), bias.to(x.dtype))


# ----------------------------------------------------------------------------- mixer


class GatedRMSNorm(nn.Module):
    """rmsnorm(y * silu(z)) over groups of `group_size` channels (mamba_ssm's norm_before_gate=False)."""

    def __init__(self, d: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        y = y * F.silu(z)
        if self.group_size == y.shape[-1]:  # one group: the weight goes into rms_norm (one pass less)
            return F.rms_norm(y, (self.group_size,), self.weight, eps=self.eps)
        shape = y.shape
        y = y.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        y = F.rms_norm(y, (self.group_size,), eps=self.eps)
        return y.reshape(shape) * self.weight


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

    def _ssm_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.promote_types(dtype, torch.float32)

    def forward(self, x: Tensor, state: State | None = None) -> Tensor:
        b, l, _ = x.shape
        z, xBC, dt = self._split(self.in_proj(x))  # [b, l, d_inner], [b, l, conv_dim], [b, l, h]

        # causal depthwise conv, continuing from the state's window when given
        if state is None and self.fused_conv:
            xBC = causal_conv_silu(xBC, self.conv1d.weight, self.conv1d.bias)  # [b, l, conv_dim]
        else:
            xt = xBC.transpose(1, 2)  # [b, conv_dim, l]
            if state is None:
                xt = F.pad(xt, (self.d_conv - 1, 0))
            else:
                xt = torch.cat([state["conv"].to(xt.dtype), xt], dim=-1)  # [b, conv_dim, d_conv-1+l]
                state["conv"].copy_(xt[:, :, xt.shape[-1] - (self.d_conv - 1) :])
            xBC = F.silu(F.conv1d(xt, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)).transpose(1, 2)
        xs, Bm, Cm = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], -1)
        xs = xs.reshape(b, l, self.nheads, self.headdim)
        Bm = Bm.reshape(b, l, self.ngroups, self.d_state)
        Cm = Cm.reshape(b, l, self.ngroups, self.d_state)
        init = None if state is None else state["ssm"]

        kernel = self.pick_kernel(x, *SSD_KERNEL)  # CPU tensors too when asked (Triton interpreter)
        self.record_path("scan", kernel, *SSD_KERNEL, "backbones.mamba2.ssd_chunked")
        if kernel is not None:
            A = -torch.exp(self.A_log.float())
            out = kernel(
                xs, dt, A, Bm, Cm, chunk_size=self.chunk_size, D=self.D, dt_bias=self.dt_bias,
                dt_softplus=True, initial_states=None if init is None else init.float(),
                return_final_states=state is not None,
            )
            y, final = (out if state is not None else (out, None))
        else:
            sd = self._ssm_dtype(x.dtype)
            dts = F.softplus(dt.to(sd) + self.dt_bias.to(sd))  # [b, l, h]
            A = -torch.exp(self.A_log.to(sd))  # [h]
            y, final = ssd_chunked(
                xs.to(sd), dts, A, Bm.to(sd), Cm.to(sd), pure_chunk_size(self.chunk_size, self.headdim, self.d_state),
                self.D.to(sd), None if init is None else init.to(sd), fused=self.fused_ssd,
            )
        if state is not None:
            state["ssm"].copy_(final)
        y = y.to(x.dtype).reshape(b, l, self.d_inner)
        return self.out_proj(self._gated_norm(y, z))

    def _gated_norm(self, y: Tensor, z: Tensor) -> Tensor:
        kernel = self.pick_kernel(y, *NORM_KERNEL)
        self.record_path("norm", kernel, *NORM_KERNEL, "backbones.mamba2.GatedRMSNorm")
        if kernel is None:
            return self.norm(y, z)
        return kernel(y, self.norm.weight, None, z=z, eps=self.norm.eps, group_size=self.norm.group_size,
                      norm_before_gate=False)

    def step(self, x: Tensor, state: State) -> Tensor:  # [b, d_model] -> [b, d_model]
        b = x.shape[0]
        z, xBC, dt = self._split(self.in_proj(x))  # [b, d_inner], [b, conv_dim], [b, h]
        conv = state["conv"]  # [b, conv_dim, d_conv-1]: the last inputs, oldest first
        w = self.conv1d.weight[:, 0]  # [conv_dim, d_conv]
        xc = torch.addcmul(self.conv1d.bias, xBC, w[:, -1])  # newest tap
        if self.d_conv > 1:
            xc = xc + (conv.to(xBC.dtype) * w[:, :-1]).sum(-1)
            conv.copy_(torch.cat([conv[:, :, 1:], xBC[:, :, None].to(conv.dtype)], -1))
        xs, Bm, Cm = torch.split(F.silu(xc), [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], -1)

        h = state["ssm"]  # [b, H, P, N]
        kernel = self.pick_kernel(x, *STEP_KERNEL)
        self.record_path("step", kernel, *STEP_KERNEL, "backbones.mamba2.Mamba2Mixer.step")
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

    def scan_chunk_size(self) -> int:
        """The chunk length the training scan runs with: `chunk_size` in the kernel, the
        (shorter) `pure_chunk_size` in ssd_chunked."""
        if self._scan_kernel() is not None:
            return self.chunk_size
        return pure_chunk_size(self.chunk_size, self.headdim, self.d_state)

    def scan_flops_per_token(self, seq_len: int) -> int:
        return ssd_flops_per_token(seq_len, self.scan_chunk_size(), self.nheads, self.headdim, self.d_state,
                                   self.ngroups)

    def scan_flops_counted(self, batch: int, seq_len: int) -> int:
        """The matmuls of ssd_chunked (forward, and the gradients of every input as in training),
        counted on fake tensors of the training shapes (no data, no compute); 0 for the Triton kernel."""
        if self._scan_kernel() is not None:
            return 0
        b, l, h, p, g, n = batch, seq_len, self.nheads, self.headdim, self.ngroups, self.d_state
        with FakeTensorMode(), FlopCounterMode(display=False) as fc:
            ins = [torch.empty(*s, requires_grad=True) for s in ((b, l, h, p), (b, l, h), (h,), (b, l, g, n),
                                                                 (b, l, g, n), (h,))]
            y, _ = ssd_chunked(*ins[:5], self.scan_chunk_size(), ins[5], fused=self.fused_ssd)
            torch.autograd.grad(y, ins, torch.empty_like(y))
        return int(fc.get_total_flops())

    def train_flops_uncounted(self, batch: int, seq_len: int) -> int:
        """causal_conv_silu's taps (the counter saw F.conv1d's): 2 K FLOPs per channel and
        token forward, as much again for each of the input and weight gradients."""
        if not self.fused_conv:
            return 0
        return 3 * 2 * batch * seq_len * self.conv_dim * self.d_conv


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
