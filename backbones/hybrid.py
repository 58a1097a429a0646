"""Hybrid: Mamba2 blocks with causal self-attention blocks at chosen layer indices
(in the spirit of Jamba / Zamba / Samba), optional MLP sublayers.

Knob `attn_layers`:
  "auto"       every 4th layer, the first at index 1 (0-based: 1, 5, 9, ...), so any
               model with at least 2 layers has attention
  "none"       no attention (then it is the mamba2 backbone)
  [i, j, ...]  0-based layer indices (a comma-separated string "1,3" works too)

No positional embeddings: the Mamba2 layers before and between the attention layers
carry order (as in Jamba). Set mlp_ratio (e.g. 2.0) for an MLP in every block.
"""

from __future__ import annotations

from typing import Any

from backbones.base import Backbone, Mixer, register
from backbones.mamba2 import Mamba2Mixer, mamba2_mixer_kwargs
from backbones.transformer import SelfAttention


def attention_indices(attn_layers: Any, n_layers: int) -> list[int]:
    """Resolve the `attn_layers` knob to sorted 0-based layer indices; bad values raise ValueError."""
    if attn_layers in (None, "none", ""):
        return []
    if attn_layers == "auto":
        return list(range(1, n_layers, 4))
    if isinstance(attn_layers, str):
        try:
            attn_layers = [int(s) for s in attn_layers.split(",")]
        except ValueError:
            raise ValueError(
                f"hybrid: attn_layers must be 'auto', 'none' or layer indices like '1,3', got {attn_layers!r}"
            ) from None
    if isinstance(attn_layers, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in attn_layers):
        raise ValueError(f"hybrid: attn_layers must be 'auto', 'none' or a list of ints, got {attn_layers!r}")
    bad = [i for i in attn_layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"hybrid: attn_layers {bad} out of range for n_layers={n_layers} (0-based indices)")
    return sorted(set(attn_layers))


@register("hybrid")
class Hybrid(Backbone):
    """Mamba2 blocks with self-attention blocks at `attn_layers` ("auto": indices 1, 5, 9, ...).

    Knobs: attn_layers, plus the Mamba2 knobs (d_state, d_conv, expand, headdim, ngroups,
    chunk_size, kernel). Attention uses n_heads.
    """

    default_mlp_ratio = None
    size_knob = ("d_state", 1, 4096, 1)

    @property
    def attn_layers(self) -> list[int]:
        return attention_indices(self.mixer_kwargs.get("attn_layers", "auto"), self.n_layers)

    def make_mixer(self, layer_idx: int) -> Mixer:
        kw = mamba2_mixer_kwargs(self.name, self.mixer_kwargs, own=("attn_layers",))
        if layer_idx in self.attn_layers:
            return SelfAttention(self.d_model, self.n_heads)
        return Mamba2Mixer(self.d_model, **kw)
