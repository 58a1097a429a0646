"""eval.metrics: closed forms, both KL conventions, CLAP score, adherence, bootstrap."""

import math

import numpy as np
import pytest

from eval import metrics as M

# ----------------------------------------------------------------------------- Frechet distance


def test_fd_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.2, 3, 5), rng.uniform(0.2, 3, 5)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert M.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    x = np.random.default_rng(1).normal(size=(200, 6))
    assert abs(M.fd_from_embeddings(x, x)) < 1e-8
    assert M.fd_from_embeddings(x, x + 2.0) == pytest.approx(6 * 4.0, rel=1e-6)


@pytest.mark.parametrize("n", [5, 300])  # fewer and more rows than dimensions
def test_fd_fast_equals_the_sqrtm_formula(n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(size=(n, 12)), rng.normal(1.0, 2.0, size=(n + 3, 12))
    assert M.fd_fast(a, b) == pytest.approx(M.fd_from_embeddings(a, b), rel=1e-6, abs=1e-8)


def test_fd_rejects_mismatched_shapes_and_single_rows():
    with pytest.raises(ValueError, match="shapes differ"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="at least 2 rows"):
        M.fd_from_embeddings(np.zeros((1, 3)), np.zeros((5, 3)))


def test_fd_inf_recovers_the_infinite_sample_value():
    d = 16
    mu_r, s_r = np.zeros(d), np.eye(d)
    mu_g, var_g = np.full(d, 0.25), np.linspace(0.5, 2.0, d)
    true = ((mu_r - mu_g) ** 2).sum() + (1 + var_g - 2 * np.sqrt(var_g)).sum()
    g = np.random.default_rng(0).multivariate_normal(mu_g, np.diag(var_g), size=5000)
    res = M.fd_inf(mu_r, s_r, g, min_n=100, seed=0)
    small_n = M.frechet_distance(mu_r, s_r, *M.embedding_stats(g[:100]))
    assert abs(res["value"] - true) < 0.05 * true
    assert abs(small_n - true) > 2 * abs(res["value"] - true)  # the finite-n FD is biased upward
    assert res["slope"] > 0 and len(res["ns"]) == len(res["fds"]) == 25
    with pytest.raises(ValueError, match="more than min_n"):
        M.fd_inf(mu_r, s_r, g[:50], min_n=100)


# ----------------------------------------------------------------------------- KL


def test_kl_of_a_distribution_with_itself_is_zero():
    p = M.softmax(np.random.default_rng(0).normal(size=(4, 10)))
    assert np.abs(M.kl_divergence(p, p)).max() < 1e-4  # only the 1e-6 offset inside the log


def test_kl_directions_hand_computed():
    p, q = np.array([0.5, 0.5]), np.array([0.25, 0.75])
    kl_pq = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # = 0.5 ln(4/3)
    kl_qp = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert M.kl_divergence(p, q) == pytest.approx(kl_pq, abs=1e-5)
    assert M.kl_pairs(p[None], q[None], "ref||gen")[0] == pytest.approx(kl_pq, abs=1e-5)
    assert M.kl_pairs(p[None], q[None], "gen||ref")[0] == pytest.approx(kl_qp, abs=1e-5)
    with pytest.raises(ValueError, match="direction"):
        M.kl_pairs(p[None], q[None], "p||q")


def test_kl_audiocraft_windowing_hand_computed():
    # two segments per clip; logits = log-probabilities, so softmax gives them back
    ref = [np.log([[0.5, 0.5], [0.9, 0.1]])]
    gen = [np.log([[0.25, 0.75], [0.9, 0.1]])]
    # segment pairs: KL(ref||gen) = 0.5 ln(4/3) for the first, 0 for the second; mean over pairs
    value, per_clip = M.kl_audiocraft(ref, gen)
    assert value == pytest.approx(0.25 * math.log(4 / 3), abs=1e-5)
    assert per_clip.shape == (1,)


def test_kl_stable_audio_windowing_hand_computed():
    ref = [np.log([[0.5, 0.5], [0.9, 0.1]])]
    gen = [np.log([[0.25, 0.75], [0.9, 0.1]])]
    # logits averaged over windows then softmax = normalised geometric mean of the window probs
    r = np.array([math.sqrt(0.45), math.sqrt(0.05)])
    r /= r.sum()  # (0.75, 0.25)
    g = np.array([math.sqrt(0.225), math.sqrt(0.075)])
    g /= g.sum()
    expected = float((g * np.log(g / r)).sum())  # KL(generated || reference)
    value, per = M.kl_stable_audio(ref, gen)
    assert r == pytest.approx([0.75, 0.25])
    assert value == pytest.approx(expected, abs=1e-5)
    assert per[0] == pytest.approx(value)
    # the two conventions differ on the same logits
    assert abs(value - M.kl_audiocraft(ref, gen)[0]) > 0.01


def test_kl_windows():
    # audiocraft: non-overlapping 10 s pieces, the last one dropped when <= 0.15 s
    assert M.audiocraft_segments(250, 10) == [(0, 100), (100, 200), (200, 250)]
    assert M.audiocraft_segments(201, 10) == [(0, 100), (100, 200)]
    # stable-audio-metrics: starts every 5 s below max(hop, N - hop)
    assert M.sam_windows(120, 10) == [(0, 100), (50, 120)]
    assert M.sam_windows(50, 10) == [(0, 50)]
    assert M.sam_windows(210, 10) == [(0, 100), (50, 150), (100, 200), (150, 210)]


def test_kl_rejects_unmatched_sets():
    with pytest.raises(ValueError, match="same non-zero number"):
        M.kl_audiocraft([np.zeros((1, 3))], [])
    with pytest.raises(ValueError, match="same non-zero number"):
        M.kl_stable_audio([], [])


# ----------------------------------------------------------------------------- CLAP score, adherence


def test_clap_score_is_symmetric_and_bounded():
    rng = np.random.default_rng(0)
    t, a = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
    s_ta, per_ta = M.clap_score(t, a)
    s_at, per_at = M.clap_score(a, t)
    assert s_ta == pytest.approx(s_at)
    assert np.allclose(per_ta, per_at)
    assert (per_ta >= -1).all() and (per_ta <= 1).all()
    assert M.clap_score(t, 3 * t)[0] == pytest.approx(1.0)
    assert M.clap_score(t, -t)[0] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="zero norm"):
        M.clap_score(np.zeros((1, 3)), np.ones((1, 3)))


