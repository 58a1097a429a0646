"""Backbones defined outside the registry, as a user would write them, for the contract tests.

SomeBackbone          a correct one: a per-channel exponential moving average (EMA)
                      recurrence, gated, plus the shared MLP.
PeekingBackbone       broken on purpose: the next token leaks into each output (not causal).
StepMismatchBackbone  broken on purpose: step() decays the state faster than forward().
DeadParamBackbone     broken on purpose: one parameter never gets a gradient.

None of them is registered: they are loaded by dotted path
(`example_user_backbone:SomeBackbone`) or file path
(`tests/example_user_backbone.py:SomeBackbone`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.base import Backbone, Mixer, State


class EMAMixer(Mixer):
    """h_t = a * h_{t-1} + (1 - a) * W_in x_t (a = sigmoid(decay_logit), per channel);
    y_t = W_out (h_t * silu(W_g x_t)). Decoding state: h `[B, D]`."""

    constant_state = True

    def __init__(self, d_model: int, peek: bool = False, step_decay_power: float = 1.0):
        super().__init__()
        self.peek, self.step_decay_power = peek, step_decay_power
        self.inp = nn.Linear(d_model, d_model)
        self.gate = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.decay_logit = nn.Parameter(torch.linspace(-1.0, 2.0, d_model))

    def forward(self, x: Tensor, state: State | None = None) -> Tensor:  # [B, S, D]
        u = self.inp(x)
        if self.peek:
            u = u + F.pad(x[:, 1:], (0, 0, 0, 1))  # the next token leaks in
        a = torch.sigmoid(self.decay_logit)  # [D]
        h = torch.zeros_like(u[:, 0]) if state is None else state["h"].to(u.dtype)  # [B, D]
        hs = []
        for t in range(x.shape[1]):
            h = a * h + (1 - a) * u[:, t]
            hs.append(h)
        if state is not None:
            state["h"].copy_(h)
        return self.out(torch.stack(hs, 1) * F.silu(self.gate(x)))

    def step(self, x: Tensor, state: State) -> Tensor:  # [B, D]
        a = torch.sigmoid(self.decay_logit) ** self.step_decay_power
        h = a * state["h"].to(x.dtype) + (1 - a) * self.inp(x)
        state["h"].copy_(h)
        return self.out(h * F.silu(self.gate(x)))

    def allocate_state(self, batch_size, max_len, device=None, dtype=None) -> State:
        return {"h": torch.zeros(batch_size, self.inp.in_features, device=device, dtype=dtype)}


class SomeBackbone(Backbone):
    """EMA recurrence + MLP blocks: a user backbone that meets the contract."""

    name = "some_backbone"
    default_mlp_ratio = 2.0

    def make_mixer(self, layer_idx: int) -> Mixer:
        return EMAMixer(self.d_model)


class PeekingBackbone(SomeBackbone):
    name = "peeking_backbone"

    def make_mixer(self, layer_idx: int) -> Mixer:
        return EMAMixer(self.d_model, peek=True)


class StepMismatchBackbone(SomeBackbone):
    name = "step_mismatch_backbone"

    def make_mixer(self, layer_idx: int) -> Mixer:
        return EMAMixer(self.d_model, step_decay_power=2.0)


class DeadParamMixer(EMAMixer):
    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.unused = nn.Parameter(torch.ones(d_model))  # never used in forward: gets no gradient


class DeadParamBackbone(SomeBackbone):
    """Broken on purpose: a parameter that never receives a gradient."""

    name = "dead_param_backbone"

    def make_mixer(self, layer_idx: int) -> Mixer:
        return DeadParamMixer(self.d_model)
