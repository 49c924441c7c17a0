"""Means and normal-approximation confidence intervals over scenarios: the one definition every
table, leaderboard, sweep and plot of kvjax uses."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Two-sided normal quantiles by confidence level.
Z = {0.9: 1.6449, 0.95: 1.96, 0.99: 2.5758}
Z95 = Z[0.95]


def mean_ci(x: Any, z: float = Z95, skip_nan: bool = False) -> tuple[float, float]:
    """Mean of `x` and the half-width of its normal-approximation interval, `z` standard errors
    (z = 1.96: 95%; the half-width is 0 for a single value). `skip_nan` leaves NaNs out (NaN,
    NaN when nothing is left); otherwise a NaN makes both NaN."""
    x = np.asarray(x, np.float64).ravel()
    if skip_nan:
        x = x[~np.isnan(x)]
        if x.size == 0:
            return float("nan"), float("nan")
    half = z * x.std(ddof=1) / math.sqrt(x.size) if x.size > 1 else 0.0
    return float(x.mean()), float(half)


__all__ = ["Z", "Z95", "mean_ci"]
