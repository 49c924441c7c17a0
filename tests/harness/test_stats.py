"""kvjax.stats.mean_ci: exact values on small hand-built samples."""

import math

import numpy as np
import pytest

from kvjax.stats import Z95, Z, mean_ci


def test_mean_and_half_width_are_exact():
    m, h = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0
    assert h == pytest.approx(1.96 * 1.0 / math.sqrt(3), rel=1e-15)  # sample std 1
    m, h = mean_ci(np.array([[1.0, 3.0]]), z=Z[0.99])  # flattened
    assert (m, h) == (2.0, pytest.approx(2.5758 * math.sqrt(2) / math.sqrt(2)))
    assert Z95 == 1.96


def test_single_value_and_nans():
    assert mean_ci([5.0]) == (5.0, 0.0)
    m, h = mean_ci([1.0, float("nan")])
    assert math.isnan(m) and math.isnan(h)
    assert mean_ci([1.0, float("nan"), 3.0], skip_nan=True) == mean_ci([1.0, 3.0])
    m, h = mean_ci([float("nan")], skip_nan=True)
    assert math.isnan(m) and math.isnan(h)
