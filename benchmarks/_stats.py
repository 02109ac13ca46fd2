"""Statistics for per-user result tables (numpy and the standard library only).

- :func:`mean_ci`: the mean over users with a 95% confidence interval: Student's t-interval
  (default) or a percentile bootstrap.
- :func:`paired_difference`: method minus baseline on the same users: the mean difference, its
  percentile paired-bootstrap CI (users resampled with their pair) and the two-sided Wilcoxon
  signed-rank p-value (:func:`wilcoxon`).
- :func:`wilcoxon`: zero differences dropped (scipy's default ``zero_method="wilcox"``); the
  exact null distribution when at most 50 non-zero differences remain and none of their
  absolute values tie (as scipy's ``method="auto"``), otherwise the normal approximation with
  the tie correction and no continuity correction (scipy's ``method="asymptotic"``; for
  n <= 50 with ties scipy would run a permutation test instead).

Non-finite values (NaN: a metric undefined for that user, e.g. nDCG with no relevant query
item) are skipped and counted (``n_skipped``). The t quantile comes from the regularised
incomplete beta function (continued fraction), inverted by bisection; tests/test_stats.py
checks everything against scipy.stats.
"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist

import numpy as np

LEVEL = 0.95
RESAMPLES = 10_000
_CHUNK_CELLS = 4_000_000  # resampled values held at once by the bootstrap


# -- distributions ------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + x * x))
    return 1.0 - tail if x > 0 else tail


def t_pdf(x: float, df: float) -> float:
    """Density of Student's t with ``df`` degrees of freedom."""
    log_c = math.lgamma((df + 1.0) / 2.0) - math.lgamma(df / 2.0) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1.0) / 2.0 * math.log1p(x * x / df))


@functools.lru_cache(maxsize=4096)
def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (Newton's method,
    safeguarded by bisection; closed forms for df = 1, 2)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    if q == 0.5:
        return 0.0
    if df == 1:
        return math.tan(math.pi * (q - 0.5))
    if df == 2:
        return (2.0 * q - 1.0) / math.sqrt(2.0 * q * (1.0 - q))
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
    x = min(max(NormalDist().inv_cdf(q), lo), hi)
    for _ in range(100):
        f = t_cdf(x, df) - q
        if f < 0:
            lo = x
        else:
            hi = x
        step = f / t_pdf(x, df)
        new = x - step
        if not lo < new < hi:  # Newton left the bracket: bisect
            new = 0.5 * (lo + hi)
        if abs(new - x) <= 1e-14 * max(1.0, abs(x)):
            return new
        x = new
    return x


def norm_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


# -- helpers ------------------------------------------------------------------------------
def _finite(values) -> tuple[np.ndarray, int]:
    x = np.asarray(values, dtype=np.float64).ravel()
    keep = np.isfinite(x)
    return x[keep], int((~keep).sum())


