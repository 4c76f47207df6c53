"""The statistics the ablation reports and the pixel drift comparisons share: Student's t (two-sided p, the
95% quantile), the 95% interval of a mean, the one-sample t test, Holm's adjustment, and p-value rounding.
Pure Python and numpy (no scipy): the incomplete beta function by its continued fraction."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

__all__ = ["t975", "t_two_sided_p", "interval", "t_test", "holm", "sig", "mean_test"]


def t975(df: float) -> float:
    """97.5% quantile of Student's t with `df` > 0 degrees of freedom (the 95% interval's multiplier; a
    real df for Satterthwaite's), by bisection on `t_two_sided_p` (to float precision)."""
    if not df > 0:
        raise ValueError(f"df must be > 0 (got {df})")
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > 0.05:
        hi *= 2.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 0.05 else (lo, mid)
    return 0.5 * (lo + hi)


def interval(values: np.ndarray) -> dict:
    """Mean and the half-width of its 95% t interval over the finite values (clips)."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    half = t975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size) if v.size > 1 else 0.0
    return {"mean": round(float(v.mean()), 5), "ci95": round(half, 5), "n": int(v.size)}


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b), by its continued fraction (modified Lentz; converges
    fast for x < (a + 1) / (a + b + 2), else evaluated through the symmetry I_x(a, b) = 1 - I_{1-x}(b, a))."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even step, then odd step
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` > 0 degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    if not df > 0:
        raise ValueError(f"df must be > 0 (got {df})")
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def holm(pvalues: dict) -> dict:
    """Holm's step-down adjustment of a family of p-values {name: p} (None passes through): with p_(1) <=
    ... <= p_(m), the adjusted p_(i) is max over j <= i of min(1, (m - j + 1) p_(j)). Rejecting where the
    adjusted p < 0.05 keeps the family-wise error rate at 5% within this family (one metric's
    comparisons; several metrics are several families)."""
    known = sorted((p, k) for k, p in pvalues.items() if p is not None)
    out, running = {k: None for k, p in pvalues.items() if p is None}, 0.0
    for i, (p, k) in enumerate(known):
        running = max(running, min(1.0, (len(known) - i) * p))
        out[k] = running
    return out


def t_test(d: np.ndarray) -> Optional[float]:
    """Two-sided one-sample t test of mean(d) = 0 over the finite values (unrounded p). Without spread
    (every value equal up to float rounding) the test is decided: p = 0 for a nonzero mean, 1 for zero;
    None for fewer than 2 values."""
    d = d[np.isfinite(d)]
    if d.size < 2:
        return None
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(mean)):
        return 0.0 if abs(mean) > 1e-12 else 1.0
    return t_two_sided_p(mean / (sd / math.sqrt(d.size)), d.size - 1)


def sig(p: Optional[float], digits: int = 3) -> Optional[float]:
    """A p-value for a report: `digits` significant figures (a tiny p stays visible, not 0.0)."""
    return None if p is None else float(f"{p:.{digits}g}")


def mean_test(d: np.ndarray) -> dict:
    """The mean of the finite values of `d` (differences, one per pair) with its 95% interval (`interval`)
    and the two-sided t test of mean 0 (`t_test`, its p rounded by `sig`)."""
    return {**interval(d), "p": sig(t_test(d))}
