"""Text adherence: the embedded evaluator's attribute heads' predictions vs the caption's attributes."""

from __future__ import annotations

from typing import Any

import numpy as np

from eval import metrics as M
from eval.clips import Clip
from eval.probe import Probe
from eval.scores.base import Features, Inputs, Metric, ci, register


def _predictions(feats: Features, probe: Probe) -> dict[str, list[str]]:
    return {a: [probe.classes[a][int(f[f"logits_{a}"][0].argmax())] for f in feats] for a in probe.classes}


def _adherence_of(feats: Features, clips: list[Clip], probe: Probe) -> dict[str, Any]:
    return M.text_adherence(_predictions(feats, probe), [c.attributes for c in clips])


@register("adherence", order=1)
class Adherence(Metric):
    embedder, probe_head = "probe", "attributes"
    what = "probe-predicted attributes vs caption attributes (accuracy)"

    def compute(self, x: Inputs) -> dict[str, Any]:
        probe = x.probe
        if not any(c.attributes for c in x.gen):
            raise ValueError("adherence: no generated clip has caption attributes (samples.jsonl field 'attributes')")
        r = _adherence_of(x.gen_f, x.gen, probe)
        mat = np.stack(list(r["correct"].values()), axis=1)  # [N, A]

        def overall(m):
            return float(np.nansum(m) / max(np.isfinite(m).sum(), 1))

        lo, hi = M.bootstrap_ci((mat,), statistic=overall, n=x.n_boot, seed=x.seed)
        per_attr = {}
        for a, c in r["correct"].items():
            clo, chi = ci(c, x.n_boot, x.seed)
            per_attr[a] = {"value": r["per_attribute"][a], "ci_low": clo, "ci_high": chi, "n": r["n_per_attribute"][a],
                           "probe_heldout_accuracy": probe.heldout_accuracy[a], "chance": probe.chance[a]}
        return {"value": r["overall"], "ci_low": lo, "ci_high": hi, "n": len(x.gen), "per_attribute": per_attr,
                "_per_clip": {"adherence": r["per_clip"], **{f"adherence_{a}": c for a, c in r["correct"].items()}}}

    def floors(self, x: Inputs) -> dict[str, Any]:
        floors: dict[str, Any] = {"noise": None, "codec": None}
        if any(c.attributes for c in x.ref):
            floors["noise"] = {"value": _adherence_of(x.ref_f, x.ref, x.probe)["overall"],
                               "description": "adherence of the reference clips to their own attributes (the probe's ceiling here)"}
            if x.codec_f is not None:
                floors["codec"] = {"value": _adherence_of(x.codec_f, x.ref, x.probe)["overall"],
                                   "description": "adherence of the codec-resynthesised reference to its attributes"}
        return floors
