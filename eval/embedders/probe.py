"""The offline probe (eval/probe.py) as an embedder: one embedding per clip, `[1, D]`.

Built from a trained probe file (`ckpt=` / `probe_path=`) or a `Probe` object. The
cache key holds the probe's settings, classes, training-manifest hash and a hash of
its weights, so a retrained probe never reuses old embeddings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval.embedders.base import Embedder, register
from eval.probe import Probe


@register("probe")
class ProbeEmbedder(Embedder):
    channels = 1

    def __init__(self, ckpt: str | os.PathLike | None = None, probe: Probe | None = None, probe_path: str | os.PathLike | None = None):
        path = probe_path or ckpt
        self.path = Path(path).expanduser() if path else None
        self._probe = probe
        self.sample_rate = probe.sample_rate if probe is not None else 16000

    @property
    def probe(self) -> Probe:
        if self._probe is None:
            ok, why = self.available()
            if not ok:
                raise FileNotFoundError(why)
            self._probe = Probe.load(self.path)
            self.sample_rate = self._probe.sample_rate
        return self._probe

    @property
    def dim(self) -> int:
        return self.probe.dim

    def available(self) -> tuple[bool, str]:
        if self._probe is not None:
            return True, ""
        if self.path is None:
            return False, "probe: no probe given; it is trained on the reference manifest's train split, or pass --probe PATH"
        if not (self.path.is_file() or (self.path / "probe.pt").is_file()):
            return False, f"probe: probe file {self.path} not found"
        return True, ""

    def settings(self) -> dict[str, Any]:
        ok, _ = self.available()
        ident = self.probe.identity() if ok else {"path": str(self.path) if self.path else None}
        return {**super().settings(), **ident}

    def features(self, wav: torch.Tensor) -> dict[str, np.ndarray]:
        p = self.probe
        x = self._check(wav)
        emb = p.embed([x])  # [1, D]
        with torch.no_grad():
            logits = p.net.heads_out(emb)  # {attr: [1, K]}
            text_space = p.net.audio_text(emb)  # [1, E] contrastive head
        out = {"emb": emb.numpy().astype(np.float32), "audio_text": text_space.numpy().astype(np.float32)}
        out.update({f"logits_{a}": v.numpy().astype(np.float32) for a, v in logits.items()})
        return out
