"""Frechet distance (FD / FAD) on any embedder: FD at n with its interval, the population FD,
FD-inf, the 2 D sample-size rule, and the reference-halves noise floor (statistics in eval/stats.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from eval import metrics as M
from eval import stats as S
from eval.scores.base import Inputs, Metric, register


def fd_of(gen: list[np.ndarray], ref: list[np.ndarray]) -> float:
    a, b = np.concatenate(gen), np.concatenate(ref)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"FD needs at least 2 embeddings per set, got {len(a)} and {len(b)}")
    return M.fd_fast(a, b)


def _fd_safe(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[float | None, str]:
    try:
        return fd_of(a, b), ""
    except ValueError as e:
        return None, str(e)


def reduce_for_fd(gen, ref, codec, pca_source) -> tuple[list, list, list | None, dict[str, Any] | None]:
    """The sample-size rule: an FD needs >= 2 D embeddings per set. Below that the embeddings are
    projected on the top k = n // 2 principal components of the reference's train split
    (`pca_source()` -> (Pca or None, why not)); without a train split the FD is refused."""
    dim = gen[0].shape[1]
    n_gen, n_ref = int(sum(len(g) for g in gen)), int(sum(len(r) for r in ref))
    n_min = min(n_gen, n_ref)
    if n_min >= S.clips_needed(dim):
        return gen, ref, codec, None
    pca, why = pca_source() if pca_source is not None else (None, "no reference train split to fit a PCA on")
    if pca is None:
        try:
            S.require_samples(n_gen, n_ref, dim)
        except ValueError as e:
            raise ValueError(f"{e}; no dimension reduction: {why}") from None
    k = min(S.max_dim(n_min), pca.k_max)
    if k < 1:
        raise ValueError(f"fd: {n_min} embeddings per set are too few for any FD (needs at least 2)")
    proj = [[pca.project(e, k) for e in xs] for xs in (gen, ref)]
    pc = [pca.project(e, k) for e in codec] if codec is not None else None
    info = {**pca.identity(k), "reason": f"{n_min} embeddings per set < {S.MIN_SAMPLES_PER_DIM} * D = "
            f"{S.clips_needed(dim)}: projected on the top k = {k} principal components of the reference's train split"}
    return proj[0], proj[1], pc, info


class FrechetDistance(Metric):
    """FD between the Gaussians fitted to the frame embeddings of the generated and reference sets."""

    def _data(self, x: Inputs):
        if "fd" not in x.memo:
            gen = [f["emb"] for f in x.gen_f]
            ref = [f["emb"] for f in x.ref_f]
            codec = [f["emb"] for f in x.codec_f] if x.codec_f is not None else None
            x.memo["fd"] = reduce_for_fd(gen, ref, codec, x.pca_source)
        return x.memo["fd"]

    def compute(self, x: Inputs) -> dict[str, Any]:
        gen, ref, _codec, reduction = self._data(x)
        st = S.fd_statistics(gen, ref, n_boot=x.n_boot, seed=x.seed)
        at = st["fd_at_n"]
        res: dict[str, Any] = {
            "value": at["value"], "ci_low": at["ci_low"], "ci_high": at["ci_high"], "n": len(gen),
            "n_reference": len(ref), "n_frames": int(sum(len(g) for g in gen)),
            "n_frames_reference": int(sum(len(r) for r in ref)),
            "dim": int(gen[0].shape[1]),
            "dimension_reduction": reduction,
            "interval_meaning": "value / ci_low / ci_high are FD AT THIS n (see fd_at_n): comparable only between "
            "rows with the same n; fd_population estimates the n -> infinity FD with its own interval",
            "fd_at_n": at,
            "fd_population": st["fd_population"],
            "fd_method": "Gaussian fit to all frame embeddings of each set; Tr sqrtm(S1 S2) as the sum of "
            "square roots of the eigenvalues of F1^T S2 F1 (S1 = F1 F1^T), equal to the scipy sqrtm formula; "
            "intervals resample whole clips",
        }
        allg = np.concatenate(gen)  # FD-inf over frame subsets drawn without replacement
        if len(allg) > 500:
            mu, sigma = M.embedding_stats(np.concatenate(ref))
            res["fd_inf"] = M.fd_inf(mu, sigma, allg, seed=x.seed)
        else:
            res["fd_inf"] = {"value": None, "reason": f"needs more than 500 generated frames, got {len(allg)}"}
        return res

    def floors(self, x: Inputs) -> dict[str, Any]:
        gen, ref, codec, _ = self._data(x)
        rng = np.random.default_rng(x.seed)
        perm = rng.permutation(len(ref))
        half_a, half_b = [ref[i] for i in perm[: len(ref) // 2]], [ref[i] for i in perm[len(ref) // 2 :]]
        g_idx = rng.permutation(len(gen))[: len(half_a)] if len(gen) > len(half_a) else np.arange(len(gen))
        floor, why = _fd_safe(half_a, half_b)
        gen_half, why_g = _fd_safe([gen[i] for i in g_idx], half_b)
        return {
            "noise": {
                "value": floor,
                "value_generated_vs_half": gen_half,
                "n_half_a": len(half_a), "n_half_b": len(half_b), "n_generated_used": len(g_idx),
                "description": "FD(reference half A, reference half B), seeded disjoint halves; "
                "value_generated_vs_half = FD(generated cut to |A| clips, half B), comparable with it",
                **({"reason": why or why_g} if floor is None or gen_half is None else {}),
            },
            "codec": None if codec is None else {
                "value": fd_of(codec, ref), "description": "FD(codec-resynthesised reference, reference)",
            },
        }


@register("fd_probe", order=0)
class FdProbe(FrechetDistance):
    embedder, probe_head = "probe", "attributes"
    what = "Frechet distance on the embedded evaluator's embeddings (one per clip)"


@register("fad_clap")
class FadClap(FrechetDistance):
    embedder = "clap"
    what = "Frechet distance on CLAP audio embeddings (per 10 s window)"


@register("fad_encodec")
class FadEncodec(FrechetDistance):
    embedder = "encodec"
    what = "Frechet distance on EnCodec encoder frames (fadtk FAD-EnCodec)"


@register("fd_vggish")
class FdVggish(FrechetDistance):
    embedder = "vggish"
    what = "Frechet distance on VGGish frames (0.96 s)"
