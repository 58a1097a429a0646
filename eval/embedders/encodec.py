"""EnCodec continuous embeddings through transformers (EncodecModel), as fadtk's FAD-EnCodec.

The encoder's output before quantisation, `[frames, D]` (75 frames/s and D = 128 for
the default `facebook/encodec_24khz`). The 24 kHz model encodes the whole clip at
once; a checkpoint with a chunk length (the 48 kHz model) encodes consecutive chunks
of that length, as fadtk does. The clip embedding is the mean over frames.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from eval.embedders.base import PretrainedEmbedder, from_pretrained, register


@register("encodec")
class EncodecEmbedder(PretrainedEmbedder):
    default_ckpt = "facebook/encodec_24khz"

    def __init__(self, ckpt: str | os.PathLike | None = None, revision: str | None = None, device: str = "cpu"):
        super().__init__(ckpt, revision, device)
        try:
            cfg = self._config()
            self.sample_rate = int(cfg.get("sampling_rate", 24000))
            self.channels = int(cfg.get("audio_channels", 1))
        except FileNotFoundError:  # not available here: keep the 24 kHz model's values for --list
            self.sample_rate, self.channels = 24000, 1

    @property
    def dim(self) -> int:
        return int(self._config().get("hidden_size", 128))

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "layer": "encoder output (before quantisation)"}

    def load(self) -> None:
        if self._model is None:
            from transformers import EncodecModel

            self._model = from_pretrained(EncodecModel, self._resolve()[0], self.name).eval().to(self.device)

    @torch.no_grad()
    def features(self, wav: torch.Tensor) -> dict[str, np.ndarray]:
        self.load()
        x = self._check(wav)[None].to(self.device)  # [1, C, N]
        chunk = getattr(self._model.config, "chunk_length", None)
        pieces = [x] if not chunk else [x[..., s : s + chunk] for s in range(0, x.shape[-1], chunk)]
        frames = [self._model.encoder(p)[0].T.float().cpu() for p in pieces if p.shape[-1] > 0]  # [T_i, D]
        return {"emb": torch.cat(frames).numpy()}
