"""S5: the simplified (MIMO, diagonalised) state space layer of Smith, Warrington &
Linderman (2023), through the `s5-pytorch` package (import name `s5`).

Per layer: x [B, L, H] -> S5 SSM (P complex states, HiPPO-N initialisation, ZOH,
parallel associative scan; decoding passes the package's complex state [B, P] from call
to call) -> activation. The activation is S5's default "half_glu1": y = GELU(s);
y * sigmoid(W y) ("half_glu2": s * sigmoid(W GELU(s)); "gelu": GELU only). No separate
MLP (default_mlp_ratio None): the gated output is the layer's channel mixing, as in S5.

Guards around known defects of the package (s5-pytorch 0.2.x):
- `initial_state()` reads a missing attribute: states are built here (complex zeros [B, P],
  held in the decoding state as a real view [B, P, 2], always float32).
- `factor_rank` / bcInit="factorized" refers to an undefined name: never passed.
- Under bf16 autocast its vmap'd scan fails (no batching rule for autocast casts): the
  SSM runs with autocast disabled on float32 inputs and parameters; the output is cast
  back to the input's dtype.
- Its complex parameters (Lambda [P], C [H, P]) would lose their imaginary parts under
  `Module.to(dtype)`: they are stored here as real pairs ([P, 2], [H, P, 2]) and handed
  to the package as complex tensors for each call (torch.func.functional_call).
  count_params counts them as 2 reals per complex entry, like any complex parameter.
The package's stateful parallel forward and its recurrence agree (checked in the tests).

Fast path (`use_package = False`, the default): the package builds the layer (HiPPO-N
initialisation, parameter layout) and stays the reference; the computation is done here.
The scan x_t = Lambda_bar x_{t-1} + B_bar u_t has one diagonal decay for all channels (MIMO: P
states, not H x N), so on CPU it runs as that recurrence, O(B L P), in numba loops with a
hand-written backward (backbones.ops.diag_scan). S5 is time-invariant (Lambda_bar = exp(Lambda dt)
is the same at every step), so on GPUs it runs as the equivalent causal convolution of B_bar u with
Lambda_bar^l per state through complex FFTs of length >= 2L (backbones.ops.fft_conv);
y = Re(C x) + D u. A decoding step is the recurrence (a few [B, P] ops instead of the package's
vmap'd scan; on float32 CPU tensors one numba pass, gate included: `fused_cpu.s5_step_fused`).
The tests check every path against the package's forward, values and gradients.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from backbones.base import Backbone, Mixer, State, register, while_unchanged
from backbones.ops import fused_cpu
from backbones.ops.diag_scan import diag_scan, scan_uses_numba
from backbones.ops.fft_conv import fft_causal_conv
from backbones.ops.fused_cpu import step_usable

_ACTIVATIONS = ("half_glu1", "half_glu2", "gelu")


class S5Mixer(Mixer):
    """S5 SSM + gated activation. State: complex [B, P] as real pairs [B, P, 2] (float32)."""

    use_package = False  # True: run the s5-pytorch package's forward (the reference path)
    #: decoding steps (no grad, no autocast) on float32 CPU tensors: the products, the recurrence, GELU and
    #: the gate in one numba pass (`backbones.ops.fused_cpu.s5_step_fused`); False runs `_step`, F.gelu, `_gate`
    fused_step = True

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        blocks: int = 1,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        activation: str = "half_glu1",
    ):
        super().__init__()
        with warnings.catch_warnings():  # the package uses torch.jit.script, deprecated in torch 2.9+
            warnings.simplefilter("ignore", DeprecationWarning)
            from s5 import S5

        if activation not in _ACTIVATIONS:
            raise ValueError(f"s5: activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if d_state < 1 or blocks < 1 or d_state % blocks:
            raise ValueError(f"s5: d_state ({d_state}) must be a positive multiple of blocks ({blocks})")
        self.d_model, self.d_state, self.activation = d_model, d_state, activation
        self.ssm = S5(d_model, state_width=d_state, block_count=blocks, dt_min=dt_min, dt_max=dt_max)
        seq = self.ssm.seq
        # complex parameters move here as real pairs; the package sees complex views per call
        self.Lambda = nn.Parameter(torch.view_as_real(seq.Lambda.detach()).clone())  # [P, 2]
        self.C = nn.Parameter(torch.view_as_real(seq.C.detach()).clone())  # [H, P, 2]
        del seq._parameters["Lambda"], seq._parameters["C"]
        self.gate = nn.Linear(d_model, d_model) if activation != "gelu" else None

    def _params(self) -> dict[str, Tensor]:
        seq = self.ssm.seq
        return {
            "seq.Lambda": torch.view_as_complex(self.Lambda.float().contiguous()),
            "seq.C": torch.view_as_complex(self.C.float().contiguous()),
            "seq.B": seq.B.float(),
            "seq.D": seq.D.float(),
            "seq.log_step": seq.log_step.float(),
        }

    def _discrete(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """dt Lambda [P], Lambda_bar = exp(dt Lambda) [P], B_bar = (Lambda_bar - 1) / Lambda B [P, H]
        (zero-order hold, as the package's discretize_zoh), C [H, P] (complex64) and D [H]."""
        seq = self.ssm.seq
        lam = torch.view_as_complex(self.Lambda.float().contiguous())  # [P]
        dtl = lam * torch.exp(seq.log_step.float())  # [P]
        lbar = torch.exp(dtl)
        bbar = (1 / lam * (lbar - 1))[:, None] * torch.view_as_complex(seq.B.float().contiguous())  # [P, H]
        return dtl, lbar, bbar, torch.view_as_complex(self.C.float().contiguous()), seq.D.float()

    def _scan(self, u: Tensor, h0: Tensor | None, fft: bool | None = None) -> tuple[Tensor, Tensor]:
        """u [B, L, H] float32, h0 [B, P] complex or None -> y [B, L, H], final state [B, P].
        B_bar u comes out of one matmul as interleaved (Re, Im) pairs [B, L, P, 2], and Re(C x) reads
        the pairs back through one matmul. In between, x_t = Lambda_bar x_{t-1} + B_bar u_t runs
        (`fft=None`: by device) as
          - the recurrence itself on CPU (`backbones.ops.diag_scan`: numba loops over the pairs in
            place, O(B L P); a training step at the demo's shapes ~20% faster than with the FFTs), or
          - a causal convolution with Lambda_bar^l through complex FFTs (`fft=True`; GPUs), run
            channel-major ([B, P, L]: every FFT along contiguous rows, faster here than along the
            strided L even with the two transposes)."""
        dtl, lbar, bbar, C, D = self._discrete()
        B, L, _ = u.shape
        P = self.d_state
        wb = torch.view_as_real(bbar).transpose(1, 2).reshape(2 * P, -1)  # rows Re, Im of B_bar: [2P, H]
        bu = (u @ wb.t()).view(B, L, P, 2)  # B_bar u as pairs
        if fft is None:
            fft = not scan_uses_numba(u)
        if not fft:
            xs, hT = diag_scan(bu, torch.view_as_real(lbar), None if h0 is None else torch.view_as_real(h0))
            xs, hT = xs.view(B, L, 2 * P), torch.view_as_complex(hT)
        else:
            l = torch.arange(L, device=u.device, dtype=torch.float32)
            mag = torch.exp(dtl.real[:, None] * l)  # |Lambda_bar^l|: [P, L]
            ang = dtl.imag[:, None] * l
            k = torch.complex(mag * torch.cos(ang), mag * torch.sin(ang))  # Lambda_bar^l: [P, L]
            xc = fft_causal_conv(torch.view_as_complex(bu).transpose(1, 2), k).transpose(1, 2)  # [B, L, P]
            if h0 is not None:
                xc = xc + h0[:, None, :] * (k * lbar[:, None]).t()  # free response Lambda_bar^(t+1) h0
            xs, hT = torch.view_as_real(xc.contiguous()).reshape(B, L, 2 * P), xc[:, -1]
        wc = torch.stack([C.real, -C.imag], -1).reshape(C.shape[0], 2 * P)  # [H, 2P]
        y = xs @ wc.t()  # Re(C x): [B, L, H]
        return y + u * D, hT

    def _step_params(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Lambda_bar [P], [Re B_bar; Im B_bar]^T [H, 2P], [Re C, -Im C]^T [2P, H], D [H] for decoding:
        under no_grad computed once and reused while the parameters are unchanged (same storage
        and version counter), so a step is two matmuls and a complex multiply-add."""
        def build():
            _, lbar, bbar, C, D = self._discrete()
            return lbar, torch.cat([bbar.real, bbar.imag]).t(), torch.cat([C.real, -C.imag], 1).t(), D

        if torch.is_grad_enabled():
            return build()
        return while_unchanged(self, "_step_cache", None, lambda: tuple(t.contiguous() for t in build()))

    def _step(self, u: Tensor, h: Tensor) -> Tensor:
        """One recurrence step: u [B, H] float32; h [B, P] complex, updated in place -> y [B, H]."""
        lbar, bw, cw, D = self._step_params()
        bu = u @ bw  # [B, 2P]
        P = self.d_state
        h.mul_(lbar).add_(torch.complex(bu[:, :P], bu[:, P:]))
        return torch.cat([h.real, h.imag], 1) @ cw + u * D  # Re(C h) + D u

    def prepare_compiled_step(self) -> None:
        """`_step_params` for `_step_real`, Lambda_bar as (Re, Im) [2, P]: the step's discretisation
        once per `Backbone.compiled_step` call rather than every token."""
        lbar, bw, cw, D = self._step_params()
        self._keep_compiled_consts(torch.stack([lbar.real, lbar.imag]), bw, cw, D)

    def _step_real(self, u: Tensor, h: Tensor, consts: tuple[Tensor, ...]) -> Tensor:
        """`_step` on real and imaginary parts (complex tensors do not compile into fused loops), with
        the constants of `prepare_compiled_step`: u [B, H] float32; h [B, P, 2] updated in place
        -> y [B, H]."""
        lam, bw, cw, D = consts  # [2, P], [H, 2P], [2P, H], [H]
        P = self.d_state
        bu = u @ bw  # [B, 2P]: Re and Im of B_bar u
        hr, hi = h[..., 0], h[..., 1]
        nr = lam[0] * hr - lam[1] * hi + bu[:, :P]
        ni = lam[0] * hi + lam[1] * hr + bu[:, P:]
        h.copy_(torch.stack([nr, ni], -1))
        return torch.cat([nr, ni], 1) @ cw + u * D  # Re(C h) + D u

    def _ssm(self, x: Tensor, state: State | None) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            u = x.float()
            if not self.use_package:
                if state is None:
                    return self._scan(u, None)[0]
                h = self._checked_state(state, x)
                consts = self._compiling_consts() if x.shape[1] == 1 else None
                if consts is not None:  # Backbone.compiled_step
                    return self._step_real(u[:, 0], h, consts)[:, None]
                hc = torch.view_as_complex(h)
                if x.shape[1] == 1:
                    return self._step(u[:, 0], hc)[:, None]
                y, hT = self._scan(u, hc.clone())  # clone: h is overwritten below, autograd keeps h0
                h.copy_(torch.view_as_real(hT))
                return y
            if state is None:
                return functional_call(self.ssm, self._params(), (u,))
            h = self._checked_state(state, x)
            y, hT = functional_call(
                self.ssm, self._params(), (u,), {"state": torch.view_as_complex(h), "return_state": True}
            )
            h.copy_(torch.view_as_real(hT))
            return y

    def _checked_state(self, state: State, x: Tensor) -> Tensor:
        h = state["ssm"]
        if h.shape != (x.shape[0], self.d_state, 2) or h.dtype != torch.float32:
            raise ValueError(
                f"s5: state['ssm'] must be float32 [B, P, 2] = {(x.shape[0], self.d_state, 2)}, "
                f"got {h.dtype} {tuple(h.shape)}"
            )
        return h

    def step(self, x: Tensor, state: State) -> Tensor:  # [B, H] -> [B, H]
        if not (self.fused_step and not self.use_package and step_usable(x)):
            return super().step(x, state)
        return fused_cpu.s5_step_fused(x, self._checked_state(state, x[:, None]), self._fused_consts(), self.activation)

    def step_normed(self, x: Tensor, norm, state: State) -> Tensor:
        """The block's norm and the fused step: the norm's kernel, then the step's (no `RMSNorm.step` wrapper)."""
        nc = norm.step_consts(x) if self.fused_step and not self.use_package else None
        if nc is None:
            return super().step_normed(x, norm, state)
        return fused_cpu.s5_step_fused(x, self._checked_state(state, x[:, None]), self._fused_consts(), self.activation,
                                       norm=nc)

    def _fused_consts(self) -> tuple:
        """`fused_cpu.s5_step_consts` of `_step_params` and the gate (under no_grad), reused while the
        parameters are unchanged."""
        def build():
            g = self.gate
            return fused_cpu.s5_step_consts(*self._step_params(), None if g is None else g.weight,
                                            None if g is None else g.bias)

        return while_unchanged(self, "_fused_cache", None, build)

    def forward(self, x: Tensor, state: State | None = None) -> Tensor:  # [B, S, H]
        s = self._ssm(x, state).to(x.dtype)
        return self._gate(s, F.gelu(s))

    def _gate(self, s: Tensor, y: Tensor) -> Tensor:
        """The activation after the SSM's output s, with y = GELU(s)."""
        if self.activation == "half_glu1":
            return y * torch.sigmoid(self.gate(y))
        if self.activation == "half_glu2":
            return s * torch.sigmoid(self.gate(y))
        return y

    def allocate_state(self, batch_size, max_len, device=None, dtype=None) -> State:
        # the package keeps a complex64 state whatever the model's dtype
        return {"ssm": torch.zeros(batch_size, self.d_state, 2, device=device, dtype=torch.float32)}

    def scan_flops_per_token(self, seq_len: int) -> int:
        """Analytic forward FLOPs per token of the SSM: B u (P x H complex by real: 4PH), C x
        (H x P complex, real part: 4PH), the associative scan (~2 combines of a complex
        multiply + multiply-add per state per token: 2 * 14 P), D skip 2H, activation ~13H."""
        P, H = self.d_state, self.d_model
        return 8 * P * H + 28 * P + 15 * H

    def scan_flops_counted(self, batch: int, seq_len: int) -> int:
        """The counter sees B u and C x as matmuls (forward and both gradients): all 8PH per
        token in the FFT scan, 4PH of them through the package (tests measure both)."""
        return 3 * batch * seq_len * (4 if self.use_package else 8) * self.d_state * self.d_model


@register("s5")
class S5Backbone(Backbone):
    """Stack of S5 layers (s5-pytorch) with S5's gated activation; no separate MLP.

    Knobs: d_state=64 (P complex states), blocks=1 (HiPPO blocks J), dt_min=1e-3,
    dt_max=1e-1, activation="half_glu1" ("half_glu2", "gelu")."""

    default_mlp_ratio = None
    size_knob = ("d_state", 1, 2048, 1)

    def __init__(self, *args, d_state: int = 64, blocks: int = 1, activation: str = "half_glu1", **kw):
        super().__init__(*args, d_state=d_state, blocks=blocks, activation=activation, **kw)

    def make_mixer(self, layer_idx: int) -> Mixer:
        return S5Mixer(self.d_model, **self.mixer_kwargs)
