"""Seed statistics for the report: Student-t confidence intervals and Welch's t-test.

Written out here (about 60 lines, standard library only) rather than imported from
scipy, so the report has no heavy import and no extra runtime dependency;
``tests/test_report_stats.py`` checks every function against ``scipy.stats`` on fixed
inputs (scipy is a development requirement only).

* Student t distribution: two-sided tail ``P(|T| > t) = I_x(df/2, 1/2)`` with
  ``x = df / (df + t^2)``, where ``I`` is the regularized incomplete beta function
  (continued fraction, modified Lentz; Numerical Recipes 6.4). The quantile is found
  by bisection on that monotone tail.
* :func:`mean_ci`: ``mean ± t_{(1+level)/2, n-1} · s / sqrt(n)`` (s: sample std).
* :func:`welch`: ``t = (m1 - m2) / sqrt(s1²/n1 + s2²/n2)`` with the Welch–Satterthwaite
  degrees of freedom; as ``scipy.stats.ttest_ind(a, b, equal_var=False)``.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function ``I_x(a, b)`` for ``a, b > 0``, ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom (``df`` may be fractional)."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_ppf(q: float, df: float) -> float:
    """Quantile of Student's t: the ``t`` with ``P(T <= t) = q`` (as ``scipy.stats.t.ppf``)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    tail = 2.0 * min(q, 1.0 - q)          # two-sided tail probability of |t|
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > tail:
        lo, hi = hi, hi * 2.0
    for _ in range(200):                  # the tail decreases in t: bisect
        mid = (lo + hi) / 2.0
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > tail else (lo, mid)
    t = (lo + hi) / 2.0
    return t if q > 0.5 else -t


def mean_ci(values: Sequence[float], level: float = 0.95) -> Optional[float]:
    """Half-width of the ``level`` confidence interval of the mean (Student t, n-1 dof);
    None with fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    return t_ppf((1.0 + level) / 2.0, n - 1) * statistics.stdev(values) / math.sqrt(n)


@dataclass(frozen=True)
class Welch:
    t: float
    df: float
    p: float


def welch(a: Sequence[float], b: Sequence[float]) -> Optional[Welch]:
    """Welch's unequal-variance t-test of ``mean(a) == mean(b)`` (two-sided); None when either
    side has fewer than two values. Both samples without spread (deterministic metrics):
    p = 1 for equal means, 0 otherwise (scipy returns NaN there)."""
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0.0:
        same = ma == mb
        return Welch(0.0 if same else math.copysign(math.inf, ma - mb), math.nan, 1.0 if same else 0.0)
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return Welch(t, df, t_two_sided_p(t, df))


def relative_difference(a: float, b: float) -> float:
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0.0 else abs(a - b) / scale


def differs(a: Sequence[float], b: Sequence[float], alpha: float = 0.05, rel_tol: float = 0.005) -> bool:
    """Whether two groups of seeds differ: Welch p < ``alpha`` when both have two or more
    values, else (one seed, or seeds without any spread) a relative difference of the
    means above ``rel_tol``."""
    test = welch(a, b)
    if test is not None and not math.isnan(test.df):
        return test.p < alpha
    return relative_difference(statistics.fmean(a), statistics.fmean(b)) > rel_tol
