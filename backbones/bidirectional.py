"""Bidirectional wrapper: any registered causal backbone as a non-causal sequence model.

    y_fwd = forward_backbone(x)                       # sees the past
    y_bwd = reverse(backward_backbone(reverse(x)))    # sees the future
    y     = y_fwd + y_bwd                   (merge "sum")
          | Linear([y_fwd ; y_bwd])         (merge "concat")

`x [B, S, D] -> y [B, S, D]`. With `lengths [B]`, each clip is reversed within its own
valid frames, so the outputs at valid frames never depend on the padding after them.
The optional cross-attention memory (the text) goes to both directions. Used as the
denoiser of the stage-2 latent diffusion model (ttm/diffusion.py); it has no recurrent
decoding (a denoiser sees the whole sequence at once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from backbones.base import Backbone, build_backbone, count_params, size_to

MERGES = ("sum", "concat")


def reverse_padded(x: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Reverse `[B, S, ...]` along dim 1; with `lengths [B]` only the first lengths[b] steps of
    clip b are reversed (the padding stays in place). Applying it twice is the identity."""
    if lengths is None:
        return x.flip(1)
    S = x.shape[1]
    s = torch.arange(S, device=x.device)[None]  # [1, S]
    L = lengths.to(x.device).long()[:, None]  # [B, 1]
    idx = torch.where(s < L, L - 1 - s, s)  # [B, S]
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, idx)


class Bidirectional(nn.Module):
    """A forward and a backward copy of a causal backbone, merged by sum or concat + Linear."""

    def __init__(self, backbone_factory: Callable[[], Backbone], merge: str = "sum"):
        super().__init__()
        if merge not in MERGES:
            raise ValueError(f"bidirectional merge must be one of {MERGES}, got {merge!r}")
        self.fwd = backbone_factory()
        self.bwd = backbone_factory()
        if not isinstance(self.fwd, Backbone):
            raise ValueError(f"backbone_factory must return a backbones.base.Backbone, got {type(self.fwd).__name__}")
        if self.fwd.d_model != self.bwd.d_model:
            raise ValueError("backbone_factory returned backbones of different widths")
        self.merge = merge
        D = self.fwd.d_model
        self.proj = nn.Linear(2 * D, D) if merge == "concat" else None

    @classmethod
    def build(cls, name: str, merge: str = "sum", **kwargs: Any) -> Bidirectional:
        """Two copies of the registered backbone `name` built with `kwargs`."""
        return cls(lambda: build_backbone(name, **kwargs), merge)

    # -- attributes the harness reads from a backbone
    @property
    def d_model(self) -> int:
        return self.fwd.d_model

    @property
    def cross_attention(self) -> bool:
        return self.fwd.cross_attention

    @property
    def needs_positions(self) -> bool:
        return self.fwd.needs_positions

    @property
    def name(self) -> str:
        return f"bidirectional-{self.fwd.name}"

    def config(self) -> dict[str, Any]:
        return {"denoiser": self.fwd.name, "bidirectional": self.merge, **self.fwd.config()}

    def num_params(self) -> int:
        return count_params(self)

    def scan_flops_per_token(self, seq_len: int) -> int:
        return self.fwd.scan_flops_per_token(seq_len) + self.bwd.scan_flops_per_token(seq_len)

    def scan_flops_counted(self, batch: int, seq_len: int) -> int:
        return self.fwd.scan_flops_counted(batch, seq_len) + self.bwd.scan_flops_counted(batch, seq_len)

    def train_flops_uncounted(self, batch: int, seq_len: int) -> int:
        return self.fwd.train_flops_uncounted(batch, seq_len) + self.bwd.train_flops_uncounted(batch, seq_len)

    def flops_per_token(self, seq_len: int, memory_len: int = 0, mode: str = "train") -> int:
        """Both directions (each direction's causal attention context is the mean, as for the
        causal backbone) plus the concat projection."""
        f = self.fwd.flops_per_token(seq_len, memory_len, mode) + self.bwd.flops_per_token(seq_len, memory_len, mode)
        if self.proj is not None:
            f += (3 if mode == "train" else 1) * 2 * self.proj.weight.numel()
        return int(f)

    # -- forward
    def forward(self, x: Tensor, memory: Tensor | None = None, memory_mask: Tensor | None = None,
                lengths: Tensor | None = None) -> Tensor:
        """`x [B, S, D]` -> `[B, S, D]`; every output position depends on the whole valid clip."""
        yf = self.fwd(x, memory, memory_mask)  # [B, S, D]
        yb = reverse_padded(self.bwd(reverse_padded(x, lengths), memory, memory_mask), lengths)  # [B, S, D]
        if self.proj is None:
            return yf + yb
        return self.proj(torch.cat([yf, yb], dim=-1))


def merge_params(d_model: int, merge: str) -> int:
    """Parameters of the merge layer (concat: Linear 2D -> D with bias)."""
    return 2 * d_model * d_model + d_model if merge == "concat" else 0


def size_bidirectional(
    name: str,
    target_params: int,
    merge: str = "sum",
    vary: str = "n_layers",
    extra_params: Callable[[dict[str, Any]], int] | None = None,
    **fixed: Any,
) -> dict[str, Any]:
    """Backbone kwargs such that both directions + merge layer + `extra_params(kwargs)` come
    closest to `target_params` (sized with backbones.base.size_to on half the target)."""

    def half_extra(kw: dict[str, Any]) -> int:
        e = merge_params(kw["d_model"], merge) + (extra_params(kw) if extra_params else 0)
        return (e + 1) // 2

    res = size_to(name, (target_params + 1) // 2, vary=vary, extra_params=half_extra, **fixed)
    return res.kwargs
