"""Evaluation metrics as pure functions on numpy arrays (torch tensors are accepted too).

Conventions are named explicitly where the literature differs:

- Frechet distance: `frechet_distance` follows pytorch-fid / fadtk (scipy `sqrtm` of
  sigma1 @ sigma2, an `eps` offset on the diagonals when the product is singular).
  `fd_inf` is fadtk's FAD-inf idea done without replacement: FD against random subsets
  (drawn without replacement) of several sizes n, a linear fit of FD against 1/n, the
  intercept estimates the population FD. Drawing with replacement (as fadtk does) makes
  the subsets converge to the N available embeddings, so its intercept is about the
  plain FD at N, bias included.
- KL between label distributions, in both directions and both windowings:
  audiocraft (MusicGen): non-overlapping 10 s segments, softmax per segment,
  KL(reference || generated) per segment pair, averaged over pairs;
  stable-audio-metrics: logits averaged over 10 s windows with 5 s hop, then
  softmax, KL(generated || reference) per clip, averaged over clips.
- Every aggregate has a bootstrap confidence interval (`bootstrap_ci`); FD's intervals
  (FD at n, population FD) live in eval/stats.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import linalg
from scipy.special import xlogy

KL_EPS = 1e-6  # audiocraft and stable-audio-metrics both add 1e-6 inside the log of the second argument


def _np(x: Any, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# ----------------------------------------------------------------------------- Frechet distance


def embedding_stats(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean `[D]` and covariance `[D, D]` (unbiased, N-1) of embeddings `[N, D]`."""
    x = _np(x)
    if x.ndim != 2:
        raise ValueError(f"embeddings: expected [N, D], got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"embeddings: need at least 2 rows for a covariance, got {x.shape[0]}")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)).

    As in pytorch-fid / fadtk: when sqrtm of the product is not finite, `eps * I` is added
    to both covariances; a small imaginary part from numerical error is dropped, a large
    one raises.
    """
    mu1, mu2 = np.atleast_1d(_np(mu1)), np.atleast_1d(_np(mu2))
    s1, s2 = np.atleast_2d(_np(sigma1)), np.atleast_2d(_np(sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"frechet_distance: shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: sqrtm has imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fd_from_embeddings(a: Any, b: Any) -> float:
    """Frechet distance between the Gaussians fitted to embeddings `a [N, D]` and `b [M, D]`."""
    return frechet_distance(*embedding_stats(a), *embedding_stats(b))


def _cov_part(x: np.ndarray) -> tuple[np.ndarray, tuple[str, np.ndarray]]:
    """Mean and covariance of rows `[N, D]`: as a factor F `[D, N]` (cov = F F^T) when N <= D,
    else as the matrix `[D, D]`."""
    n, d = x.shape
    mu = x.mean(0)
    xc = (x - mu) / math.sqrt(n - 1)
    return mu, (("f", xc.T) if n <= d else ("c", xc.T @ xc))


def _trace_sqrt_product(p1: tuple[str, np.ndarray], p2: tuple[str, np.ndarray]) -> float:
    """Tr sqrtm(cov1 cov2) for PSD covariances given as factors ("f", F) or matrices ("c", C).

    With cov1 = F F^T the eigenvalues of cov1 cov2 are those of F^T cov2 F (symmetric PSD), so
    the trace of the square root is the sum of the square roots of its eigenvalues: real, exact,
    and only a symmetric eigenvalue problem of the smaller size."""
    (k1, m1), (k2, m2) = p1, p2
    if k1 == "f" and k2 == "f":
        a = m1.T @ m2  # [r1, r2]
        g = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    elif k1 == "f":
        g = m1.T @ m2 @ m1
    elif k2 == "f":
        g = m2.T @ m1 @ m2
    else:
        try:
            f1 = np.linalg.cholesky(m1)
        except np.linalg.LinAlgError:  # singular: any square-root factor works
            ev, v = np.linalg.eigh(m1)
            f1 = v * np.sqrt(np.clip(ev, 0, None))
        g = f1.T @ m2 @ f1
    ev = np.linalg.eigvalsh((g + g.T) / 2)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def _trace(p: tuple[str, np.ndarray]) -> float:
    return float((p[1] * p[1]).sum()) if p[0] == "f" else float(np.trace(p[1]))


def _fd_parts(mu1, p1, mu2, p2) -> float:
    d = mu1 - mu2
    return float(d @ d + _trace(p1) + _trace(p2) - 2.0 * _trace_sqrt_product(p1, p2))


def fd_fast(a: np.ndarray, b: np.ndarray) -> float:
    """The same value as `fd_from_embeddings` without scipy's sqrtm of a non-symmetric product
    (see `_trace_sqrt_product`): real by construction and ~100x faster at D = 512. The runner
    and the bootstrap use it."""
    return _fd_parts(*_cov_part(_np(a)), *_cov_part(_np(b)))


def fd_inf(
    ref_mu: Any,
    ref_sigma: Any,
    gen: Any,
    steps: int = 25,
    min_n: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """Population FD by extrapolation in 1/n: FD of the reference statistics against random
    subsets of `gen [N, D]` drawn WITHOUT replacement, at `steps` sizes from `min_n` to N; a
    linear fit of FD on 1/n, whose intercept (1/n -> 0) estimates the FD of the generating
    distribution. Without replacement, a subset of n of the N embeddings has the sampling
    noise of n fresh draws, so FD(n) ~ FD_population + c / n holds across the whole range
    (with replacement the subsets converge to the N embeddings and the intercept is about
    the biased plain FD at N). The reference enters as fixed statistics: its own sampling
    noise is not extrapolated away. Returns {value (intercept), slope, r2, ns, fds}."""
    gen = _np(gen)
    if gen.ndim != 2:
        raise ValueError(f"fd_inf: expected generated embeddings [N, D], got shape {gen.shape}")
    n = gen.shape[0]
    if n <= min_n:
        raise ValueError(f"fd_inf: needs more than min_n={min_n} generated embeddings, got {n}")
    rng = np.random.default_rng(seed)
    ns = np.unique(np.linspace(min_n, n, steps).astype(int))
    mu, sigma = _np(ref_mu), _np(ref_sigma)
    fds = []
    for k in ns:
        idx = rng.choice(n, size=int(k), replace=False)
        fds.append(_fd_parts(mu, ("c", sigma), *_cov_part(gen[idx])))  # = frechet_distance, faster
    xs, ys = 1.0 / ns, np.asarray(fds)
    slope, intercept = np.polyfit(xs, ys, 1)
    pred = slope * xs + intercept
    ss_tot = float(((ys - ys.mean()) ** 2).sum())
    r2 = 1.0 - float(((ys - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return {"value": float(intercept), "slope": float(slope), "r2": r2, "ns": ns.tolist(), "fds": ys.tolist(),
            "method": "FD vs subsets drawn without replacement, linear fit in 1/n, intercept"}


# ----------------------------------------------------------------------------- KL divergence


def softmax(logits: Any, axis: int = -1) -> np.ndarray:
    x = _np(logits)
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def kl_divergence(p: Any, q: Any, eps: float = KL_EPS) -> np.ndarray:
    """KL(p || q) = sum_i p_i (log p_i - log(q_i + eps)) over the last axis (0 log 0 = 0).

    This is torch's `F.kl_div((q + eps).log(), p)` summed over labels, as used by both
    audiocraft and stable-audio-metrics. `p, q [..., L]` -> `[...]`.
    """
    p, q = _np(p), _np(q)
    if p.shape != q.shape:
        raise ValueError(f"kl_divergence: shapes differ: {p.shape} vs {q.shape}")
    return (xlogy(p, p) - p * np.log(q + eps)).sum(-1)


def kl_pairs(ref_probs: Any, gen_probs: Any, direction: str = "ref||gen", eps: float = KL_EPS) -> np.ndarray:
    """Per-pair KL between matched rows of reference and generated label distributions `[N, L]`.

    direction "ref||gen": KL(reference || generated) (audiocraft's `kld`);
    direction "gen||ref": KL(generated || reference) (stable-audio-metrics).
    """
    if direction == "ref||gen":
        return kl_divergence(ref_probs, gen_probs, eps)
    if direction == "gen||ref":
        return kl_divergence(gen_probs, ref_probs, eps)
    raise ValueError(f"kl_pairs: direction must be 'ref||gen' or 'gen||ref', got {direction!r}")


def audiocraft_segments(n_samples: int, sample_rate: int, segment_s: float = 10.0, min_s: float = 0.15):
    """audiocraft's PaSST KLD segmentation: consecutive non-overlapping `segment_s` pieces (no
    padding), pieces of `min_s` or less dropped. Returns [(start, end)] in samples."""
    seg, mn = int(segment_s * sample_rate), int(min_s * sample_rate)
    return [(s, min(s + seg, n_samples)) for s in range(0, n_samples, seg) if min(s + seg, n_samples) - s > mn]


def sam_windows(n_samples: int, sample_rate: int, window_s: float = 10.0, hop_s: float = 5.0):
    """stable-audio-metrics' PaSST KLD windows: starts 0, hop, ... below max(hop, N - hop), each
    `window_s` long (cut at the end of the clip). Returns [(start, end)] in samples; the caller
    zero-pads a short window to `window_s` when it is longer than 15% of it (as SAM does)."""
    win, hop = int(window_s * sample_rate), int(hop_s * sample_rate)
    if hop <= 0:
        raise ValueError(f"sam_windows: hop_s must be > 0, got {hop_s}")
    return [(s, min(s + win, n_samples)) for s in range(0, max(hop, n_samples - hop), hop)]


def kl_audiocraft(ref_segment_logits: Sequence[Any], gen_segment_logits: Sequence[Any]) -> tuple[float, np.ndarray]:
    """audiocraft / MusicGen KL: for each clip pair, softmax per segment, segment j of the
    generated clip paired with segment j of the reference (as many as both have),
    KL(reference || generated) per pair; the value is the mean over all segment pairs.

    Inputs: per clip, logits `[S_i, L]`. Returns (value, per-clip mean `[N]`)."""
    if len(ref_segment_logits) != len(gen_segment_logits) or not len(ref_segment_logits):
        raise ValueError(
            f"kl_audiocraft: need the same non-zero number of reference and generated clips, "
            f"got {len(ref_segment_logits)} and {len(gen_segment_logits)}"
        )
    per_clip, all_pairs = [], []
    for r, g in zip(ref_segment_logits, gen_segment_logits):
        r, g = np.atleast_2d(_np(r)), np.atleast_2d(_np(g))
        k = min(len(r), len(g))
        if k == 0:
            raise ValueError("kl_audiocraft: a clip has no segment longer than the minimum length")
        kl = kl_pairs(softmax(r[:k]), softmax(g[:k]), "ref||gen")
        per_clip.append(float(kl.mean()))
        all_pairs.extend(kl.tolist())
    return float(np.mean(all_pairs)), np.asarray(per_clip)


def kl_stable_audio(ref_window_logits: Sequence[Any], gen_window_logits: Sequence[Any]) -> tuple[float, np.ndarray]:
    """stable-audio-metrics KL: per clip, logits averaged over its windows, then softmax;
    KL(generated || reference) per clip pair; the value is the mean over clips.

    Inputs: per clip, logits `[W_i, L]`. Returns (value, per-clip `[N]`)."""
    if len(ref_window_logits) != len(gen_window_logits) or not len(ref_window_logits):
        raise ValueError(
            f"kl_stable_audio: need the same non-zero number of reference and generated clips, "
            f"got {len(ref_window_logits)} and {len(gen_window_logits)}"
        )
    ref = np.stack([softmax(np.atleast_2d(_np(r)).mean(0)) for r in ref_window_logits])
    gen = np.stack([softmax(np.atleast_2d(_np(g)).mean(0)) for g in gen_window_logits])
    per = kl_pairs(ref, gen, "gen||ref")
    return float(per.mean()), per


# ----------------------------------------------------------------------------- CLAP score, adherence


def cosine_rows(a: Any, b: Any) -> np.ndarray:
    """Cosine similarity of matched rows `[N, D]`, `[N, D]` -> `[N]`."""
    a, b = _np(a), _np(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"cosine: expected two [N, D] arrays of the same shape, got {a.shape} and {b.shape}")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    if (na == 0).any() or (nb == 0).any():
        raise ValueError("cosine: an embedding has zero norm")
    return (a * b).sum(1) / (na * nb)


def clap_score(text_emb: Any, audio_emb: Any) -> tuple[float, np.ndarray]:
    """CLAP score: per-pair cosine of the text embedding of a caption and the audio embedding
    of the clip generated from it, averaged. Returns (mean, per-pair `[N]`)."""
    per = cosine_rows(text_emb, audio_emb)
    return float(per.mean()), per


def mean_pairwise_cosine(emb: Any) -> float:
    """Mean cosine between distinct rows of `[N, D]` (N >= 2)."""
    e = _np(emb)
    if e.ndim != 2 or e.shape[0] < 2:
        raise ValueError(f"mean_pairwise_cosine: expected [N >= 2, D], got shape {e.shape}")
    e = e / np.clip(np.linalg.norm(e, axis=1, keepdims=True), 1e-12, None)
    sim = e @ e.T
    n = e.shape[0]
    return float((sim.sum() - np.trace(sim)) / (n * (n - 1)))


def text_adherence(
    predicted: dict[str, Sequence[Any]], target: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Predicted attributes vs the caption's attributes.

    `predicted`: {attr: [N] predicted labels}; `target`: per clip, the caption's attribute
    dict (attributes missing from a clip's dict are not scored for it).
    Returns {"per_attribute": {attr: accuracy}, "n_per_attribute": {attr: n},
    "overall": accuracy over all (clip, attribute) checks, "per_clip": [N] fraction correct
    (NaN where nothing was checked), "correct": {attr: [N] 1.0 / 0.0 / NaN}}.
    """
    n = len(target)
    correct: dict[str, np.ndarray] = {}
    for attr, preds in predicted.items():
        if len(preds) != n:
            raise ValueError(f"text_adherence: attribute {attr!r} has {len(preds)} predictions for {n} clips")
        c = np.full(n, np.nan)
        for i, (p, t) in enumerate(zip(preds, target)):
            if attr in t and t[attr] is not None:
                c[i] = float(str(p) == str(t[attr]))
        if np.isfinite(c).any():
            correct[attr] = c
    if not correct:
        raise ValueError(
            f"text_adherence: no clip has any of the attributes {sorted(predicted)} in its caption attributes"
        )
    stack = np.stack(list(correct.values()))  # [A, N]
    checked = np.isfinite(stack)
    per_clip = np.where(checked.any(0), np.nansum(stack, 0) / np.maximum(checked.sum(0), 1), np.nan)
    return {
        "per_attribute": {a: float(np.nanmean(c)) for a, c in correct.items()},
        "n_per_attribute": {a: int(np.isfinite(c).sum()) for a, c in correct.items()},
        "overall": float(np.nansum(stack) / checked.sum()),
        "per_clip": per_clip,
        "correct": correct,
    }


# ----------------------------------------------------------------------------- bootstrap


def _take(x: Any, idx: np.ndarray) -> Any:
    if isinstance(x, np.ndarray):
        return x[idx]
    if hasattr(x, "detach"):
        return x[idx]
    return [x[i] for i in idx]


def bootstrap_ci(
    data: Any,
    statistic: Callable[..., float] | None = None,
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval (1 - alpha) of `statistic`.

    `data` is one sequence of per-item values (statistic defaults to the mean, NaNs dropped)
    or a tuple of sequences (e.g. two sets of clips); each is resampled with replacement
    independently and `statistic(*resampled)` is called.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"bootstrap_ci: alpha must lie in (0, 1), got {alpha}")
    if n < 1:
        raise ValueError(f"bootstrap_ci: n must be >= 1, got {n}")
    sets = data if isinstance(data, tuple) else (data,)
    if statistic is None:
        if len(sets) != 1:
            raise ValueError("bootstrap_ci: pass a statistic for a tuple of data sets")
        vals = _np(sets[0]).ravel()
        sets = (vals[np.isfinite(vals)],)

        def statistic(x):
            return float(np.mean(x))

    sizes = [len(s) for s in sets]
    if min(sizes) == 0:
        raise ValueError("bootstrap_ci: empty data")
    rng = np.random.default_rng(seed)
    stats = np.empty(n)
    for i in range(n):
        stats[i] = statistic(*[_take(s, rng.integers(0, m, size=m)) for s, m in zip(sets, sizes)])
    stats = stats[np.isfinite(stats)]
    if not len(stats):
        raise ValueError("bootstrap_ci: the statistic was not finite on any resample")
    return float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2))


