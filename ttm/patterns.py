"""Codebook interleaving patterns: how K parallel codebook streams become one sequence.

A codec gives codes `[B, K, T]` (K codebooks, T frames). The LM predicts a sequence
`[B, K', S]`: at each of the S steps it emits one token per modelled codebook (K'
of them, one head each). A pattern maps codes to that sequence and back.

    delay    K' = K, S = T + K - 1. Codebook k is shifted right by k steps (MusicGen):
             step s holds codes[k, s - k]; positions outside [k, T + k) hold the special
             token `cardinality`. Codebook k at frame t is predicted after codebook 0..k-1
             of the same frame, so the coarse codebooks condition the fine ones.

                 k=0:  a0 a1 a2 a3  .  .
                 k=1:   .  b0 b1 b2 b3  .      (. = special token)
                 k=2:   .   . c0 c1 c2 c3

    parallel K' = K, S = T. All codebooks of frame t are predicted at step t, independently
             given the past.
    first_k  K' = k, S = T. Only the first k codebooks, in parallel (k=1: the discrete
             bottleneck of a two-stage model).

The special token is never a prediction target: heads have `cardinality` outputs and
`valid_mask` marks which positions are scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Pattern:
    kind: str  # "delay" | "parallel" | "first_k"
    n_codebooks: int  # K, the codec's codebooks
    cardinality: int  # the special token id equals this
    k: int = 1  # for first_k

    def __post_init__(self):
        if self.kind not in ("delay", "parallel", "first_k"):
            raise ValueError(f"model.pattern must be delay, parallel or first_k, got {self.kind!r}")
        if self.kind == "first_k" and not 1 <= self.k <= self.n_codebooks:
            raise ValueError(f"model.first_k must be in [1, {self.n_codebooks}], got {self.k}")

    @property
    def special(self) -> int:
        return self.cardinality

    @property
    def n_out(self) -> int:
        """K': codebooks the LM models."""
        return self.k if self.kind == "first_k" else self.n_codebooks

    @property
    def delays(self) -> list[int]:
        return list(range(self.n_out)) if self.kind == "delay" else [0] * self.n_out

    def seq_len(self, n_frames: int) -> int:
        return n_frames + max(self.delays)

    def n_frames(self, seq_len: int) -> int:
        return seq_len - max(self.delays)

    def valid_mask(self, lengths: Tensor, seq_len: int) -> Tensor:
        """`lengths [B]` valid frames per clip -> `[B, K', S]` bool: positions that hold real codes."""
        s = torch.arange(seq_len, device=lengths.device)  # [S]
        d = torch.tensor(self.delays, device=lengths.device)[:, None]  # [K', 1]
        return (s >= d)[None] & (s[None, None] < lengths[:, None, None] + d[None])

    def build(self, codes: Tensor) -> Tensor:
        """`codes [B, K, T] -> seq [B, K', S]` with the special token where no code is."""
        codes = codes[:, : self.n_out]
        B, K, T = codes.shape
        if self.kind != "delay":
            return codes.clone()
        S = self.seq_len(T)
        seq = codes.new_full((B, K, S), self.special)
        for k in range(K):
            seq[:, k, k : k + T] = codes[:, k]
        return seq

    def revert(self, seq: Tensor) -> Tensor:
        """`seq [B, K', S] -> codes [B, K', T]` (inverse of build)."""
        if self.kind != "delay":
            return seq.clone()
        T = self.n_frames(seq.shape[-1])
        return torch.stack([seq[:, k, k : k + T] for k in range(seq.shape[1])], dim=1)
