"""Confidence intervals for ``mfu-callbacks compare``: a run's figure with its variance, and the
difference of two runs' figures as a log ratio (percent) or in percentage points.

A run's figure is a ratio of totals (MFU: model FLOPs over GPU-seconds over the peak), estimated from
its windows: with window values r_i and weights w_i (the window's denominator: its GPU-seconds, its
steps, ...), R = Σ w_i r_i / Σ w_i, which is Σ numerator / Σ denominator when r_i is the window's own
ratio. Its variance is the ratio estimator's (Cochran, *Sampling Techniques*, 3rd ed., §6.4, with the
n / (n - 1) correction): Var(R) ≈ n / (n - 1) · Σ w_i² (r_i - R)² / (Σ w_i)². Equal weights give the
familiar s² / n.

Two runs are compared on log R: the difference ln R₂ - ln R₁ has variance Var(R₁)/R₁² + Var(R₂)/R₂²
(delta method), degrees of freedom by Welch–Satterthwaite (n₁ - 1 and n₂ - 1 for the two parts), and
the interval is turned back into percent as 100 · (exp(·) - 1): it can never reach -100%, and a
halving and a doubling are equally far from zero. Fractions that are often zero (padding, input
wait) are compared in percentage points instead, with the same variances. The t quantile is computed
here (the regularized incomplete beta function by its continued fraction, inverted by bisection): no
scipy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes §6.4)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for step in range(1, 500):
        for numerator in (
            step * (b - step) * x / ((a + 2 * step - 1) * (a + 2 * step)),
            -(a + step) * (a + b + step) * x / ((a + 2 * step) * (a + 2 * step + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def _beta_regularized(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _continued_fraction(a, b, x) / a
    return 1.0 - front * _continued_fraction(b, a, 1.0 - x) / b


def t_quantile(probability: float, df: float) -> float:
    """The ``probability`` quantile (above 0.5) of Student's t with ``df`` degrees of freedom (any df > 0).

    Two-sided tail P(|T| > t) = I_{df/(df+t²)}(df/2, 1/2), solved for t by bisection; infinite df
    is the normal quantile.
    """
    if not 0.5 <= probability < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0.5 <= probability < 1 and df > 0, got {probability}, {df}")
    if math.isinf(df) or df > 1e7:
        return statistics.NormalDist().inv_cdf(probability)
    tail = 2.0 * (1.0 - probability)

    def two_sided_tail(t: float) -> float:
        return _beta_regularized(df / 2.0, 0.5, df / (df + t * t))

    low, high = 0.0, 1.0
    while two_sided_tail(high) > tail:
        low, high = high, high * 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if two_sided_tail(middle) > tail:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * high:
            break
    return (low + high) / 2.0


@dataclass(frozen=True)
class Estimate:
    """One run's figure for one metric: its value, the variance of that value (NaN from one window),
    and how many windows it rests on."""

    value: float
    variance: float
    windows: int


def ratio_estimate(
    values: Sequence[float], weights: Sequence[float] | None = None, *, value: float | None = None
) -> Estimate | None:
    """The weighted mean of ``values`` (window ratios, weighted by their denominators) with the ratio
    estimator's variance; ``value`` replaces the mean when the run's own totals give it exactly.
    None without windows; equal weights when the weights are missing or sum to zero."""
    count = len(values)
    if count == 0:
        return None
    if weights is None or len(weights) != count or not sum(weights) > 0:
        weights = [1.0] * count
    total = sum(weights)
    mean = sum(weight * sample for weight, sample in zip(weights, values)) / total
    if count < 2:
        return Estimate(mean if value is None else value, math.nan, count)
    spread = sum((weight * (sample - mean)) ** 2 for weight, sample in zip(weights, values))
    variance = count / (count - 1) * spread / total**2
    return Estimate(mean if value is None else value, variance, count)


@dataclass(frozen=True)
class Difference:
    """Candidate against baseline: the point estimate and its interval, in the unit of ``scale``."""

    estimate: float
    low: float
    high: float
    df: float
    scale: str  # "percent" (relative to the baseline, from the log ratio) or "points" (percentage points)

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "df": self.df if math.isfinite(self.df) else None,
            "scale": self.scale,
        }


def difference(
    baseline: Estimate, candidate: Estimate, confidence: float, *, points: bool = False
) -> Difference | None:
    """The interval on candidate against baseline (module docstring): a log ratio in percent, or a
    difference in percentage points of a fraction; None with fewer than 2 windows a side, or a figure
    that is not positive where a ratio is taken."""
    if baseline.windows < 2 or candidate.windows < 2:
        return None
    if points:
        change = candidate.value - baseline.value
        parts = (baseline.variance, candidate.variance)
    else:
        if not (baseline.value > 0 and candidate.value > 0):
            return None
        change = math.log(candidate.value / baseline.value)
        parts = (baseline.variance / baseline.value**2, candidate.variance / candidate.value**2)
    error = math.sqrt(sum(parts))
    if error > 0:
        df = sum(parts) ** 2 / (
            parts[0] ** 2 / (baseline.windows - 1) + parts[1] ** 2 / (candidate.windows - 1)
        )
    else:
        df = math.inf
    half = t_quantile((1.0 + confidence) / 2.0, df) * error
    if points:
        return Difference(100 * change, 100 * (change - half), 100 * (change + half), df, "points")
    low, high = change - half, change + half
    return Difference(100 * math.expm1(change), 100 * math.expm1(low), 100 * math.expm1(high), df, "percent")


def welch_difference(
    baseline: list[float], candidate: list[float], confidence: float, *, points: bool = False
) -> Difference | None:
    """:func:`difference` of two samples of equally weighted windows (their means)."""
    first, second = ratio_estimate(baseline), ratio_estimate(candidate)
    if first is None or second is None:
        return None
    return difference(first, second, confidence, points=points)