def test_mean_pairwise_cosine():
    assert M.mean_pairwise_cosine(np.ones((4, 3))) == pytest.approx(1.0)
    assert M.mean_pairwise_cosine(np.eye(3)) == pytest.approx(0.0)


def test_text_adherence_hand_computed():
    pred = {"family": ["strings", "keys", "keys"], "tempo": ["slow", "slow", "fast"]}
    target = [{"family": "strings", "tempo": "slow"}, {"family": "strings", "tempo": "slow"}, {"family": "keys"}]
    r = M.text_adherence(pred, target)
    assert r["per_attribute"] == {"family": pytest.approx(2 / 3), "tempo": pytest.approx(1.0)}
    assert r["n_per_attribute"] == {"family": 3, "tempo": 2}
    assert r["overall"] == pytest.approx(4 / 5)
    assert r["per_clip"].tolist() == [1.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="no clip has any"):
        M.text_adherence({"mode": ["major"]}, [{"family": "keys"}])


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, big = rng.normal(1.0, 1.0, 30), rng.normal(1.0, 1.0, 3000)
    lo, hi = M.bootstrap_ci(small, n=500, seed=0)
    assert lo < small.mean() < hi
    blo, bhi = M.bootstrap_ci(big, n=500, seed=0)
    assert blo < big.mean() < bhi and (bhi - blo) < (hi - lo) / 5
    assert M.bootstrap_ci(small, n=200, seed=3) == M.bootstrap_ci(small, n=200, seed=3)
    with pytest.raises(ValueError, match="empty"):
        M.bootstrap_ci(np.array([]))


def test_bootstrap_ci_of_a_statistic_over_two_sets():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 200), rng.normal(2, 1, 150)
    point = b.mean() - a.mean()
    lo, hi = M.bootstrap_ci((a, b), statistic=lambda x, y: y.mean() - x.mean(), n=400, seed=0)
    assert lo < point < hi and 1.5 < lo and hi < 2.5
