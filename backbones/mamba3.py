"""Mamba-3 (SISO), laid out as mamba_ssm 2.3.2's `modules/mamba3.py` (`Mamba3(is_mimo=False)`).

    in_proj: x -> (z, x, B, C, dt, A, trap, angle)          no short convolution
    B, C: RMSNorm over the state, + a per-head bias (init 1)
    dt = softplus(dt + dt_bias);  A = -softplus(A) <= -A_floor (data-dependent, per head)
    scan: trapezoidal discretisation with data-dependent rotations of B and C
          (complex states as 2x2 rotations), see `backbones.ops.mamba3`
    y = (scan + D x) * silu(z), then out_proj

Knobs: d_state (16), expand (2), headdim (16), ngroups (1), rope_fraction (0.5: the share of
state channels that rotate), chunk_size (64), A_floor (1e-4), kernel ("auto": mamba_ssm's
Triton `mamba3_siso_combined` on CUDA when it imports, else the PyTorch chunked scan;
"kernel": the Triton kernel or an error; "reference": the PyTorch scan). The Triton kernel
computes in bfloat16 inside (it casts q, k, v to bf16 by design), so kernel and reference
agree to bf16 rounding (~1% relative), not to float32 rounding. It needs power-of-two
d_state and headdim. Decoding (`step`) runs the same scan on one token from the state; on float32 CPU
tensors without the kernel, the recurrence as one numba pass (`backbones.ops.fused_cpu.mamba3_step_fused`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.base import Backbone, Mixer, State, register, step_linear, while_unchanged
from backbones.ops import fused_cpu
from backbones.ops.dispatch import KernelSwitch, check_mode
from backbones.ops.fused_cpu import numba_note, step_usable
from backbones.ops.mamba3 import mamba3_siso_chunked

MAMBA3_KNOBS = ("d_state", "expand", "headdim", "ngroups", "rope_fraction", "chunk_size", "A_floor", "kernel")
SISO_KERNEL = ("mamba_ssm.ops.triton.mamba3.mamba3_siso_combined", "mamba3_siso_combined")
BC_NORM_EPS = 1e-5  # the B and C norms' epsilon
STATE_KEYS = ("angle", "ssm", "k", "v")  # the decoding state, in the scan's order (backbones.ops.mamba3)


class Mamba3Mixer(KernelSwitch, Mixer):
    """The Mamba-3 SISO mixer. Decoding state: the last rotation angles `[B, H, A]`, the SSM
    state `[B, H, P, N]`, and the last rotated k `[B, H, N]` and v `[B, H, P]` (float32)."""

    constant_state = True

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        expand: int = 2,
        headdim: int = 16,
        ngroups: int = 1,
        rope_fraction: float = 0.5,
        chunk_size: int = 64,
        A_floor: float = 1e-4,
        kernel: str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        for knob, v in {"d_state": d_state, "expand": expand, "headdim": headdim, "ngroups": ngroups,
                        "chunk_size": chunk_size}.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"mamba3: {knob} must be a positive integer, got {v!r}")
        if rope_fraction not in (0.5, 1.0):
            raise ValueError(f"mamba3: rope_fraction must be 0.5 or 1.0 (as mamba_ssm), got {rope_fraction!r}")
        self.d_model, self.d_state, self.expand, self.headdim = d_model, d_state, expand, headdim
        self.ngroups, self.rope_fraction, self.chunk_size, self.A_floor = ngroups, rope_fraction, chunk_size, A_floor
        self.kernel = check_mode("mamba3", kernel)
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"mamba3: expand * d_model = {self.d_inner} is not divisible by headdim = {headdim}")
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"mamba3: nheads = {self.nheads} is not divisible by ngroups = {ngroups}")
        rot = int(d_state * rope_fraction)
        self.n_angles = (rot - rot % 2) // 2  # rotating channel pairs
        if self.n_angles < 1:
            raise ValueError(f"mamba3: d_state = {d_state} leaves no channel pair to rotate (need >= {int(4 / (2 * rope_fraction))})")

        H, N, G = self.nheads, d_state, ngroups
        # order: [z, x, B, C, dt, A, trap, angle]
        self.splits = [self.d_inner, self.d_inner, G * N, G * N, H, H, H, self.n_angles]
        self.in_proj = nn.Linear(d_model, sum(self.splits), bias=False)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.B_bias = nn.Parameter(torch.ones(H, N))
        self.C_bias = nn.Parameter(torch.ones(H, N))
        self.B_norm = nn.Parameter(torch.ones(N))  # RMSNorm weights over the state
        self.C_norm = nn.Parameter(torch.ones(N))
        self.D = nn.Parameter(torch.ones(H))
        for p in (self.dt_bias, self.D):
            p._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self._init_dt(dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def _init_dt(self, dt_min, dt_max, dt_init_floor) -> None:
        """dt log-uniform in [dt_min, dt_max], stored as softplus^-1 (skipped on meta: shapes only)."""
        if self.dt_bias.is_meta:
            return
        u = torch.rand_like(self.dt_bias)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _inputs(self, proj: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
        """The scan inputs in suite layout ([b, l, ...]) from in_proj's output; see backbones.ops.mamba3."""
        b, l, _ = proj.shape
        z, xs, Bm, Cm, dd_dt, dd_A, trap, angle = torch.split(proj, self.splits, dim=-1)
        G, N, H = self.ngroups, self.d_state, self.nheads
        sd = torch.promote_types(dtype, torch.float32)  # dt, A and angles in at least float32
        A = (-F.softplus(dd_A.to(sd))).clamp(max=-self.A_floor)  # [b, l, H]
        dt = F.softplus(dd_dt.to(sd) + self.dt_bias.to(sd))
        return dict(
            z=z,
            q=F.rms_norm(Cm.reshape(b, l, G, N), (N,), self.C_norm, eps=BC_NORM_EPS),
            k=F.rms_norm(Bm.reshape(b, l, G, N), (N,), self.B_norm, eps=BC_NORM_EPS),
            v=xs.reshape(b, l, H, self.headdim),
            adt=A * dt, dt=dt, trap=trap,
            angle=angle[:, :, None, :].expand(b, l, H, self.n_angles).to(sd),
        )

    def forward(self, x: Tensor, state: State | None = None) -> Tensor:  # [b, l, d_model]
        return self._mix(self.in_proj(x), x, state)

    def _mix(self, proj: Tensor, x: Tensor, state: State | None) -> Tensor:
        """`forward` from in_proj's output `proj` [b, l, width] (x: the input, for its dtype and device)."""
        b, l, _ = proj.shape
        i = self._inputs(proj, x.dtype)
        st = None if state is None else tuple(state[k] for k in STATE_KEYS)
        kernel = self.pick_kernel(x, *SISO_KERNEL)  # CPU tensors too when asked (Triton interpreter)
        self.record_path("scan", kernel, *SISO_KERNEL, "backbones.ops.mamba3.mamba3_siso_chunked")
        if kernel is not None:
            T = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731  [b, l, H] -> [b, H, l]
            out = kernel(
                i["q"], i["k"], i["v"], T(i["adt"]), T(i["dt"]), T(i["trap"]), self.C_bias, self.B_bias,
                i["angle"], D=self.D, Z=None, Input_States=None if st is None else tuple(s.float() for s in st),
                chunk_size=self.chunk_size, return_final_states=state is not None,
            )
            y, final = (out[0], out[1:]) if state is not None else (out, None)
        else:
            y, final = mamba3_siso_chunked(
                i["q"], i["k"], self.C_bias, self.B_bias, i["v"], i["adt"], i["dt"], i["trap"], i["angle"],
                self.D, st, chunk_size=self.chunk_size,
            )
        if state is not None:
            for key, t in zip(STATE_KEYS, final):
                state[key].copy_(t)
        y = y.to(x.dtype).reshape(b, l, self.d_inner) * F.silu(i["z"])
        return self.out_proj(y)

    def step(self, x: Tensor, state: State) -> Tensor:  # [b, d_model] -> [b, d_model]
        """One decoding step. Decoding (no grad) on float32 CPU tensors and states, without the Triton
        kernel: in_proj's output to the gate in one numba pass (`fused_cpu.mamba3_step_fused`); otherwise
        `forward` on the one token (kernel="reference": the chunked PyTorch scan)."""
        kernel = self.pick_kernel(x, *SISO_KERNEL)
        fused = kernel is None and self.kernel != "reference"  # the products as row kernels (step_linear)
        proj = step_linear(self.in_proj, x) if fused else self.in_proj(x)
        st = {k: state[k] for k in STATE_KEYS}  # in the order the numba pass reads them
        nb = fused and step_usable(proj, *st.values())
        self.record_path("step", kernel, *SISO_KERNEL, f"backbones.mamba3.Mamba3Mixer.step{numba_note(nb)}")
        if not nb:
            return self._mix(proj[:, None], x[:, None], state)[:, 0]
        consts = while_unchanged(self, "_fused_cache", None, lambda: fused_cpu.mamba3_step_consts(
            self.dt_bias, self.B_bias, self.C_bias, self.B_norm, self.C_norm, self.D, self.A_floor, BC_NORM_EPS),
            self.A_floor)
        y = fused_cpu.mamba3_step_fused(proj, st, consts, self.d_inner, self.ngroups)
        return step_linear(self.out_proj, y)

    def allocate_state(self, batch_size: int, max_len: int, device=None, dtype=None) -> State:
        sd = torch.promote_types(dtype or self.in_proj.weight.dtype, torch.float32)
        H, P, N = self.nheads, self.headdim, self.d_state
        z = lambda *s: torch.zeros(batch_size, *s, device=device, dtype=sd)  # noqa: E731
        return {"angle": z(H, self.n_angles), "ssm": z(H, P, N), "k": z(H, N), "v": z(H, P)}

    def scan_flops_per_token(self, seq_len: int) -> int:
        """Chunked SISO scan per token (Q = min(chunk, seq_len)): q k^T in the chunk 2QHN, weights
        and decay 3QH, scores @ v 2QHP, chunk states 2HPN, C h_in 2HPN, rotations 6H(2A),
        D skip and gate 7HP."""
        Q = max(1, min(self.chunk_size, seq_len))
        H, P, N, A = self.nheads, self.headdim, self.d_state, self.n_angles
        return int(2 * Q * H * N + 3 * Q * H + 2 * Q * H * P + 4 * H * P * N + 12 * H * A + 7 * H * P)


def mamba3_mixer_kwargs(mixer_kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(mixer_kwargs) - set(MAMBA3_KNOBS))
    if unknown:
        raise ValueError(f"mamba3: unknown knob(s) {', '.join(unknown)}; expected some of {', '.join(MAMBA3_KNOBS)}")
    return dict(mixer_kwargs)


@register("mamba3")
class Mamba3(Backbone):
    """Mamba-3 SISO blocks only (trapezoidal, rotating states); pass mlp_ratio for an MLP sublayer.

    Knobs: d_state (16), expand (2), headdim (16), ngroups (1), rope_fraction (0.5),
    chunk_size (64), A_floor (1e-4), kernel ("auto" | "kernel" | "reference").
    """

    default_mlp_ratio = None
    size_knob = ("d_state", 4, 4096, 2)

    def make_mixer(self, layer_idx: int) -> Mixer:
        return Mamba3Mixer(self.d_model, **mamba3_mixer_kwargs(self.mixer_kwargs))
