"""SiMBA (Patro & Agneeswaran 2024) as the study used it: a Mamba2 sequence mixer plus a
channel mixer in every block.

Channel mixers (knob `channel_mixer`):
  "mlp"    d -> mlp_ratio*d -> d with GELU (the study's released code; mlp_ratio 2.0)
  "einfft" the SiMBA paper's EinFFT: FFT over the channels (split into blocks), two
           complex block-diagonal layers applied with einsum (ReLU between), soft
           shrinkage, inverse FFT. It acts on each token alone, so it stays causal
           (the paper's image version also transforms over tokens; here it must not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.base import MLP, Backbone, Mixer, register
from backbones.mamba2 import Mamba2Mixer, mamba2_mixer_kwargs

CHANNEL_MIXERS = ("mlp", "einfft")


class EinFFT(nn.Module):
    """Per-token EinFFT channel mixer `[..., D] -> [..., D]`.

    The D channels are viewed as `[num_blocks, block_size]` and transformed by a 2-D FFT
    (orthonormal). Two complex block-diagonal layers (weights `[num_blocks, bs, bs]`,
    kept as separate real and imaginary parts) with a ReLU on both parts in between,
    soft shrinkage (sparsity), then the inverse FFT; the real part is returned.
    """

    def __init__(self, d_model: int, num_blocks: int = 4, sparsity_threshold: float = 0.01, scale: float = 0.02):
        super().__init__()
        if not isinstance(num_blocks, int) or num_blocks < 1 or d_model % num_blocks:
            raise ValueError(f"simba: einfft_blocks must be a positive divisor of d_model={d_model}, got {num_blocks!r}")
        self.num_blocks, self.block_size = num_blocks, d_model // num_blocks
        self.sparsity_threshold = sparsity_threshold
        nb, bs = num_blocks, self.block_size
        # [real/imag, blocks, in, out] and [real/imag, blocks, out], N(0, scale^2) as in SiMBA
        self.w1 = nn.Parameter(torch.empty(2, nb, bs, bs))
        self.b1 = nn.Parameter(torch.empty(2, nb, bs))
        self.w2 = nn.Parameter(torch.empty(2, nb, bs, bs))
        self.b2 = nn.Parameter(torch.empty(2, nb, bs))
        if not self.w1.is_meta:  # meta = shapes only (parameter counting)
            for p in (self.w1, self.b1, self.w2, self.b2):
                nn.init.normal_(p, std=scale)

    @staticmethod
    def _complex_linear(re: Tensor, im: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """(re + i im) @ (w[0] + i w[1]) + (b[0] + i b[1]), block-diagonal: `[..., nb, bs]`."""
        mm = lambda t, k: torch.einsum("...ni,nio->...no", t, k)
        return mm(re, w[0]) - mm(im, w[1]) + b[0], mm(re, w[1]) + mm(im, w[0]) + b[1]

    def forward(self, x: Tensor) -> Tensor:
        shape, dtype = x.shape, x.dtype
        u = x.float().reshape(*shape[:-1], self.num_blocks, self.block_size)  # [..., nb, bs]
        u = torch.fft.fft2(u, dim=(-2, -1), norm="ortho")
        re, im = self._complex_linear(u.real, u.imag, self.w1.float(), self.b1.float())
        re, im = self._complex_linear(F.relu(re), F.relu(im), self.w2.float(), self.b2.float())
        if self.sparsity_threshold:
            re = F.softshrink(re, self.sparsity_threshold)
            im = F.softshrink(im, self.sparsity_threshold)
        y = torch.fft.ifft2(torch.complex(re, im), dim=(-2, -1), norm="ortho").real
        return y.reshape(shape).to(dtype)


@register("simba")
class SiMBA(Backbone):
    """Mamba2 mixer + channel mixer per block (the study's Prefix / Cross SiMBA).

    Knobs: the Mamba2 knobs (d_state, d_conv, expand, headdim, ngroups, chunk_size,
    kernel), channel_mixer ("mlp" | "einfft"), einfft_blocks (4).
    """

    default_mlp_ratio = 2.0

    def _own(self) -> dict:
        kw = self.mixer_kwargs
        mamba2_mixer_kwargs(self.name, kw, own=("channel_mixer", "einfft_blocks"))
        kind = kw.get("channel_mixer", "mlp")
        if kind not in CHANNEL_MIXERS:
            raise ValueError(f"simba: channel_mixer must be one of {', '.join(CHANNEL_MIXERS)}, got {kind!r}")
        return {"channel_mixer": kind, "einfft_blocks": kw.get("einfft_blocks", 4)}

    def make_mixer(self, layer_idx: int) -> Mixer:
        self._own()
        return Mamba2Mixer(self.d_model, **mamba2_mixer_kwargs(self.name, self.mixer_kwargs,
                                                               own=("channel_mixer", "einfft_blocks")))

    def make_channel_mixer(self, layer_idx: int) -> nn.Module | None:
        own = self._own()
        if own["channel_mixer"] == "einfft":
            return EinFFT(self.d_model, own["einfft_blocks"])
        return None if self.mlp_ratio is None else MLP(self.d_model, self.mlp_ratio)
