"""Audio Spectrogram Transformer (AudioSet tagger) through transformers, 16 kHz mono.

One pass gives per-window embeddings (the model's pooled output, `[windows, D]`) and
label logits (`[windows, n_labels]`, AudioSet's 527 for the default checkpoint
`MIT/ast-finetuned-audioset-10-10-0.4593`), for the KL metrics.

Windowing follows the KL convention chosen (eval.metrics):
  "audiocraft": non-overlapping 10 s segments, no padding in time, segments of
                0.15 s or less dropped (the feature extractor pads its fbank to
                1024 frames, AST's own input length);
  "sam":        stable-audio-metrics: the clip is peak-normalised to -1 dBFS, windows
                of 10 s every 5 s, a short window longer than 15% of 10 s is zero-padded
                to 10 s.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from eval.embedders.base import PretrainedEmbedder, from_pretrained, register
from eval.metrics import audiocraft_segments, sam_windows

WINDOWINGS = ("audiocraft", "sam")


@register("ast")
class ASTEmbedder(PretrainedEmbedder):
    default_ckpt = "MIT/ast-finetuned-audioset-10-10-0.4593"
    sample_rate = 16000
    channels = 1

    def __init__(
        self,
        ckpt: str | os.PathLike | None = None,
        revision: str | None = None,
        windowing: str = "audiocraft",
        window_s: float = 10.0,
        hop_s: float | None = None,
        batch_size: int = 8,
        device: str = "cpu",
    ):
        super().__init__(ckpt, revision, device)
        if windowing not in WINDOWINGS:
            raise ValueError(f"ast: windowing must be one of {', '.join(WINDOWINGS)}, got {windowing!r}")
        self.windowing = windowing
        self.window_s = float(window_s)
        self.hop_s = float(hop_s if hop_s is not None else (window_s if windowing == "audiocraft" else window_s / 2))
        self.min_window_s = 0.15
        self.peak_norm_db = -1.0 if windowing == "sam" else None
        self.batch_size = int(batch_size)
        self._fe: Any = None

    @property
    def dim(self) -> int:
        return int(self._config().get("hidden_size", 768))

    @property
    def labels(self) -> list[str]:
        id2label = self._config().get("id2label", {})
        return [id2label[k] for k in sorted(id2label, key=int)]

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "windowing": self.windowing,
            "min_window_s": self.min_window_s,
            "peak_norm_db": self.peak_norm_db,
        }

    def load(self) -> None:
        if self._model is not None:
            return
        from transformers import ASTFeatureExtractor, ASTForAudioClassification

        d, _ = self._resolve()
        self._model = from_pretrained(ASTForAudioClassification, d, self.name).eval().to(self.device)
        self._fe = from_pretrained(ASTFeatureExtractor, d, self.name)
        if self._fe.sampling_rate != self.sample_rate:
            raise ValueError(f"ast: {d}: feature extractor sampling_rate {self._fe.sampling_rate}, expected {self.sample_rate}")

    def _windows(self, x: np.ndarray) -> list[np.ndarray]:
        sr, n = self.sample_rate, len(x)
        win = int(self.window_s * sr)
        if self.windowing == "audiocraft":
            return [x[s:e] for s, e in audiocraft_segments(n, sr, self.window_s, self.min_window_s)]
        peak = float(np.abs(x).max()) if n else 0.0
        if peak > 0:
            x = x * (10 ** (self.peak_norm_db / 20) / peak)
        out = []
        for s, e in sam_windows(n, sr, self.window_s, self.hop_s):
            w = x[s:e]
            if len(w) < win and len(w) > 0.15 * win:
                w = np.pad(w, (0, win - len(w)))
            out.append(w)
        return out

    @torch.no_grad()
    def features(self, wav: torch.Tensor) -> dict[str, np.ndarray]:
        self.load()
        x = self._check(wav)[0].numpy().astype(np.float32)
        wins = self._windows(x)
        embs, logits = [], []
        for i in range(0, len(wins), self.batch_size):
            inp = self._fe(wins[i : i + self.batch_size], sampling_rate=self.sample_rate, return_tensors="pt").to(self.device)
            pooled = self._model.audio_spectrogram_transformer(**inp).pooler_output  # [B, D]
            embs.append(pooled.float().cpu())
            logits.append(self._model.classifier(pooled).float().cpu())
        if not embs:
            n_labels = int(self._model.config.num_labels)
            return {"emb": np.zeros((0, self.dim), np.float32), "logits": np.zeros((0, n_labels), np.float32)}
        return {"emb": torch.cat(embs).numpy(), "logits": torch.cat(logits).numpy()}

    def logits(self, wav: torch.Tensor) -> torch.Tensor:
        """`wav [C, N]` -> label logits per window `[windows, n_labels]`."""
        return torch.from_numpy(self.features(self._check(wav))["logits"])
