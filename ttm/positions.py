"""Absolute position tables added to the backbone's input (`model.positions`, an ablation axis).

    auto        the backbone's own choice: `needs_positions` (attention) -> sinusoidal, else none
    none        no positions (an SSM or convolution orders its input itself)
    sinusoidal  [sin, cos] interleaved per frequency pair, angle pos / 10000^(2i/D)
    study       the reference study's table (its released code, after MusicGen/audiocraft): [cos | sin]
                halves, angle pos / 10000^(i/(D/2 - 1)); added in prefix models, SSMs included, over the
                whole [text; audio] sequence from position 0

A prefix LM adds its table over [memory; audio] (memory = null token + text), a cross LM over the
audio alone; recurrent decoding adds the row of each new position.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from backbones.base import sinusoidal_positions

Positions = Literal["auto", "none", "sinusoidal", "study"]


def resolve_positions(positions: str, needs_positions: bool) -> Literal["none", "sinusoidal", "study"]:
    """The table a model uses: `auto` becomes sinusoidal for a backbone that needs positions, else none."""
    if positions not in ("auto", "none", "sinusoidal", "study"):
        raise ValueError(f"model.positions must be auto, none, sinusoidal or study, got {positions!r}")
    if positions == "auto":
        return "sinusoidal" if needs_positions else "none"
    return positions  # type: ignore[return-value]


def study_positions(n: int, d: int, offset: int = 0, device=None) -> Tensor:
    """The study's table `[n, d]` from position `offset`: [cos(angle) | sin(angle)] with angle
    pos / 10000^(i / (d/2 - 1)), i < d/2 (d even)."""
    if d % 2 or d < 4:
        raise ValueError(f"the study's sinusoid needs an even d_model >= 4, got {d}")
    half = d // 2
    pos = torch.arange(offset, offset + n, device=device, dtype=torch.float32)[:, None]
    i = torch.arange(half, device=device, dtype=torch.float32)
    ang = pos / (10000.0 ** (i / (half - 1)))  # [n, d/2]
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)


def position_table(kind: str, n: int, d: int, offset: int = 0, device=None) -> Tensor:
    """`[n, d]` rows for positions offset..offset+n-1 of the table `kind` (sinusoidal or study)."""
    if kind == "study":
        return study_positions(n, d, offset, device)
    if kind == "sinusoidal":
        return sinusoidal_positions(n, d, offset, device=device)
    raise ValueError(f"no position table for {kind!r}")
