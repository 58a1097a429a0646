"""eval.stats: FD intervals checked for coverage on Gaussians with a known FD, the sample-size
rule, the PCA reduction, FD-inf against a known population FD, resolvable differences, equal n."""

import numpy as np
import pytest

from eval import metrics as M
from eval import stats as S


def _gaussians(d: int, shift: float = 1.0):
    """Set A ~ N(0, I); set B ~ N(shift e_0, diag(scale)); their FD in closed form."""
    scale = np.linspace(0.5, 2.0, d)
    true = shift**2 + float(np.sum(1 + scale - 2 * np.sqrt(scale)))

    def draw(rng, n):
        a = rng.standard_normal((n, d))
        b = rng.standard_normal((n, d)) * np.sqrt(scale)
        b[:, 0] += shift
        return [x[None] for x in a], [x[None] for x in b]  # one embedding per clip

    return true, draw


@pytest.mark.parametrize("d,n", [(8, 16), (8, 32)])
def test_fd_intervals_cover_their_targets(d, n):
    """Both intervals at nominal 0.95 over 100 repetitions: FD at n covers E[FD_n] (Monte Carlo),
    the population interval covers the closed-form FD; the old percentile interval covers neither."""
    true, draw = _gaussians(d)
    mc = np.random.default_rng(123)
    e_fd_n = float(np.mean([M.fd_fast(*(np.concatenate(s) for s in draw(mc, n))) for _ in range(2000)]))
    assert e_fd_n > 1.5 * true  # the regime where the bias matters
    rng = np.random.default_rng(0)
    reps, hit_n, hit_pop, hit_percentile, contains_point = 100, 0, 0, 0, 0
    for r in range(reps):
        a, b = draw(rng, n)
        st = S.fd_statistics(a, b, n_boot=200, seed=r)
        at, pop = st["fd_at_n"], st["fd_population"]
        hit_n += at["ci_low"] <= e_fd_n <= at["ci_high"]
        hit_pop += pop["ci_low"] <= true <= pop["ci_high"]
        contains_point += at["ci_low"] <= at["value"] <= at["ci_high"]
        shift = at["bootstrap_mean"] - at["value"]  # the percentile interval = re-centred one + shift
        hit_percentile += at["ci_low"] + shift <= true <= at["ci_high"] + shift
    cov_n, cov_pop = hit_n / reps, hit_pop / reps
    print(f"D={d} n={n}: coverage FD at n {cov_n:.2f}, population FD {cov_pop:.2f}, percentile {hit_percentile / reps:.2f}")
    assert cov_n >= 0.9 and cov_pop >= 0.9
    assert contains_point == reps
    assert hit_percentile / reps < 0.5


def test_population_fd_removes_most_of_the_bias():
    true, draw = _gaussians(16)
    rng = np.random.default_rng(1)
    plain, jack = [], []
    for r in range(30):
        st = S.fd_statistics(*draw(rng, 48), n_boot=2, seed=r)
        plain.append(st["fd_at_n"]["value"])
        jack.append(st["fd_population"]["value"])
    assert np.mean(plain) > 2 * true
    assert abs(np.mean(jack) - true) < 0.15 * true


def test_fd_statistics_resample_clips_and_agree_across_paths():
    """Clips with several frames: all paths of the clip statistics give the same numbers, and
    one clip per set has no spread (every resample is the set itself)."""
    rng = np.random.default_rng(0)
    a = [rng.normal(0, 1, size=(rng.integers(1, 4), 4)) for _ in range(60)]
    b = [rng.normal(2, 1, size=(rng.integers(1, 4), 4)) for _ in range(60)]
    ref = S.fd_statistics(a, b, n_boot=50, seed=1)
    assert ref["fd_at_n"]["value"] == pytest.approx(M.fd_from_embeddings(np.concatenate(a), np.concatenate(b)))
    low = S.fd_statistics(a, b, n_boot=50, seed=1, max_bytes=0)
    assert low["fd_at_n"]["ci_low"] == pytest.approx(ref["fd_at_n"]["ci_low"], rel=1e-6)
    assert low["fd_population"]["value"] == pytest.approx(ref["fd_population"]["value"], rel=1e-6)
    # fewer frames than dimensions: the centred frames are the covariance factor
    x, y = [rng.normal(size=(1, 8)) for _ in range(3)], [rng.normal(1, 2, size=(1, 8)) for _ in range(4)]
    st = S.fd_statistics(x, y, n_boot=20)
    assert st["fd_at_n"]["value"] == pytest.approx(M.fd_from_embeddings(np.concatenate(x), np.concatenate(y)))
    with pytest.raises(ValueError, match="at least 2 clips"):
        S.fd_statistics(a[:1], b)