def bootstrap_means(values: np.ndarray, n_resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Means of ``n_resamples`` resamples (with replacement, same size) of ``values``;
    vectorised, a chunk of resamples at a time."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples)
    chunk = max(1, _CHUNK_CELLS // max(n, 1))
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(size, n))
        out[start:start + size] = x[idx].mean(axis=1)
    return out


def _percentile_interval(means: np.ndarray, level: float) -> tuple[float, float]:
    alpha = 1.0 - level
    lo, hi = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


# -- estimates ----------------------------------------------------------------------------
def mean_ci(values, level: float = LEVEL, method: str = "t", n_resamples: int = RESAMPLES,
            seed: int = 0) -> dict:
    """Mean of the finite ``values`` with a ``level`` confidence interval.

    ``method``: ``"t"`` (Student's t-interval, ``mean -/+ t_{n-1} * sd / sqrt(n)``) or
    ``"bootstrap"`` (percentile bootstrap of the mean, ``n_resamples`` resamples, seeded).
    Returns ``{mean, lo, hi, n, n_skipped}`` (``lo``/``hi`` None for n < 2, ``mean`` None for
    n = 0).
    """
    if method not in ("t", "bootstrap"):
        raise ValueError(f"method must be 't' or 'bootstrap', got {method!r}")
    x, skipped = _finite(values)
    n = len(x)
    out = {"mean": None, "lo": None, "hi": None, "n": n, "n_skipped": skipped}
    if n == 0:
        return out
    mean = float(x.mean())
    out["mean"] = mean
    if n < 2:
        return out
    if method == "t":
        half = t_ppf(0.5 + level / 2.0, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
        out["lo"], out["hi"] = mean - half, mean + half
    else:
        out["lo"], out["hi"] = _percentile_interval(bootstrap_means(x, n_resamples, seed), level)
    return out


def wilcoxon(differences) -> dict:
    """Two-sided Wilcoxon signed-rank test of paired differences against 0.

    Zero differences are dropped (``zero_method="wilcox"``). Returns ``{statistic, p, n,
    n_zero, method}``: ``statistic`` is ``min(R+, R-)`` (scipy's two-sided statistic), ``n``
    the non-zero differences used, ``method`` ``"exact"`` (n <= 50, no ties) or ``"normal"``.
    Every difference zero: ``p = 1``; no difference at all: ``p`` None.
    """
    d, _ = _finite(differences)
    zero = d == 0
    d = d[~zero]
    n, n_zero = len(d), int(zero.sum())
    if n == 0:
        return {"statistic": None, "p": 1.0 if n_zero else None, "n": 0, "n_zero": n_zero,
                "method": "none"}
    a = np.abs(d)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # Average ranks of ties (1-based).
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_a)) + 1]
    counts = np.diff(np.r_[starts, n])
    avg = starts + (counts + 1) / 2.0
    ranks = np.empty(n)
    ranks[order] = np.repeat(avg, counts)
    r_plus = float(ranks[d > 0].sum())
    r_minus = float(ranks[d < 0].sum())
    statistic = min(r_plus, r_minus)
    ties = bool((counts > 1).any())
    if n <= 50 and not ties:
        # Exact null distribution of R+: the number of subsets of {1..n} with each rank sum.
        total = n * (n + 1) // 2
        ways = np.zeros(total + 1)
        ways[0] = 1.0
        for r in range(1, n + 1):
            ways[r:] = ways[r:] + ways[:-r].copy()
        pmf = ways / 2.0 ** n
        k = int(round(statistic))
        p = min(1.0, 2.0 * float(pmf[:k + 1].sum()))
        method = "exact"
    else:
        mean = n * (n + 1) / 4.0
        var = n * (n + 1) * (2 * n + 1) / 24.0 - float((counts ** 3 - counts).sum()) / 48.0
        if var <= 0:
            p = 1.0
        else:
            z = (statistic - mean) / math.sqrt(var)
            p = min(1.0, 2.0 * norm_sf(abs(z)))
        method = "normal"
    return {"statistic": statistic, "p": p, "n": n, "n_zero": n_zero, "method": method}


def paired_difference(values, baseline, level: float = LEVEL, n_resamples: int = RESAMPLES,
                      seed: int = 0) -> dict:
    """``values - baseline`` over pairs (position i of both is the same user).

    Pairs where either value is non-finite are skipped (``n_skipped``). Returns ``{mean, lo,
    hi, p, n, n_skipped, n_zero, test}``: the mean difference, its percentile paired-bootstrap
    CI (``n_resamples`` resamples of the users, seeded) and the Wilcoxon signed-rank p-value.
    """
    a = np.asarray(values, dtype=np.float64).ravel()
    b = np.asarray(baseline, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same length, got {len(a)} and {len(b)}")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    n = len(d)
    out = {"mean": None, "lo": None, "hi": None, "p": None, "n": n,
           "n_skipped": int((~keep).sum()), "n_zero": 0, "test": None}
    if n == 0:
        return out
    out["mean"] = float(d.mean())
    if n >= 2:
        out["lo"], out["hi"] = _percentile_interval(bootstrap_means(d, n_resamples, seed), level)
    test = wilcoxon(d)
    out["p"], out["n_zero"], out["test"] = test["p"], test["n_zero"], test["method"]
    return out


def describe(ci_method: str = "t", level: float = LEVEL, n_resamples: int = RESAMPLES) -> dict:
    """Human-readable names of the interval and the test, for table footers."""
    pct = f"{100 * level:g}%"
    cell = (f"{pct} t-interval over users" if ci_method == "t"
            else f"{pct} percentile bootstrap over users ({n_resamples:,} resamples)")
    return {"ci": cell,
            "difference": f"{pct} paired percentile bootstrap over users ({n_resamples:,} "
                          "resamples)",
            "test": "two-sided Wilcoxon signed-rank test over users (zero differences dropped; "
                    "normal approximation with tie correction, exact for <= 50 untied users)"}
