"""benchmarks/_stats.py against scipy.stats on random data."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _stats  # noqa: E402

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", [1, 2, 3, 5, 9, 29, 100, 942, 10_000])
@pytest.mark.parametrize("q", [0.6, 0.9, 0.975, 0.995, 0.025])
def test_t_quantile_matches_scipy(df, q):
    assert _stats.t_ppf(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("x", [-3.0, -0.5, 0.0, 0.7, 2.2, 8.0])
def test_t_cdf_matches_scipy(x):
    for df in (1, 4, 30, 500):
        assert _stats.t_cdf(x, df) == pytest.approx(scipy_stats.t.cdf(x, df), abs=1e-12)


@pytest.mark.parametrize("n", [2, 3, 10, 200, 943])
def test_t_interval_matches_scipy(n):
    rng = np.random.default_rng(n)
    x = rng.normal(0.8, 0.3, n)
    out = _stats.mean_ci(x)
    lo, hi = scipy_stats.t.interval(0.95, n - 1, loc=x.mean(), scale=scipy_stats.sem(x))
    assert out["mean"] == pytest.approx(x.mean())
    assert (out["lo"], out["hi"]) == pytest.approx((lo, hi), rel=1e-9)
    assert out["n"] == n and out["n_skipped"] == 0


def test_mean_ci_skips_nan_and_handles_tiny_n():
    out = _stats.mean_ci([1.0, np.nan, 3.0, np.inf])
    assert out["n"] == 2 and out["n_skipped"] == 2 and out["mean"] == 2.0
    one = _stats.mean_ci([0.5, np.nan])
    assert one["mean"] == 0.5 and one["lo"] is None and one["hi"] is None
    none = _stats.mean_ci([np.nan])
    assert none["mean"] is None and none["n"] == 0 and none["n_skipped"] == 1
    assert _stats.mean_ci([])["n"] == 0


def test_bootstrap_interval_matches_scipy_percentile_bootstrap():
    rng = np.random.default_rng(1)
    x = rng.exponential(1.0, 300)
    out = _stats.mean_ci(x, method="bootstrap", n_resamples=20_000, seed=3)
    ref = scipy_stats.bootstrap((x,), np.mean, n_resamples=20_000, method="percentile",
                                random_state=4).confidence_interval
    # Different resamples: agree up to Monte Carlo error (a few % of the width).
    width = ref.high - ref.low
    assert abs(out["lo"] - ref.low) < 0.05 * width and abs(out["hi"] - ref.high) < 0.05 * width
    # Seeded: the same seed gives the same interval.
    again = _stats.mean_ci(x, method="bootstrap", n_resamples=20_000, seed=3)
    assert (again["lo"], again["hi"]) == (out["lo"], out["hi"])
    # And the t-interval is close for n = 300.
    t = _stats.mean_ci(x)
    assert abs(t["lo"] - out["lo"]) < 0.1 * width


def test_bootstrap_chunks_do_not_change_the_draws(monkeypatch):
    x = np.random.default_rng(0).normal(size=50)
    whole = _stats.bootstrap_means(x, 1000, seed=5)
    monkeypatch.setattr(_stats, "_CHUNK_CELLS", 50 * 7)  # 7 resamples per chunk
    assert np.array_equal(_stats.bootstrap_means(x, 1000, seed=5), whole)


@pytest.mark.parametrize("seed", range(6))
def test_wilcoxon_normal_approximation_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(51, 900))
    # Rounded values: ties among |d| and exact zeros, as per-user metric differences have.
    d = np.round(rng.normal(0.05 * (seed - 2), 0.5, n), 1)
    ref = scipy_stats.wilcoxon(d)  # n > 50: scipy's auto is the asymptotic test
    ours = _stats.wilcoxon(d)
    assert ours["method"] == "normal"
    assert ours["statistic"] == pytest.approx(ref.statistic)
    assert ours["p"] == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)
    assert ours["n"] == int((d != 0).sum()) and ours["n_zero"] == int((d == 0).sum())
    asym = scipy_stats.wilcoxon(d, method="asymptotic")
    assert ours["p"] == pytest.approx(asym.pvalue, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("n", [1, 2, 5, 12, 30, 50])
def test_wilcoxon_exact_matches_scipy(n):
    rng = np.random.default_rng(n)
    d = rng.normal(0.3, 1.0, n)  # continuous: no ties, no zeros
    ours = _stats.wilcoxon(d)
    ref = scipy_stats.wilcoxon(d, method="exact")
    assert ours["method"] == "exact"
    assert ours["statistic"] == pytest.approx(ref.statistic)
    assert ours["p"] == pytest.approx(ref.pvalue, rel=1e-9)


def test_wilcoxon_small_n_with_ties_uses_the_normal_approximation():
    d = np.array([0.1, -0.1, 0.2, 0.2, 0.3, 0.0, 0.4, -0.2])
    ours = _stats.wilcoxon(d)
    ref = scipy_stats.wilcoxon(d, method="asymptotic")
    assert ours["method"] == "normal" and ours["n"] == 7 and ours["n_zero"] == 1
    assert ours["p"] == pytest.approx(ref.pvalue, rel=1e-9)


def test_wilcoxon_degenerate_inputs():
    assert _stats.wilcoxon([0.0, 0.0])["p"] == 1.0
    assert _stats.wilcoxon([])["p"] is None
    assert _stats.wilcoxon([np.nan])["p"] is None
    assert 0 < _stats.wilcoxon([0.5])["p"] <= 1


def test_paired_difference():
    rng = np.random.default_rng(7)
    base = rng.normal(0.9, 0.2, 400)
    method = base - 0.05 + rng.normal(0, 0.05, 400)
    method[3] = np.nan  # skipped with its pair
    out = _stats.paired_difference(method, base, n_resamples=5000, seed=1)
    keep = np.isfinite(method)
    d = method[keep] - base[keep]
    assert out["n"] == 399 and out["n_skipped"] == 1
    assert out["mean"] == pytest.approx(d.mean())
    assert out["lo"] < out["mean"] < out["hi"] < 0
    assert out["p"] == pytest.approx(scipy_stats.wilcoxon(d).pvalue, rel=1e-9)
    ref = scipy_stats.bootstrap((d,), np.mean, n_resamples=5000, method="percentile",
                                random_state=0).confidence_interval
    width = ref.high - ref.low
    assert abs(out["lo"] - ref.low) < 0.06 * width and abs(out["hi"] - ref.high) < 0.06 * width
    # Identical methods: zero difference, p = 1.
    same = _stats.paired_difference(base, base)
    assert same["mean"] == 0 and same["p"] == 1.0 and same["lo"] == same["hi"] == 0
    with pytest.raises(ValueError):
        _stats.paired_difference([1.0], [1.0, 2.0])