def test_sample_size_rule_says_how_many_clips_are_needed():
    S.require_samples(192, 200, 96)
    with pytest.raises(ValueError, match=r"at least 2 \* D = 192 per set.*at least 192 clips.*at most 48 dimensions"):
        S.require_samples(96, 300, 96)
    assert S.max_dim(96) == 48 and S.clips_needed(10) == 20


def test_pca_keeps_the_top_variance_directions_and_has_an_identity():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 6)) * np.array([5.0, 3.0, 1.0, 0.1, 0.1, 0.1])
    p = S.Pca.fit(x, source="train split of m.jsonl")
    y = p.project(x, 2)
    assert y.shape == (500, 2)
    assert np.var(y, axis=0, ddof=1) == pytest.approx(p.explained[:2])
    assert abs(p.components[0, 0]) > 0.99 and abs(p.components[1, 1]) > 0.99
    ident = p.identity(2)
    assert ident["k"] == 2 and ident["explained_variance"] > 0.95 and ident == S.Pca.fit(x, "train split of m.jsonl").identity(2)
    assert ident["hash"] != p.identity(3)["hash"]
    with pytest.raises(ValueError, match="k must lie"):
        p.project(x, 7)


def test_fd_inf_recovers_a_known_population_fd_where_plain_fd_is_far_off():
    d, n = 32, 1000
    mu_r, s_r = np.zeros(d), np.eye(d)
    var_g = np.linspace(0.6, 1.6, d)
    mu_g = np.full(d, 0.05)
    true = float((mu_g**2).sum() + (1 + var_g - 2 * np.sqrt(var_g)).sum())
    errs_inf, errs_plain = [], []
    for seed in range(6):
        g = np.random.default_rng(seed).standard_normal((n, d)) * np.sqrt(var_g) + mu_g
        res = M.fd_inf(mu_r, s_r, g, min_n=200, seed=seed)
        errs_inf.append(res["value"] / true - 1)
        errs_plain.append(M.frechet_distance(mu_r, s_r, *M.embedding_stats(g)) / true - 1)
    print(f"fd_inf relative error {np.round(errs_inf, 3)}, plain FD at N {np.round(errs_plain, 3)}")
    assert abs(np.mean(errs_inf)) < 0.05 and max(abs(e) for e in errs_inf) < 0.15  # one fit's spread is ~5%
    assert min(errs_plain) > 0.3
    with pytest.raises(ValueError, match="more than min_n"):
        M.fd_inf(mu_r, s_r, g[:50], min_n=100)


def test_resolvable_difference_and_equal_n_check():
    r = {"value": 1.0, "ci_low": 0.8, "ci_high": 1.2}
    assert S.resolvable_difference(r) == pytest.approx(np.sqrt(2) * 0.2)
    assert S.resolvable_difference({"value": 1.0, "ci_low": None, "ci_high": None}) is None
    rows = [{"name": "a", "metrics": {"fd": {"n": 96}, "kl": {"n": 96}}},
            {"name": "b", "metrics": {"fd": {"n": 16}, "kl": {"n": 96}}}]
    assert S.check_equal_n(rows) == {"fd": ["a: n=96", "b: n=16"]}
    assert S.check_equal_n(rows[:1]) == {}
    with pytest.raises(ValueError, match="different numbers of clips.*fd: a: n=96, b: n=16"):
        S.require_equal_n(rows)
