"""kvjax.cache.layout: every layout-dependent idiom equals its plain-jnp form (`layout.PLAIN`), for
one scenario (what vmap hands the step) and batch-trailing, and under vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.cache import layout

RNG = np.random.default_rng(0)
SHAPES = [(16,), (16, 8), (16, 3, 5)]  # one scenario, batch-trailing, two trailing axes


def ints(shape, lo=-40, hi=40):
    return jnp.asarray(RNG.integers(lo, hi, shape), jnp.int32)


@pytest.mark.parametrize("shape", SHAPES)
def test_prefix_sum_is_a_cumulative_sum(shape):
    x = ints(shape, 0, 5000)
    np.testing.assert_array_equal(layout.prefix_sum(x), layout.PLAIN["prefix_sum"](x))
    np.testing.assert_array_equal(jax.vmap(layout.prefix_sum)(x[None]), x[None].cumsum(1))


@pytest.mark.parametrize("shape", SHAPES)
def test_once_is_the_identity(shape):
    """`once` (kvjax.xla.barrier batch-trailing, the value itself for one scenario)."""
    for x in (
        ints(shape, -(2**31), 2**31 - 1),  # exact beyond float32's 2^24
        ints(shape, 0, 2) > 0,
        jnp.asarray(RNG.normal(size=shape), jnp.float32),
    ):
        got = layout.once(x)
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(got, x)


@pytest.mark.parametrize("shape", SHAPES)
def test_sums_and_any_over_axis_0(shape):
    for x in (
        ints(shape, 0, 3000),
        ints(shape, 0, 2) > 0,
        jnp.asarray(RNG.integers(0, 400, shape) / 4, jnp.float32),
    ):
        np.testing.assert_array_equal(layout.slot_sum(x), layout.PLAIN["slot_sum"](x))
        np.testing.assert_array_equal(layout.slot_any(x), layout.PLAIN["slot_any"](x))
    a, b = ints(shape, 0, 100), ints(shape, 0, 2) > 0
    got = layout.slot_sums(a, b)
    for g, x in zip(got, (a, b), strict=True):
        np.testing.assert_array_equal(g, layout.PLAIN["slot_sum"](x))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("top", [3, 7, 16 + 3])  # batch-trailing: the 4-, 8- and 16-row selects
def test_gather_rows_and_pick_are_takes_with_zero_outside(shape, top):
    n, m = shape[0], 12
    table = {"a": ints(shape), "b": ints(shape, 0, 9)}
    index = ints((m,) + shape[1:], -3, top)  # some out of range (below, and above for top > n)
    got = layout.gather_rows(table, index, n)
    want = layout.PLAIN["gather_rows"](table, index, n)
    for f in table:
        np.testing.assert_array_equal(got[f], want[f])
    sel = ints(shape[1:], -2, n + 2)
    np.testing.assert_array_equal(
        layout.pick(table["a"], sel, n), layout.PLAIN["pick"](table["a"], sel, n)
    )


@pytest.mark.parametrize("batch", [(), (7,)])
def test_schedule_row_is_row_t_or_zeros_past_the_end(batch):
    T, K = 6, 4
    x = ints((T, K) + batch)
    for t in range(-0, T + 2):
        tt = jnp.full(batch, t, jnp.int32)
        np.testing.assert_array_equal(
            layout.schedule_row(x, tt, T), layout.PLAIN["schedule_row"](x, tt, T)
        )


@pytest.mark.parametrize("shape", [(), (16,), (16, 8)])
def test_stack_last_is_a_float32_stack_along_a_new_minor_axis(shape):
    cols = []
    for c in range(19):  # bools and floats interleaved, as in the observation
        if c % 3 == 0:
            cols.append(jnp.asarray(RNG.integers(0, 2, shape) > 0))
        else:
            cols.append(jnp.asarray(RNG.normal(size=shape), jnp.float32))
    got = jax.jit(layout.stack_last)(cols)
    want = layout.PLAIN["stack_last"](cols)
    assert got.shape == shape + (19,) and got.dtype == jnp.float32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(jax.vmap(layout.stack_last)([c[None] for c in cols])[0], want)
