"""KL divergence of label distributions between each generated clip and ITS reference clip
(paired 1:1 by ref_id): AST labels with the audiocraft and stable-audio-metrics windowings, and the
embedded evaluator's attribute posteriors (KL-PaSST's definition with another classifier)."""

from __future__ import annotations

from typing import Any

import numpy as np

from eval import metrics as M
from eval.clips import _caption_key
from eval.scores.base import Features, Inputs, Metric, ci, register


class PairedKL(Metric):
    paired = True
    direction = "KL(reference || generated)"

    def per_pair(self, ref_f: Features, gen_f: Features) -> np.ndarray:
        """KL per (reference, generated) feature pair `[P]`."""
        raise NotImplementedError

    def aggregate(self, per: np.ndarray) -> float:
        return float(per.mean())

    def _pairs(self, x: Inputs) -> list[tuple[int, int]]:
        pairs = [(r, g) for g, r in enumerate(x.paired) if r is not None]
        if not pairs:
            raise ValueError(
                f"{self.name}: no generated clip names its reference clip (samples.jsonl 'ref_id', written by "
                "`ttm-bench generate --split`); KL compares paired clips, so free-text prompts are scored only with "
                "unpaired metrics"
            )
        return pairs

    def _values(self, pairs, a_f: Features, b_f: Features) -> tuple[float, np.ndarray]:
        per = self.per_pair([a_f[i] for i, _ in pairs], [b_f[j] for _, j in pairs])
        return self.aggregate(per), per

    def compute(self, x: Inputs) -> dict[str, Any]:
        pairs = self._pairs(x)
        value, per_pair = self._values(pairs, x.ref_f, x.gen_f)
        per_clip = np.full(len(x.gen), np.nan)
        for (_, g), v in zip(pairs, per_pair):
            per_clip[g] = float(v)
        lo, hi = ci(per_clip, x.n_boot, x.seed)
        return {
            "value": value, "ci_low": lo, "ci_high": hi, "n": int(np.isfinite(per_clip).sum()), "n_pairs": len(pairs),
            "n_unpaired": int((~np.isfinite(per_clip)).sum()), "direction": self.direction,
            "pairing": "1:1 by reference clip id (samples.jsonl ref_id); clips without one are not scored",
            "ci_method": "percentile bootstrap over paired generated clips",
            "_per_clip": {self.name: per_clip},
        }

    def floors(self, x: Inputs) -> dict[str, Any]:
        ref = x.ref
        floors: dict[str, Any] = {"noise": None, "codec": None}
        same = [(i, j) for i in range(len(ref)) for j in range(len(ref))
                if i != j and ref[i].caption and _caption_key(ref[i].caption) == _caption_key(ref[j].caption)]
        if same:
            floors["noise"] = {"value": self._values(same, x.ref_f, x.ref_f)[0], "n_pairs": len(same),
                               "description": "KL between distinct reference clips that share a caption"}
        else:
            floors["noise"] = {"value": None, "reason": "no two reference clips share a caption"}
        if x.codec_f is not None:
            floors["codec"] = {"value": self._values([(i, i) for i in range(len(ref))], x.ref_f, x.codec_f)[0],
                               "description": "KL between each reference clip and its codec resynthesis"}
        return floors


@register("kl_ast")
class KlAst(PairedKL):
    embedder, embedder_kw = "ast", {"windowing": "audiocraft"}
    what = "KL(reference || generated) of AST label distributions, audiocraft windowing (softmax per 10 s segment)"

    def per_pair(self, ref_f, gen_f):
        return M.kl_audiocraft([f["logits"] for f in ref_f], [f["logits"] for f in gen_f])[1]

    def _values(self, pairs, a_f, b_f):  # audiocraft averages over all segment pairs, not over clips
        return M.kl_audiocraft([a_f[i]["logits"] for i, _ in pairs], [b_f[j]["logits"] for _, j in pairs])


@register("kl_ast_sam")
class KlAstSam(PairedKL):
    embedder, embedder_kw = "ast", {"windowing": "sam"}
    direction = "KL(generated || reference)"
    what = ("KL(generated || reference) of AST label distributions, stable-audio-metrics windowing "
            "(logits averaged over 10 s / 5 s hop windows)")

    def per_pair(self, ref_f, gen_f):
        return M.kl_stable_audio([f["logits"] for f in ref_f], [f["logits"] for f in gen_f])[1]


@register("kl_probe", order=2)
class KlProbe(PairedKL):
    """KL of the embedded evaluator's attribute posteriors (softmax of each attribute head), averaged
    over its attributes, per pair; the value is KL(reference || generated), and `reverse` carries
    KL(generated || reference) with its own interval (both directions, as KL-PaSST reports)."""

    embedder, probe_head = "probe", "attributes"
    what = ("KL(reference || generated) of the embedded evaluator's attribute posteriors, mean over attribute "
            "heads (reverse direction in 'reverse')")

    def _posteriors(self, feats: Features) -> dict[str, np.ndarray]:
        names = sorted(k for k in feats[0] if k.startswith("logits_"))
        return {k: M.softmax(np.concatenate([f[k] for f in feats])) for k in names}  # {attr: [P, K]}

    def per_pair(self, ref_f, gen_f, reverse: bool = False):
        pr, pg = self._posteriors(ref_f), self._posteriors(gen_f)
        kl = [M.kl_pairs(pr[a], pg[a], "gen||ref" if reverse else "ref||gen") for a in pr]
        return np.mean(kl, axis=0)  # [P]

    def compute(self, x: Inputs) -> dict[str, Any]:
        res = super().compute(x)
        pairs = self._pairs(x)
        rev = self.per_pair([x.ref_f[i] for i, _ in pairs], [x.gen_f[j] for _, j in pairs], reverse=True)
        lo, hi = ci(rev, x.n_boot, x.seed)
        res["reverse"] = {"value": float(rev.mean()), "ci_low": lo, "ci_high": hi,
                          "direction": "KL(generated || reference)"}
        return res
