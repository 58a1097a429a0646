"""S4D: the diagonal structured state space of Gu, Gupta, Goel & Re (2022), "On the
Parameterization and Initialization of Diagonal State Space Models".

Per channel h (H = d_model channels, N/2 complex modes n, B fixed to 1 and folded into C
as in the paper's minimal implementation):

    A_n = -exp(log_A_real) + i A_imag          S4D-Lin: -1/2 + i pi n; S4D-Inv: -1/2 + i N/pi (N/(2n+1) - 1)
    dA = exp(dt A), dB = (exp(dt A) - 1) / A   zero-order hold, dt = exp(log_dt) in [dt_min, dt_max]
    h_t = dA h_{t-1} + dB u_t                  complex state [B, H, N/2]
    y_t = 2 Re(C . h_t) + D u_t

Training runs the equivalent causal convolution y = K * u + D u with the kernel
K_l = 2 Re(sum_n C_n dB_n dA_n^l) (length L; discretisation and kernel in one numba pass,
backbones.ops.s4d_kernel) through FFTs of length >= 2L (backbones.ops.fft_conv.fft_causal_conv_skip,
one node with a hand-written backward); decoding runs the recurrence (on float32
CPU tensors with its GELU and output layer as one numba pass, `backbones.ops.fused_cpu.s4d_step_fused`).
A prefill from a state adds the state's free response 2 Re(C dA^{t+1} h) and returns the
final state dA^S h + sum_s dA^{S-1-s} dB u_s.

Channel mixing after the SSM, as in the paper: GELU, then a linear layer to 2H and a GLU
(`glu=False`: GELU then a linear layer H -> H). No separate MLP (default_mlp_ratio None).
Complex parameters are stored as real pairs (`C` is [H, N/2, 2]) so that `Module.to(dtype)`
cannot drop imaginary parts; the decoding state is a real view [B, H, N/2, 2] of the complex state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.base import Backbone, Mixer, State, register, while_unchanged
from backbones.ops import fused_cpu
from backbones.ops.fft_conv import fft_causal_conv_skip
from backbones.ops.fused_cpu import numba_usable, step_usable
from backbones.ops.s4d_kernel import discretize, kernel_blocks, kernel_uses_numba, s4d_kernel


class S4DMixer(Mixer):
    """S4D layer: SSM (FFT convolution / recurrence) + GELU + GLU output. State: complex [B, H, N/2] as real pairs."""

    #: decoding steps (no grad, no autocast) on float32 CPU tensors run the recurrence, the GELU and the
    #: output layer as one numba pass (`backbones.ops.fused_cpu.s4d_step_fused`); False runs `_recurrent`,
    #: then `_post` (the reference)
    fused_step = True

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        init: str = "lin",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        glu: bool = True,
    ):
        super().__init__()
        if d_state < 2 or d_state % 2:
            raise ValueError(f"s4d: d_state must be even and >= 2 (N/2 complex modes), got {d_state}")
        if init not in ("lin", "inv"):
            raise ValueError(f"s4d: init must be 'lin' or 'inv', got {init!r}")
        H, n = d_model, d_state // 2
        self.d_model, self.d_state, self.n_modes = d_model, d_state, n
        self.log_dt = nn.Parameter(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.log_A_real = nn.Parameter(torch.full((H, n), math.log(0.5)))
        idx = torch.arange(n, dtype=torch.float32)
        imag = math.pi * idx if init == "lin" else d_state / math.pi * (d_state / (2 * idx + 1) - 1)
        self.A_imag = nn.Parameter(imag.repeat(H, 1))  # [H, N/2]
        self.C = nn.Parameter(torch.randn(H, n, 2) * 0.5**0.5)  # complex C ~ CN(0, 1), as real pairs
        self.D = nn.Parameter(torch.randn(H))
        for p in (self.log_dt, self.log_A_real, self.A_imag):
            p._no_weight_decay = True  # SSM dynamics, as in the reference (hint for optimizers)
        self.glu = glu
        self.out = nn.Linear(H, 2 * H if glu else H)

    # -- discretisation
    def _discrete(self, rtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """dt*A, dA = exp(dt A), dB = (dA - 1) / A and C, each [H, N/2] complex (complex128 for float64)."""
        return discretize(self.log_dt, self.log_A_real, self.A_imag, self.C, rtype)

    @staticmethod
    def _powers(dtA: Tensor, L: int) -> tuple[Tensor, Tensor]:
        """Re and Im of dA^l = exp(l dt A) for l < L, each [H, N/2, L], from real exp/cos/sin
        (vectorised on CPU, unlike the complex exp)."""
        l = torch.arange(L, device=dtA.device, dtype=dtA.real.dtype)
        mag = torch.exp(dtA.real[:, :, None] * l)
        ang = dtA.imag[:, :, None] * l
        return mag * torch.cos(ang), mag * torch.sin(ang)

    def kernel(self, L: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Convolution kernel K [L, H] (without the D skip): K_l = 2 Re(sum_n C_n dB_n dA_n^l)."""
        dtA, _, dB, C = self._discrete(dtype)
        return self._kernel(C * dB, *self._powers(dtA, L)).t()

    @staticmethod
    def _kernel(W: Tensor, Vr: Tensor, Vi: Tensor) -> Tensor:
        """K [H, L] = 2 Re(sum_n W_n V_n) for W [H, N/2] complex and V = Vr + i Vi [H, N/2, L]."""
        return 2 * (W.real[:, None, :] @ Vr - W.imag[:, None, :] @ Vi)[:, 0]

    def _post(self, y: Tensor) -> Tensor:
        y = F.gelu(y)
        return F.glu(self.out(y), dim=-1) if self.glu else self.out(y)

    @staticmethod
    def _rtype(x: Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32  # the SSM runs in fp32 or fp64

    def _state_pairs(self, state: State, rt: torch.dtype) -> Tensor:
        """The decoding state as stored: real pairs [B, H, N/2, 2], checked against the SSM's dtype."""
        h = state["ssm"]
        if h.dtype != rt:
            raise ValueError(f"s4d: state dtype {h.dtype} does not match the SSM's {rt}")
        return h

    def _state(self, state: State, rt: torch.dtype) -> Tensor:
        return torch.view_as_complex(self._state_pairs(state, rt))  # [B, H, N/2]

    def forward(self, x: Tensor, state: State | None = None) -> Tensor:  # [B, S, H]
        S = x.shape[1]
        rt = self._rtype(x)
        u = x.to(rt)
        if state is not None and S == 1:
            return self._post(self._recurrent(u[:, 0], state).to(x.dtype))[:, None]
        if state is None:  # training: the kernel alone
            K = s4d_kernel(self.log_dt, self.log_A_real, self.A_imag, self.C, S, rt)  # [H, S]
        else:  # prefill: the state terms need every power dA^l, l <= S
            dtA, _, dB, C = self._discrete(rt)
            Vr, Vi = self._powers(dtA, S + 1)  # [H, N/2, S+1]
            K = self._kernel(C * dB, Vr[:, :, :S], Vi[:, :, :S])  # [H, S]
        # contiguous [B, S, H]: a transposed layout would make GELU's backward a slow strided loop
        y = fft_causal_conv_skip(u, K, self.D.to(rt))
        if state is not None:
            h = self._state(state, rt)
            V = torch.complex(Vr, Vi)
            # free response of the carried state: 2 Re(C dA^{t+1} h)
            y = y + 2 * torch.einsum("bhn,hnl->blh", h * C, V[:, :, 1:]).real
            # final state: dA^S h + sum_s dA^{S-1-s} dB u_s
            hS = V[:, :, S] * h + dB * torch.einsum("bsh,hns->bhn", u.to(h.dtype), V[:, :, :S].flip(-1))
            state["ssm"].copy_(torch.view_as_real(hS))
        return self._post(y.to(x.dtype))

    def _step_params(self, rtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`_discrete` for decoding: under no_grad, computed once and reused while the parameters
        are unchanged (same storage and version counter), so a step does no discretisation."""
        if torch.is_grad_enabled():
            return self._discrete(rtype)
        return while_unchanged(self, "_step_cache", (self.log_dt, self.log_A_real, self.A_imag, self.C),
                                     lambda: self._discrete(rtype), rtype)

    def _fused_consts(self) -> tuple | None:
        """`fused_cpu.s4d_step_consts` of the float32 discretisation and the output layer (under no_grad),
        reused while they are unchanged; None when the output layer cannot run in the pass (not float32)."""
        def build():
            if not numba_usable(self.out.weight):
                return None
            _, dA, dB, C = self._step_params(torch.float32)
            return fused_cpu.s4d_step_consts(dA, dB, C, self.D, self.out.weight, self.out.bias)

        return while_unchanged(self, "_fused_cache", None, build)

    def _recurrent(self, u: Tensor, state: State) -> Tensor:  # u [B, H] -> SSM output [B, H]
        consts = self._compiling_consts()
        if consts is not None and consts[0].dtype == u.dtype:
            return self._recurrent_real(u, state, consts[0])  # Backbone.compiled_step: real arithmetic
        _, dA, dB, C = self._step_params(u.dtype)
        h = dA * self._state(state, u.dtype) + dB * u[:, :, None]  # [B, H, N/2]
        state["ssm"].copy_(torch.view_as_real(h))
        return 2 * (h * C).sum(-1).real + u * self.D.to(u.dtype)

    def prepare_compiled_step(self) -> None:
        """The constants of `_recurrent_real`, laid out as the state's (Re, Im) pairs [4, H, N]:
        (Re dA, Re dA), (-Im dA, Im dA), (Re dB, Im dB) and (Re C, -Im C) per mode. Computed once per
        `Backbone.compiled_step` call (the step's discretisation) rather than every token."""
        _, dA, dB, C = self._step_params(self._rtype(self.C))
        pairs = [(dA.real, dA.real), (-dA.imag, dA.imag), (dB.real, dB.imag), (C.real, -C.imag)]
        self._keep_compiled_consts(torch.stack([torch.stack(p, -1).flatten(-2) for p in pairs]))

    def _recurrent_real(self, u: Tensor, state: State, consts: Tensor) -> Tensor:
        """`_recurrent` on the state's interleaved (Re, Im) pairs (complex tensors do not compile into
        fused loops): h = dA h + dB u is a1 * h + a2 * swap(h) + b u, with swap exchanging each
        pair; y = 2 Re(C . h) + D u is a sum over pairs of c * h. `consts` = (a1, a2, b, c) [4, H, N]
        from `prepare_compiled_step`. Whole rows in the state's layout: no strided Re/Im reads and
        no stacking before the write (1.1x over separate Re and Im parts)."""
        a1, a2, b, c = consts
        hs = self._state_pairs(state, u.dtype)  # [B, H, N/2, 2]
        h = hs.flatten(-2)  # [B, H, N]
        new = a1 * h + a2 * hs.flip(-1).flatten(-2) + b * u[:, :, None]
        hs.copy_(new.view_as(hs))
        return 2 * (new * c).sum(-1) + u * self.D.to(u.dtype)

    def step(self, x: Tensor, state: State) -> Tensor:  # [B, H] -> [B, H]
        consts = self._fused_consts() if self.fused_step and step_usable(x) else None
        if consts is not None:
            return fused_cpu.s4d_step_fused(x, self._state_pairs(state, torch.float32), consts, self.glu)
        return self._post(self._recurrent(x.to(self._rtype(x)), state).to(x.dtype))

    def step_normed(self, x: Tensor, norm, state: State) -> Tensor:
        """The block's norm and the fused step: the norm's kernel, then the step's (no `RMSNorm.step` wrapper)."""
        nc = norm.step_consts(x) if self.fused_step else None
        consts = self._fused_consts() if nc is not None else None
        if consts is None:
            return super().step_normed(x, norm, state)
        return fused_cpu.s4d_step_fused(x, self._state_pairs(state, torch.float32), consts, self.glu, norm=nc)

    def allocate_state(self, batch_size, max_len, device=None, dtype=None) -> State:
        rt = torch.float64 if dtype == torch.float64 else torch.float32  # the SSM runs in fp32 or fp64
        return {"ssm": torch.zeros(batch_size, self.d_model, self.n_modes, 2, device=device, dtype=rt)}

    def scan_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token the matmul counter misses, for one sequence.

        FFT convolution per channel: three real FFTs of size n = 2L (input, kernel,
        inverse), 2.5 n log2 n each, plus the complex product of n/2 + 1 bins (6 each),
        divided over the L tokens; kernel generation per channel and position: N/2 powers
        dA^l (exp, cos, sin, 2 mul: ~10) and multiply-adds (4), counted per sequence (it is shared by a
        batch); D skip 2, GELU ~8, GLU gate ~5 per channel."""
        L = max(int(seq_len), 1)
        n = 2 * L
        fft = (3 * 2.5 * n * math.log2(n) + 6 * (n // 2 + 1)) / L
        kernel = 14 * self.n_modes
        return int(self.d_model * (fft + kernel + 2 + 8 + (5 if self.glu else 0)))

    def scan_flops_counted(self, batch: int, seq_len: int) -> int:
        """What the counter sees of the kernel generation (once per step, whatever the batch):
        nothing from the numba loops; on the reference path its two [m, N/2] @ [N/2, nb] products
        per channel, forward and both gradients."""
        if kernel_uses_numba(self.log_dt):
            return 0
        m, nb = kernel_blocks(seq_len)
        return 3 * 2 * 2 * self.d_model * m * self.n_modes * nb


@register("s4d")
class S4D(Backbone):
    """Stack of S4D layers (each with its GELU + GLU output; no separate MLP).

    Knobs: d_state=64 (N/2 = 32 complex modes per channel), init="lin" ("inv"),
    dt_min=1e-3, dt_max=1e-1, glu=True."""

    default_mlp_ratio = None
    size_knob = ("d_state", 2, 2048, 2)  # even: N/2 complex modes

    def __init__(self, *args, d_state: int = 64, init: str = "lin", glu: bool = True, **kw):
        super().__init__(*args, d_state=d_state, init=init, glu=glu, **kw)

    def make_mixer(self, layer_idx: int) -> Mixer:
        return S4DMixer(self.d_model, **self.mixer_kwargs)
