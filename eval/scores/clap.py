"""CLAP-style text-audio score: cosine of a clip's audio embedding and its caption's text embedding,
with a pretrained CLAP (`clap`) or with the embedded evaluator's contrastive head against its frozen
text encoder (`clap_probe`). Unpaired: a clip is scored against its own caption."""

from __future__ import annotations

from typing import Any

import numpy as np

from eval import metrics as M
from eval.clips import Clip
from eval.probe import caption_embeddings
from eval.scores.base import Features, Inputs, Metric, ci, register


class ClapStyle(Metric):
    def text(self, x: Inputs, captions: list[str]) -> np.ndarray:
        """Caption embeddings `[N, E]`."""
        raise NotImplementedError

    def audio(self, feats: Features) -> np.ndarray:
        """Clip audio embeddings `[N, E]`."""
        raise NotImplementedError

    def scores(self, x: Inputs, feats: Features, clips: list[Clip]) -> np.ndarray:
        return M.clap_score(self.text(x, [c.caption for c in clips]), self.audio(feats))[1]

    def compute(self, x: Inputs) -> dict[str, Any]:
        if not all(c.caption for c in x.gen):
            missing = next(c.file for c in x.gen if not c.caption)
            raise ValueError(f"{self.name}: generated clip {missing!r} has no caption (samples.jsonl field 'caption')")
        per = self.scores(x, x.gen_f, x.gen)
        lo, hi = ci(per, x.n_boot, x.seed)
        return {"value": float(per.mean()), "ci_low": lo, "ci_high": hi, "n": len(x.gen), "_per_clip": {self.name: per}}

    def floors(self, x: Inputs) -> dict[str, Any]:
        floors: dict[str, Any] = {"noise": None, "codec": None}
        if all(c.caption for c in x.ref):
            floors["noise"] = {"value": float(self.scores(x, x.ref_f, x.ref).mean()),
                               "description": "the score of the reference clips with their own captions"}
            if x.codec_f is not None:
                floors["codec"] = {"value": float(self.scores(x, x.codec_f, x.ref).mean()),
                                   "description": "the score of the codec-resynthesised reference with its captions"}
        return floors


@register("clap")
class Clap(ClapStyle):
    embedder = "clap"
    what = "CLAP score: cosine of caption and audio embeddings"

    def text(self, x, captions):
        return x.embedder.embed_text(captions).numpy()

    def audio(self, feats):
        return np.stack([f["emb"].mean(0) for f in feats])

    def compute(self, x: Inputs) -> dict[str, Any]:
        return {**super().compute(x), "text_collapse_check": "passed (mean pairwise cosine of distinct captions <= 0.99)"}


@register("clap_probe", order=3)
class ClapProbe(ClapStyle):
    embedder, probe_head = "probe", "contrastive"
    what = ("CLAP-style score of the embedded evaluator: cosine of its contrastive head's audio embedding and "
            "the frozen text encoder's caption embedding")

    def text(self, x, captions):
        if "text_encoder" not in x.memo:
            x.memo["text_encoder"] = x.probe.text_encoder()
        return caption_embeddings(x.memo["text_encoder"], captions).numpy()

    def audio(self, feats):
        return np.concatenate([f["audio_text"] for f in feats])

    def compute(self, x: Inputs) -> dict[str, Any]:
        return {**super().compute(x), "contrastive_head": x.probe.info.get("contrastive")}
