"""Mamba (Mamba1): the selective state-space mixer of Gu & Dao (2023).

Layout as in state-spaces/mamba `mamba_simple.py`: in_proj to (x, z); causal depthwise
conv1d on x; SiLU; x_proj to (dt, B, C); dt_proj + softplus; selective scan with
A = -exp(A_log) (S4D-real init) and a D skip; output gated by SiLU(z); out_proj.

The scans live in `backbones.ops.selective_scan` (a sequential reference, a numba CPU
kernel and a chunked PyTorch scan); on float32 CPU tensors the forward runs dt's softplus, the
numba scan, the skip and the gate as one call (`backbones.ops.fused_cpu.selective_scan_gated`).
Knobs `kernel` ("auto" | "kernel" | "reference", see `backbones.ops.dispatch`): the kernel is
mamba_ssm's CUDA `selective_scan_fn` (with causal_conv1d's conv when installed) for forward passes
that start from a zero state;
the reference is `selective_scan` with `scan_backend` ("auto" | "numba" | "torch").
The CUDA extension cannot run without a GPU, so this kernel is never checked on CPU.
A decoding step on float32 CPU tensors runs as two numba passes around x_proj
(`backbones.ops.fused_cpu.mamba_step_fused`; kernel="reference" or scan_backend="torch": the torch code).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.base import Backbone, Mixer, State, register, step_linear, while_unchanged
from backbones.mamba2 import causal_conv_silu
from backbones.ops import fused_cpu
from backbones.ops.dispatch import KernelSwitch, check_mode, kernel_available, load_kernel
from backbones.ops.fused_cpu import numba_note, numba_usable, step_usable
from backbones.ops.selective_scan import _nb, selective_scan, selective_scan_ref  # noqa: F401 (re-exported)

SCAN_KERNEL = ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
CONV_KERNEL = ("causal_conv1d", "causal_conv1d_fn")

# ----------------------------------------------------------------------------- mixer


class MambaMixer(KernelSwitch, Mixer):
    """The Mamba1 mixer. State: conv buffer `[B, d_inner, d_conv-1]` and SSM state `[B, d_inner, d_state]`."""

    fused_conv = True  # conv without a state: causal_conv_silu (channels last); False: F.conv1d (reference)

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        chunk: int = 16,
        scan_backend: str = "auto",
        kernel: str = "auto",
    ):
        super().__init__()
        if d_conv < 1 or d_state < 1 or chunk < 1:
            raise ValueError(
                f"mamba: d_conv, d_state and chunk must be >= 1, got {d_conv}, {d_state}, {chunk}"
            )
        if scan_backend not in ("auto", "numba", "torch"):
            raise ValueError(f"mamba: scan_backend must be 'auto', 'numba' or 'torch', got {scan_backend!r}")
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.chunk, self.scan_backend = chunk, scan_backend
        #: "reference": the pure-PyTorch scan; "auto": mamba_ssm's CUDA scan on CUDA when it
        #: imports, else `scan_backend`; "kernel": mamba_ssm's CUDA scan or an error.
        self.kernel = check_mode("mamba", kernel)
        di = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * di, bias=bias)
        self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, bias=conv_bias)
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, di, bias=True)
        # dt init: weight uniform in +-dt_rank^-0.5; bias = softplus^-1 of a log-uniform dt in [dt_min, dt_max]
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(di) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real init: A[d, n] = -(n + 1)
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(di, 1)  # [D, N]
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(di))
        self.A_log._no_weight_decay = self.D._no_weight_decay = (
            True  # as in the reference (hint for optimizers)
        )
        self.out_proj = nn.Linear(di, d_model, bias=bias)

    # -- pieces shared by forward and step
    def _x_proj(self, xc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """dt's low-rank input [..., R], B and C [..., N] from the conv's output."""
        return self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)

    def _ssm_params(self, xc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """dt [..., D], B and C [..., N] from the conv's output."""
        dtr, Bm, Cm = self._x_proj(xc)
        return F.softplus(self.dt_proj(dtr)), Bm, Cm

    def _cuda_scan(self, x: Tensor, state: State | None):
        """mamba_ssm's scan for this call, or None (it cannot continue from a state)."""
        fresh = state is None or state.get("pos", 0) == 0
        return self.pick_kernel(x, *SCAN_KERNEL, usable=fresh)

    def forward(self, x: Tensor, state: State | None = None) -> Tensor:  # [B, S, d_model]
        Bsz, S, _ = x.shape
        xi, z = self.in_proj(x).chunk(2, dim=-1)  # [B, S, D] each
        xi = xi.transpose(1, 2)  # [B, D, S]
        k = self.d_conv - 1
        w = self.conv1d.weight  # [D, 1, d_conv]
        scan = self._cuda_scan(x, state)
        backend = "torch" if self.kernel == "reference" else self.scan_backend  # the CPU scan's, and the conv's
        nb = backend != "torch" and numba_usable(xi)  # the numba kernels of backbones.ops.fused_cpu
        conv = load_kernel(*CONV_KERNEL) if scan is not None and kernel_available(*CONV_KERNEL) else None
        if conv is not None:
            xc = conv(xi.contiguous(), w[:, 0], self.conv1d.bias, activation="silu")
            padded = F.pad(xi, (k, 0)) if state is not None else None
            self.record_path("conv", conv, *CONV_KERNEL, "")
        elif state is None and self.fused_conv and self.conv1d.bias is not None:
            xc = causal_conv_silu(xi.transpose(1, 2), w, self.conv1d.bias, numba=nb).transpose(1, 2)  # [B, D, S]
            padded = None
            self.record_path("conv", None, *CONV_KERNEL, f"backbones.mamba2.causal_conv_silu{numba_note(nb)}")
        else:
            left = xi.new_zeros(Bsz, xi.shape[1], k) if state is None else state["conv"].to(xi.dtype)
            padded = torch.cat([left, xi], dim=-1)  # [B, D, k + S]
            xc = F.silu(F.conv1d(padded, w, self.conv1d.bias, groups=self.d_inner))  # [B, D, S]
            self.record_path("conv", None, *CONV_KERNEL, "torch.nn.functional.conv1d")
        if state is not None:
            state["conv"].copy_(padded[:, :, padded.shape[-1] - k :])
        xc = xc.transpose(1, 2)  # [B, S, D]
        A = -torch.exp(self.A_log.float())  # [D, N]
        h0 = None if state is None else state["ssm"]
        if nb:  # CPU (scan is None): dt, the scan, its skip and its gate in one numba call
            dtr, Bm, Cm = self._x_proj(xc)
            y, hT = fused_cpu.selective_scan_gated(
                xc, dtr, self.dt_proj.weight, self.dt_proj.bias, A, Bm, Cm, self.D, z, h0, chunk=self.chunk)
            path = "backbones.ops.fused_cpu.selective_scan_gated (numba: dt, the scan, its skip and gate)"
        elif scan is not None:
            dt, Bm, Cm = self._ssm_params(xc)
            out = scan(
                xc.transpose(1, 2).contiguous(), dt.transpose(1, 2).contiguous(), A,
                Bm.transpose(1, 2).contiguous(), Cm.transpose(1, 2).contiguous(), self.D.float(),
                z=None, delta_bias=None, delta_softplus=False, return_last_state=state is not None,
            )  # fmt: skip
            y, hT = out if state is not None else (out, None)
            y = y.transpose(1, 2)  # [B, S, D], includes the D skip
            path = ""
        else:
            dt, Bm, Cm = self._ssm_params(xc)
            y, hT = selective_scan(xc, dt, A, Bm, Cm, h0, chunk=self.chunk, backend=backend)
            y = y + xc * self.D
            why = "; the CUDA scan cannot start from a state" if self.kernel == "kernel" else ""
            path = f"backbones.ops.selective_scan(backend={backend}){why}"
        self.record_path("scan", scan, *SCAN_KERNEL, path)
        if state is not None:
            state["ssm"].copy_(hT)
            state["pos"] = state.get("pos", 0) + S
        if not nb:
            y = y.to(x.dtype) * F.silu(z)
        return self.out_proj(y)

    def step(self, x: Tensor, state: State) -> Tensor:  # [B, d_model] -> [B, d_model]
        # decoding (no grad) on float32 CPU tensors: two numba passes around x_proj (fused_cpu.mamba_step_fused),
        # the products as row kernels (step_linear)
        fused = self.kernel != "reference" and self.scan_backend != "torch"
        xz = step_linear(self.in_proj, x) if fused else self.in_proj(x)
        nb = fused and step_usable(xz, state["ssm"], state["conv"])
        self.record_path("step", None, "", "", f"backbones.mamba.MambaMixer.step{numba_note(nb)}")
        if nb:
            consts = while_unchanged(self, "_fused_cache", None, lambda: fused_cpu.mamba_step_consts(
                self.conv1d.weight[:, 0], self.conv1d.bias, self.dt_proj.weight, self.dt_proj.bias, self.A_log, self.D))
            y = fused_cpu.mamba_step_fused(xz, state["conv"], state["ssm"], lambda t: step_linear(self.x_proj, t),
                                           consts)
            state["pos"] = state.get("pos", 0) + 1
            return step_linear(self.out_proj, y)
        xi, z = xz.chunk(2, dim=-1)  # [B, D]
        window = torch.cat([state["conv"].to(xi.dtype), xi[:, :, None]], dim=-1)  # [B, D, d_conv]
        xc = (window * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias
        xc = F.silu(xc)
        state["conv"].copy_(window[:, :, 1:])
        dt, Bm, Cm = self._ssm_params(xc)  # [B, D], [B, N], [B, N]
        A = -torch.exp(self.A_log.float())
        h = state["ssm"]
        dA = torch.exp(dt[:, :, None].to(h.dtype) * A)  # [B, D, N]
        h.mul_(dA).add_((dt * xc)[:, :, None] * Bm[:, None, :])
        y = torch.matmul(h, Cm[:, :, None].to(h.dtype))[..., 0].to(x.dtype) + xc * self.D
        state["pos"] = state.get("pos", 0) + 1
        return self.out_proj(y * F.silu(z))

    def allocate_state(self, batch_size, max_len, device=None, dtype=None) -> State:
        return {
            "conv": torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            "ssm": torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=dtype),
            "pos": 0,
        }

    def scan_flops_per_token(self, seq_len: int) -> int:
        """Forward elementwise work of the scan per token, independent of length.

        Per (channel, state) element: discretise 3 (dt*A, exp, *B*dt*x), update 2 (mul, add),
        read out 2 (mul by C, sum) = 7; per channel: dt*x 1, D skip 2, SiLU gate 5
        (sigmoid ~4 + mul), softplus 3 = 11."""
        return 7 * self.d_inner * self.d_state + 11 * self.d_inner

    def train_flops_uncounted(self, batch: int, seq_len: int) -> int:
        """The depthwise conv when it is not F.conv1d (causal_conv_silu, or causal_conv1d's CUDA
        kernel): 2 K FLOPs per channel and token forward, as much again per gradient."""
        w = self.in_proj.weight
        kernel_conv = self._cuda_scan(w, None) is not None and kernel_available(*CONV_KERNEL)
        if kernel_conv or (self.fused_conv and self.conv1d.bias is not None):
            return 3 * 2 * batch * seq_len * self.d_inner * self.d_conv
        return 0


@register("mamba")
class Mamba(Backbone):
    """Stack of Mamba1 mixers (no channel mixer, as in the reference Mamba).

    Knobs: d_state=16, d_conv=4, expand=2, dt_rank="auto" (ceil(d_model/16)); speed only:
    chunk=16 (steps between stored scan states), scan_backend="auto" ("numba", "torch"),
    kernel="auto" ("kernel": mamba_ssm's CUDA scan or an error, "reference": the PyTorch scan)."""

    default_mlp_ratio = None
    size_knob = ("expand", 0.5, 8.0, 0)  # d_inner = int(expand * d_model)

    def __init__(self, *args, d_state: int = 16, d_conv: int = 4, expand: float = 2, dt_rank="auto", **kw):
        super().__init__(*args, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, **kw)

    def make_mixer(self, layer_idx: int) -> Mixer:
        return MambaMixer(self.d_model, **self.mixer_kwargs)
