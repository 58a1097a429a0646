"""Selective scan (Mamba1) implementations, apart from the module that uses them.

Per channel d and state n (A is [D, N], dt and x are [B, L, D], B and C [B, L, N]):

    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t          # [B, D, N]
    y_t = C_t . h_t                                      # [B, D]

- `selective_scan_ref`: the naive sequential loop (the pure reference for tests).
- `selective_scan(..., backend="numba")`, the default on CPU: fused kernels compiled
  with numba. Eager PyTorch is memory-bound on CPU (every op streams a [B, L, D, N]
  tensor through memory); the kernels keep one sequence's state [N, D] in cache and do
  discretise, update and read-out in a single loop vectorised over channels. Backward
  recomputes states from checkpoints every `chunk` steps, keeping that chunk's decays
  exp(dt A) [chunk, N, D] in cache for the adjoint recurrence
  `g_t = dL/dh_t + exp(dt_{t+1} A) g_{t+1}`, run backwards in time (one exp per element
  in the backward instead of two; the same values, so the gradients are bit for bit
  unchanged). Batch slices run on torch.get_num_threads() threads. Compiled once and cached on disk (__pycache__).
- `selective_scan(..., backend="torch")`: pure PyTorch (any device). A custom autograd
  function walks time in chunks of `chunk` steps: per chunk it builds the discretised
  decay and input `[c, B, D, N]` in one vectorised pass, runs the recurrence with one
  fused in-place multiply-add per step and reads out with one batched matmul; backward
  recomputes each chunk from its stored start state.
  Both fast paths do the same arithmetic as the sequential recurrence (no exp(+x)
  factors, so nothing can overflow) and keep only `[B, L/chunk, D, N]` states for backward.

mamba_ssm's CUDA `selective_scan_fn` (a C++/CUDA extension, not Triton) is the GPU
kernel; it is loaded through `backbones.ops.dispatch` by the Mamba mixer.
"""

from __future__ import annotations

import os

import numpy as _np
import torch
from torch import Tensor


def _check_scan_args(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor | None) -> None:
    if x.dim() != 3 or A.dim() != 2:
        raise ValueError(
            f"selective scan: expected x [B, L, D] and A [D, N], got {tuple(x.shape)} and {tuple(A.shape)}"
        )
    b, L, d = x.shape
    n = A.shape[1]
    if dt.shape != x.shape or A.shape != (d, n) or B.shape != (b, L, n) or C.shape != (b, L, n):
        raise ValueError(
            f"selective scan: expected x, dt [B, L, D], A [D, N], B, C [B, L, N]; got x {tuple(x.shape)}, "
            f"dt {tuple(dt.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}"
        )
    if h0 is not None and h0.shape != (b, d, n):
        raise ValueError(
            f"selective scan: initial state must be [B, D, N] = {(b, d, n)}, got {tuple(h0.shape)}"
        )


