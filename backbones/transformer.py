"""Transformer: pre-norm causal self-attention (SDPA; flash kernels on CUDA) + MLP, KV-cache decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.base import Backbone, Mixer, State, register
from backbones.ops import fused_cpu


class SelfAttention(Mixer):
    """Causal multi-head self-attention. Decoding state: a KV cache `[B, H, max_len, Dh]`."""

    constant_state = False

    def __init__(self, d_model: int, n_heads: int = 4):
        super().__init__()
        assert d_model % n_heads == 0, f"d_model {d_model} not divisible by n_heads {n_heads}"
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        return q, k, v  # [B, H, S, Dh] each

    def forward(self, x: Tensor, state: State | None = None) -> Tensor:
        B, S, D = x.shape
        q, k, v = self._qkv(x)
        if state is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            p = state["pos"]
            if p + S > state["k"].shape[2]:
                raise ValueError(f"KV cache holds {state['k'].shape[2]} positions; asked to write position {p + S - 1}")
            state["k"][:, :, p : p + S] = k
            state["v"][:, :, p : p + S] = v
            state["pos"] = p + S
            kc, vc = state["k"][:, :, : p + S], state["v"][:, :, : p + S]
            mask = None  # one query sees every cached key
            if S > 1:  # query i (absolute p+i) sees keys 0..p+i
                mask = torch.ones(S, p + S, dtype=torch.bool, device=x.device).tril(diagonal=p)
            y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, S, D))

    def step(self, x: Tensor, state: State) -> Tensor:  # [B, D] -> [B, D]
        """One decoding step: the qkv product, the cache write and the attention over the cache, and the output
        product as numba passes (`fused_cpu.linear_rows`, `self_attend_rows`) where `fused_cpu.rows_usable`
        (equal to float32 rounding; SDPA and two products ran ~60 us each at 2 rows), else `forward`."""
        if not fused_cpu.rows_usable(x, self.qkv.weight):
            return super().step(x, state)
        p = state["pos"]  # self_attend_rows checks that the cache holds position p
        y = fused_cpu.self_attend_rows(fused_cpu.linear_rows(x, self.qkv.weight), state["k"], state["v"], p)
        state["pos"] = p + 1
        return fused_cpu.linear_rows(y, self.out.weight)

    def context_flops_per_token(self, context_len: float) -> float:
        return 4 * self.n_heads * self.d_head * context_len  # QK^T and AV

    def allocate_state(self, batch_size, max_len, device=None, dtype=None) -> State:
        shape = (batch_size, self.n_heads, max_len, self.d_head)
        return {
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "v": torch.zeros(shape, device=device, dtype=dtype),
            "pos": 0,
        }


@register("transformer")
class Transformer(Backbone):
    """Pre-norm Transformer decoder; with cross_attention=True, MusicGen's layout
    (self-attention, cross-attention to the text, MLP)."""

    needs_positions = True
    default_mlp_ratio = 4.0

    def make_mixer(self, layer_idx: int) -> Mixer:
        return SelfAttention(self.d_model, self.n_heads)
