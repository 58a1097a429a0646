"""LAION-CLAP through transformers (ClapModel + ClapProcessor), 48 kHz mono.

Audio: the clip is cut into `window_s` windows (default 10 s, CLAP's input length)
every `hop_s` (default 10 s, plus one window aligned to the end), each window goes
through the processor (a clip shorter than a window is padded the processor's way,
"repeatpad" for the LAION checkpoints) and the model; frame embeddings are the
L2-normalised audio projections `[windows, D]`.
Text: `embed_text(captions) -> [B, D]`, L2-normalised.

Default checkpoint `laion/larger_clap_music`; `laion/clap-htsat-unfused` also works.
A checkpoint whose text embeddings collapse (mean pairwise cosine between distinct
captions > 0.99) is refused when loaded: its CLAP score could not depend on the caption.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from eval.embedders.base import PretrainedEmbedder, from_pretrained, register
from eval.metrics import mean_pairwise_cosine

KNOWN_CHECKPOINTS = ("laion/larger_clap_music", "laion/clap-htsat-unfused")
COLLAPSE_THRESHOLD = 0.99
# distinct captions used by the collapse guard
GUARD_CAPTIONS = (
    "A slow chorale in F# minor played by a string ensemble.",
    "A fast solo piano piece in C major.",
    "Heavy distorted electric guitar riffs with loud drums.",
    "A calm flute melody over soft harp arpeggios.",
    "An upbeat brass band march.",
    "Ambient electronic pads with a deep bass drone.",
    "A jazz trio with upright bass, brushed drums and piano.",
    "Rain falling on a tin roof.",
)


@register("clap")
class ClapEmbedder(PretrainedEmbedder):
    default_ckpt = KNOWN_CHECKPOINTS[0]
    sample_rate = 48000
    channels = 1

    def __init__(
        self,
        ckpt: str | os.PathLike | None = None,
        revision: str | None = None,
        window_s: float = 10.0,
        hop_s: float = 10.0,
        batch_size: int = 8,
        device: str = "cpu",
    ):
        super().__init__(ckpt, revision, device)
        if not (window_s > 0 and hop_s > 0):
            raise ValueError(f"clap: window_s and hop_s must be > 0, got {window_s}, {hop_s}")
        self.window_s, self.hop_s, self.batch_size = float(window_s), float(hop_s), int(batch_size)
        self._processor: Any = None

    @property
    def dim(self) -> int:
        return int(self._config().get("projection_dim", 512))

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "padding": "processor default", "normalized": True}

    def load(self) -> None:
        if self._model is not None:
            return
        from transformers import ClapModel, ClapProcessor

        d, _ = self._resolve()
        model = from_pretrained(ClapModel, d, self.name).eval().to(self.device)
        processor = from_pretrained(ClapProcessor, d, self.name)
        fe = processor.feature_extractor
        if fe.sampling_rate != self.sample_rate:
            raise ValueError(f"clap: {d}: feature extractor sampling_rate {fe.sampling_rate}, expected {self.sample_rate}")
        if self.window_s > fe.max_length_s:
            raise ValueError(f"clap: window_s {self.window_s} exceeds the model's input length {fe.max_length_s} s")
        self._model, self._processor = model, processor
        try:
            self.check_text_collapse()
        except ValueError:
            self._model = self._processor = None
            raise

    def check_text_collapse(self, captions: tuple[str, ...] = GUARD_CAPTIONS) -> float:
        """Mean pairwise cosine of the text embeddings of distinct captions; raises when > 0.99."""
        sim = mean_pairwise_cosine(self.embed_text(list(captions)))
        if sim > COLLAPSE_THRESHOLD:
            raise ValueError(
                f"clap: checkpoint {self.ckpt} refused: its text embeddings collapse (mean pairwise cosine "
                f"{sim:.4f} between {len(captions)} distinct captions > {COLLAPSE_THRESHOLD}), so a CLAP score "
                "would not depend on the caption"
            )
        return sim

    @torch.no_grad()
    def embed_text(self, captions: list[str]) -> torch.Tensor:
        """captions -> `[B, D]` L2-normalised text embeddings."""
        if self._model is None:
            self.load()
        out = []
        for i in range(0, len(captions), self.batch_size):
            tok = self._processor.tokenizer(
                list(captions[i : i + self.batch_size]), padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            t = self._model.get_text_features(**tok)
            t = t if torch.is_tensor(t) else t.pooler_output
            out.append(torch.nn.functional.normalize(t.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.no_grad()
    def features(self, wav: torch.Tensor) -> dict[str, np.ndarray]:
        self.load()
        x = self._check(wav)[0].numpy()  # [N]
        wins = [x[s:e] for s, e in self.windows(len(x))]
        fe = self._processor.feature_extractor
        fused = bool(getattr(self._model.config.audio_config, "enable_fusion", False))
        out = []
        for i in range(0, len(wins), self.batch_size):
            inp = fe(
                wins[i : i + self.batch_size],
                sampling_rate=self.sample_rate,
                truncation="fusion" if fused else "rand_trunc",  # windows never exceed the input length
                return_tensors="pt",
            )
            # windows never exceed the input length: no window is "longer" (for a fused checkpoint the
            # processor would otherwise mark a random one as longer, which makes embeddings batch-dependent)
            inp["is_longer"] = torch.zeros_like(inp["is_longer"])
            a = self._model.get_audio_features(**inp.to(self.device))
            a = a if torch.is_tensor(a) else a.pooler_output
            out.append(torch.nn.functional.normalize(a.float(), dim=-1).cpu())
        return {"emb": torch.cat(out).numpy().astype(np.float32)}