class _ClipStats:
    """Frame embeddings of a set of clips, arranged for fast resampling of whole clips.

    A resample is a count per clip. Its mean and covariance come from per-clip sums and
    outer-product sums `[N, D, D]` when those fit in `max_bytes`, else from a weighted
    product over all frames; when the resample has no more frames than dimensions, the
    centred frames themselves are the covariance factor."""

    def __init__(self, clips: Sequence[Any], max_bytes: int = 256 << 20):
        self.frames = [np.atleast_2d(_np(c)) for c in clips]
        self.count = np.array([len(f) for f in self.frames], dtype=np.float64)
        self.dim = self.frames[0].shape[1]
        self.sums = np.stack([f.sum(0) for f in self.frames])  # [N, D]
        self.all = np.concatenate(self.frames)  # [F, D]
        self.clip_of_frame = np.repeat(np.arange(len(self.frames)), self.count.astype(int))  # [F]
        self.outer = None
        if len(self.frames) * self.dim**2 * 8 <= max_bytes:
            self.outer = np.stack([f.T @ f for f in self.frames])  # [N, D, D]

    def part(self, idx: np.ndarray) -> tuple[np.ndarray, tuple[str, np.ndarray]]:
        """Mean and covariance (factor or matrix, as `_cov_part`) of the frames of clips `idx`."""
        w = np.bincount(idx, minlength=len(self.frames)).astype(np.float64)
        n = float(w @ self.count)
        if n < 2:
            raise ValueError("fd bootstrap: a resample has fewer than 2 frames")
        mu = (w @ self.sums) / n
        if n <= self.dim:
            x = np.concatenate([self.frames[i] for i in idx])
            return mu, ("f", ((x - mu) / math.sqrt(n - 1)).T)
        if self.outer is not None:
            second = np.tensordot(w, self.outer, axes=1)
        else:
            second = (self.all.T * w[self.clip_of_frame]) @ self.all
        return mu, ("c", (second - n * np.outer(mu, mu)) / (n - 1))