def selective_scan_ref(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Sequential reference. x, dt [B, L, D]; A [D, N]; B, C [B, L, N]; h0 [B, D, N].
    Returns y [B, L, D] (without the D skip) and the final state [B, D, N]."""
    _check_scan_args(x, dt, A, B, C, h0)
    b, L, d = x.shape
    h = x.new_zeros(b, d, A.shape[1]) if h0 is None else h0
    ys = []
    for t in range(L):
        dA = torch.exp(dt[:, t, :, None] * A)  # [B, D, N]
        h = dA * h + (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))  # [B, D]
    return torch.stack(ys, dim=1), h


class _ChunkedScan(torch.autograd.Function):
    """Time-major selective scan with chunk-boundary checkpoints.

    Inputs: x, dt [L, B, D]; A [D, N]; Bm, C [L, B, N]; h0 [B, D, N]. Outputs y [L, B, D], hT [B, D, N].
    """

    @staticmethod
    def _chunk_states(x, dt, A, Bm, h, s, e):
        """States h_s..h_{e-1} `[c, B, D, N]` of one chunk from the state before it, and the decays."""
        dA = torch.exp(dt[s:e, :, :, None] * A)  # [c, B, D, N]
        H = (dt[s:e] * x[s:e])[..., None] * Bm[s:e, :, None, :]  # [c, B, D, N]: dt B x
        H[0].addcmul_(dA[0], h)
        for t in range(1, e - s):
            H[t].addcmul_(dA[t], H[t - 1])
        return H, dA

    @staticmethod
    def forward(ctx, x, dt, A, Bm, C, h0, chunk: int):
        L, b, d = x.shape
        n = A.shape[1]
        starts = list(range(0, L, chunk))
        bounds = x.new_empty(len(starts), b, d, n)  # state before each chunk
        y = x.new_empty(L, b, d)
        h = h0
        for k, s in enumerate(starts):
            e = min(s + chunk, L)
            bounds[k] = h
            H, _ = _ChunkedScan._chunk_states(x, dt, A, Bm, h, s, e)
            y[s:e] = torch.matmul(H, C[s:e, :, :, None])[..., 0]  # [c, B, D]
            h = H[-1]
        ctx.save_for_backward(x, dt, A, Bm, C, bounds)
        ctx.chunk = chunk
        return y, h.clone()

    @staticmethod
    def backward(ctx, gy, ghT):
        x, dt, A, Bm, C, bounds = ctx.saved_tensors
        chunk = ctx.chunk
        L = x.shape[0]
        gx, gdt, gBm, gC = (torch.empty_like(t) for t in (x, dt, Bm, C))
        gA = torch.zeros_like(A)
        if gy is None:
            gy = torch.zeros_like(x)
        # carry: dL/dh at the last step of the current chunk coming from later steps
        carry = torch.zeros_like(bounds[0]) if ghT is None else ghT.clone()
        starts = list(range(0, L, chunk))
        for k in reversed(range(len(starts))):
            s = starts[k]
            e = min(s + chunk, L)
            h_prev = bounds[k]
            H, dA = _ChunkedScan._chunk_states(x, dt, A, Bm, h_prev, s, e)
            gys = gy[s:e]
            gC[s:e] = torch.matmul(gys[:, :, None, :], H)[:, :, 0]  # [c, B, N]
            G = gys[..., None] * C[s:e, :, None, :]  # [c, B, D, N]: dL/dh_t through y_t
            G[-1] += carry
            for t in range(e - s - 2, -1, -1):
                G[t].addcmul_(dA[t + 1], G[t + 1])
            carry = G[0] * dA[0]  # dL/dh_{s-1}
            # dL/d(dt A) = G * h_{t-1} * dA
            Hprev = torch.cat([h_prev[None], H[:-1]])  # h_{t-1}, a new tensor
            gS = Hprev.mul_(G).mul_(dA)  # [c, B, D, N]
            gA += torch.einsum("lbdn,lbd->dn", gS, dt[s:e])
            u = dt[s:e] * x[s:e]  # [c, B, D]
            gu = torch.matmul(G, Bm[s:e, :, :, None])[..., 0]  # [c, B, D]
            gBm[s:e] = torch.matmul(u[:, :, None, :], G)[:, :, 0]  # [c, B, N]
            gdt[s:e] = (gS * A).sum(-1) + gu * x[s:e]
            gx[s:e] = gu * dt[s:e]
        gh0 = carry if ctx.needs_input_grad[5] else None
        return gx, gdt, gA, gBm, gC, gh0, None


# -- fused CPU kernels (numba). On CPU, eager PyTorch is memory-bound here: every op
# streams a [B, L, D, N] tensor. These kernels keep the state [N, D] of one sequence in
# cache and do discretise, update and read-out in one loop, vectorised over channels.

try:
    import numba as _nb
    from numba import types as _nbt
    from numba.extending import intrinsic as _intrinsic
    from numba.extending import overload as _overload
except ImportError:  # pragma: no cover - numba is a dependency; without it the torch path is used
    _nb = None

if _nb is not None:

    @_intrinsic
    def _f32_from_bits(typingctx, bits):
        sig = _nbt.float32(_nbt.int32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(_nbt.float32))

        return sig, codegen

    def _vexp(x):  # typed by the overload below
        raise NotImplementedError

    @_overload(_vexp, jit_options={"fastmath": True})
    def _vexp_overload(x):
        if x == _nbt.float32:
            # Cephes expf: exp(x) = 2^k exp(r), |r| <= ln2/2, degree-7 polynomial (rel. error
            # ~1e-7), 2^k built from its bits so that the loop vectorises (libm expf does not).
            # Inputs below -87.3 give 1.2e-38 instead of a denormal.
            def impl(x):
                x = min(max(x, _np.float32(-87.3)), _np.float32(88.3))
                k = _np.floor(x * _np.float32(1.44269504088896341) + _np.float32(0.5))
                r = x - k * _np.float32(0.693359375) - k * _np.float32(-2.12194440e-4)
                p = _np.float32(1.9875691500e-4)
                p = p * r + _np.float32(1.3981999507e-3)
                p = p * r + _np.float32(8.3334519073e-3)
                p = p * r + _np.float32(4.1665795894e-2)
                p = p * r + _np.float32(1.6666665459e-1)
                p = p * r + _np.float32(5.0000001201e-1)
                p = p * r * r + r + _np.float32(1.0)
                return p * _f32_from_bits((_np.int32(k) + _np.int32(127)) << _np.int32(23))

            return impl
        return lambda x: _np.exp(x)

    @_nb.njit(nogil=True, fastmath=True, cache=True)
    def _nb_scan_fwd(x, dt, At, Bm, C, h0, chunk, y, bounds, hT, b0, b1):  # pragma: no cover - jitted
        # x, dt, y [B, L, D]; At [N, D]; Bm, C [B, L, N]; h0, hT [B, N, D]; bounds [B, K, N, D]
        L, D, N = x.shape[1], x.shape[2], At.shape[0]
        h = _np.empty((N, D), x.dtype)
        acc = _np.empty(D, x.dtype)
        u = _np.empty(D, x.dtype)
        for b in range(b0, b1):
            h[:, :] = h0[b]
            for t in range(L):
                if t % chunk == 0:
                    bounds[b, t // chunk] = h
                for d in range(D):
                    u[d] = dt[b, t, d] * x[b, t, d]
                    acc[d] = 0
                for n in range(N):
                    bn = Bm[b, t, n]
                    cn = C[b, t, n]
                    for d in range(D):
                        hv = _vexp(dt[b, t, d] * At[n, d]) * h[n, d] + u[d] * bn
                        h[n, d] = hv
                        acc[d] += hv * cn
                for d in range(D):
                    y[b, t, d] = acc[d]
            hT[b] = h

    @_nb.njit(nogil=True, fastmath=True, cache=True)
    def _nb_scan_bwd(
        x, dt, At, Bm, C, bounds, chunk, gy, ghT, gx, gdt, gAt, gBm, gC, gh0, b0, b1
    ):  # pragma: no cover
        # gAt [B, N, D] (per-sequence partial sums); gh0, ghT [B, N, D]; the rest as in _nb_scan_fwd
        L, D, N = x.shape[1], x.shape[2], At.shape[0]
        K = bounds.shape[1]
        Hc = _np.empty((chunk + 1, N, D), x.dtype)  # Hc[0] = state before the chunk, Hc[j+1] = h_{s+j}
        Ac = _np.empty((chunk, N, D), x.dtype)  # Ac[j] = exp(dt_{s+j} A), kept from the recompute
        g = _np.empty((N, D), x.dtype)  # dL/dh_t from later steps
        u = _np.empty(D, x.dtype)
        gu = _np.empty(D, x.dtype)
        gd = _np.empty(D, x.dtype)
        zero = x.dtype.type(0)
        for b in range(b0, b1):
            g[:, :] = ghT[b]
            gAt[b] = 0
            for k in range(K - 1, -1, -1):
                s = k * chunk
                e = min(s + chunk, L)
                Hc[0] = bounds[b, k]
                for t in range(s, e):  # recompute the chunk's states
                    j = t - s
                    for d in range(D):
                        u[d] = dt[b, t, d] * x[b, t, d]
                    for n in range(N):
                        bn = Bm[b, t, n]
                        for d in range(D):
                            a = _vexp(dt[b, t, d] * At[n, d])
                            Ac[j, n, d] = a
                            Hc[j + 1, n, d] = a * Hc[j, n, d] + u[d] * bn
                for t in range(e - 1, s - 1, -1):  # adjoint recurrence, backwards in time
                    j = t - s
                    for d in range(D):
                        u[d] = dt[b, t, d] * x[b, t, d]
                        gu[d] = 0
                        gd[d] = 0
                    for n in range(N):
                        bn = Bm[b, t, n]
                        cn = C[b, t, n]
                        gcn = zero
                        gbn = zero
                        for d in range(D):
                            dtv = dt[b, t, d]
                            a = Ac[j, n, d]
                            gv = g[n, d] + gy[b, t, d] * cn  # dL/dh_t
                            gcn += gy[b, t, d] * Hc[j + 1, n, d]
                            gbn += gv * u[d]
                            gu[d] += gv * bn
                            gs = gv * Hc[j, n, d] * a  # dL/d(dt A)
                            gd[d] += gs * At[n, d]
                            gAt[b, n, d] += gs * dtv
                            g[n, d] = gv * a  # dL/dh_{t-1} through h_t
                        gC[b, t, n] = gcn
                        gBm[b, t, n] = gbn
                    for d in range(D):
                        gx[b, t, d] = gu[d] * dt[b, t, d]
                        gdt[b, t, d] = gd[d] + gu[d] * x[b, t, d]
            gh0[b] = g


_POOL: tuple[int, int, object] | None = None  # (pid, workers, ThreadPoolExecutor)


def _run_batched(fn, batch: int) -> None:
    """Run fn(b0, b1) over the batch, split across torch.get_num_threads() threads: the calling thread
    takes the first slice, a pool the others (the kernels release the GIL).
    The extra threads share cores with torch's OpenMP workers, which spin after each parallel op before
    they sleep: with libgomp's default (~3 ms) the split gained nothing inside a training step; `import
    ttm` shortens it (ttm.GOMP_SPINCOUNT)."""
    global _POOL
    n = max(1, min(batch, torch.get_num_threads()))
    if n == 1:
        fn(0, batch)
        return
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] < n - 1:  # a forked child needs its own threads
        from concurrent.futures import ThreadPoolExecutor

        _POOL = (os.getpid(), n - 1, ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="mamba-scan"))
    edges = [batch * i // n for i in range(n + 1)]
    rest = [_POOL[2].submit(fn, edges[i], edges[i + 1]) for i in range(1, n)]
    try:
        fn(edges[0], edges[1])  # the first slice on the calling thread: one hand-off fewer
    finally:
        for f in rest:
            f.result()


def _scan_buffers(x: Tensor, A: Tensor, h0: Tensor, chunk: int) -> tuple[Tensor, ...]:
    """What `_nb_scan_fwd` reads and writes besides x, dt, B and C, in its layout (states [B, N, D]):
    At [N, D] and h0 [B, N, D] from A [D, N] and h0 [B, D, N]; empty y [B, L, D], bounds [B, K, N, D]
    (the state before each chunk) and hT [B, N, D]."""
    b, L, d = x.shape
    n = A.shape[1]
    return (A.t().contiguous(), h0.transpose(1, 2).contiguous(), x.new_empty(b, L, d),
            x.new_empty(b, -(-L // chunk), n, d), x.new_empty(b, n, d))


def _scan_grad_buffers(x: Tensor, At: Tensor, Bm: Tensor, C: Tensor, bounds: Tensor, ghT: Tensor | None
                       ) -> tuple[Tensor, ...]:
    """What `_nb_scan_bwd` writes, in its argument order after gy: ghT [B, N, D] (from the final state's
    gradient [B, D, N], zeros without one), then empty gx, gdt, gAt [B, N, D] (per-sequence partial
    sums), gBm, gC and gh0 [B, N, D]. The caller returns gAt.sum(0).t() and gh0.transpose(1, 2)."""
    ghT = torch.zeros_like(bounds[:, 0]) if ghT is None else ghT.transpose(1, 2).contiguous()
    return (ghT, torch.empty_like(x), torch.empty_like(x), x.new_empty(x.shape[0], *At.shape),
            torch.empty_like(Bm), torch.empty_like(C), torch.empty_like(ghT))


class _NumbaScan(torch.autograd.Function):
    """Batch-first scan on CPU: x, dt [B, L, D]; A [D, N]; Bm, C [B, L, N]; h0 [B, D, N]."""

    @staticmethod
    def forward(ctx, x, dt, A, Bm, C, h0, chunk: int):
        At, h0t, y, bounds, hT = _scan_buffers(x, A, h0, chunk)
        arr = [t.detach().numpy() for t in (x, dt, At, Bm, C, h0t)]
        out = [y.numpy(), bounds.numpy(), hT.numpy()]
        _run_batched(lambda b0, b1: _nb_scan_fwd(*arr, chunk, *out, b0, b1), x.shape[0])
        ctx.save_for_backward(x, dt, At, Bm, C, bounds)
        ctx.chunk = chunk
        return y, hT.transpose(1, 2)

    @staticmethod
    def backward(ctx, gy, ghT):
        x, dt, At, Bm, C, bounds = ctx.saved_tensors
        gy = torch.zeros_like(x) if gy is None else gy.contiguous()
        ghT, gx, gdt, gAt, gBm, gC, gh0 = _scan_grad_buffers(x, At, Bm, C, bounds, ghT)
        arr = [t.detach().numpy() for t in (x, dt, At, Bm, C, bounds)]
        grads = [t.numpy() for t in (gy, ghT, gx, gdt, gAt, gBm, gC, gh0)]
        _run_batched(lambda b0, b1: _nb_scan_bwd(*arr, ctx.chunk, *grads, b0, b1), x.shape[0])
        return gx, gdt, gAt.sum(0).t(), gBm, gC, gh0.transpose(1, 2), None


def selective_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    h0: Tensor | None = None,
    chunk: int = 16,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Fast selective scan; same contract as `selective_scan_ref`.

    backend: "numba" (fused CPU kernels), "torch" (chunked pure PyTorch, any device) or
    "auto" (numba for CPU tensors when numba is installed, else torch). Computes in
    float32 (float64 stays float64); the outputs have x's dtype. `chunk`: time steps
    between stored states (memory `[B, L/chunk, D, N]` kept for backward).
    """
    _check_scan_args(x, dt, A, B, C, h0)
    if chunk < 1:
        raise ValueError(f"selective scan: chunk must be >= 1, got {chunk}")
    if backend not in ("auto", "numba", "torch"):
        raise ValueError(f"selective scan: backend must be 'auto', 'numba' or 'torch', got {backend!r}")
    if backend == "numba" and (_nb is None or x.device.type != "cpu"):
        raise ValueError("selective scan: backend 'numba' needs numba installed and CPU tensors")
    use_numba = backend == "numba" or (backend == "auto" and _nb is not None and x.device.type == "cpu")
    out_dtype = x.dtype
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, L, d = x.shape
    if h0 is None:
        h0 = x.new_zeros(b, d, A.shape[1], dtype=ct)
    if L == 0:
        return x.new_zeros(b, 0, d), h0.to(out_dtype)
    A = A.to(ct).contiguous()
    if use_numba:
        x, dt, B, C = (t.to(ct).contiguous() for t in (x, dt, B, C))
        y, hT = _NumbaScan.apply(x, dt, A, B, C, h0.to(ct), chunk)
        return y.to(out_dtype), hT.to(out_dtype)
    tm = [t.to(ct).transpose(0, 1).contiguous() for t in (x, dt, B, C)]  # time-major
    y, hT = _ChunkedScan.apply(tm[0], tm[1], A, tm[2], tm[3], h0.to(ct), chunk)
    return y.transpose(0, 1).to(out_dtype), hT.to(out_dtype)
