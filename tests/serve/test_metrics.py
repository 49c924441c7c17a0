"""kv-serve-v0's per-request scoring rules (serve/metrics.py) and the load <-> arrival rate pair
(serve/capacity.py) on hand-built values."""

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.serve import metrics
from kvjax.serve import workload as workloads
from kvjax.serve.capacity import arrival_rate_at, capacity_rps, load_at
from kvjax.serve.env import make
from kvjax.serve.types import ServeParams


def test_meets_slo_needs_both_and_the_bounds_are_inclusive():
    p = ServeParams(ttft_slo=jnp.float32(2.0), tpot_slo=jnp.float32(0.1))
    ttft = jnp.asarray([1.0, 2.0, 2.001, 0.5, 3.0], jnp.float32)
    tpot = jnp.asarray([0.1, 0.05, 0.01, 0.1001, 0.2], jnp.float32)
    got = metrics.meets_slo(ttft, tpot, p)
    np.testing.assert_array_equal(got, [True, True, False, False, False])


def test_time_per_output_token_counts_the_tokens_after_the_first():
    first = jnp.asarray([1.0, 1.0, 1.0, -1.0], jnp.float32)
    last = jnp.asarray([2.0, 1.0, 3.0, -1.0], jnp.float32)
    generated = jnp.asarray([5, 1, 2, 0], jnp.int32)
    got = metrics.time_per_output_token(first, last, generated)
    np.testing.assert_array_equal(got, np.asarray([0.25, 0.0, 2.0, 0.0], np.float32))
    assert got.dtype == jnp.float32


def test_load_and_arrival_rate_are_one_rule_both_ways():
    assert arrival_rate_at(0.5, 10.0, 2.0) == 2.5  # 0.5 x 10 calls/s, two calls per arrival
    assert load_at(2.5, 10.0, 2.0) == 0.5
    assert arrival_rate_at(1.5, 4.0) == 6.0 and load_at(6.0, 4.0) == 1.5
    for load in (0.1, 0.8, 1.0, 1.7, 3.3):
        for cap, calls in ((7.3, 1.0), (123.4, 3.7)):
            rate = arrival_rate_at(load, cap, calls)
            assert load_at(rate, cap, calls) == pytest.approx(load, rel=1e-15)


@pytest.mark.parametrize("workload", ["synthetic", "agentic"])
def test_make_sets_the_arrival_rate_by_the_rule(workload):
    for load in (0.8, 1.3):
        _, p = make("toy", workload=workload, load=load)
        calls = float(p.calls_per_arrival)
        moments = workloads.agentic_moments(p) if workload == "agentic" else None
        cap = capacity_rps(p, moments)
        assert float(p.arrival_rate) == np.float32(arrival_rate_at(load, cap, calls))
        assert load_at(float(p.arrival_rate), cap, calls) == pytest.approx(load, rel=1e-6)
