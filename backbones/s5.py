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
The package's stateful parallel forward and its recurrence agree (checked in the tests),
so prefill and step both use its forward with a state.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from backbones.base import Backbone, Mixer, State, register

_ACTIVATIONS = ("half_glu1", "half_glu2", "gelu")


class S5Mixer(Mixer):
    """S5 SSM + gated activation. State: complex [B, P] as real pairs [B, P, 2] (float32)."""

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

    def _ssm(self, x: Tensor, state: State | None) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            u = x.float()
            if state is None:
                return functional_call(self.ssm, self._params(), (u,))
            h = state["ssm"]
            if h.shape != (x.shape[0], self.d_state, 2) or h.dtype != torch.float32:
                raise ValueError(
                    f"s5: state['ssm'] must be float32 [B, P, 2] = {(x.shape[0], self.d_state, 2)}, "
                    f"got {h.dtype} {tuple(h.shape)}"
                )
            y, hT = functional_call(
                self.ssm, self._params(), (u,), {"state": torch.view_as_complex(h), "return_state": True}
            )
            h.copy_(torch.view_as_real(hT))
            return y

    def forward(self, x: Tensor, state: State | None = None) -> Tensor:  # [B, S, H]
        s = self._ssm(x, state).to(x.dtype)
        y = F.gelu(s)
        if self.activation == "half_glu1":
            return y * torch.sigmoid(self.gate(y))
        if self.activation == "half_glu2":
            return s * torch.sigmoid(self.gate(y))
        return y

    def allocate_state(self, batch_size, max_len, device=None, dtype=None) -> State:
        # the package keeps a complex64 state whatever the model's dtype
        return {"ssm": torch.zeros(batch_size, self.d_state, 2, device=device, dtype=torch.float32)}

    def scan_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token the matmul counter misses (the package's complex matmuls
        run through vmap and are not nn.Linear): B u (P x H complex by real: 4PH), C x
        (H x P complex, real part: 4PH), the associative scan (~2 combines of a complex
        multiply + multiply-add per state per token: 2 * 14 P), D skip 2H, activation ~13H."""
        P, H = self.d_state, self.d_model
        return 8 * P * H + 28 * P + 15 * H


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
