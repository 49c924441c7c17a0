"""kvjax.xla: both XLA:CPU idioms return their input exactly - ints, bools, floats with -0.0,
inf, NaN and denormals; eagerly, under jit and under vmap (and pytrees through the barrier)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import xla

RNG = np.random.default_rng(0)
SPECIAL = [-0.0, 0.0, np.inf, -np.inf, np.nan, 1e-45, -3.4e38, 1.5]


def _inputs(shape):
    n = int(np.prod(shape))
    floats = np.concatenate([SPECIAL, RNG.normal(size=max(n - len(SPECIAL), 0))])[:n]
    return (
        jnp.asarray(RNG.integers(-(2**31), 2**31 - 1, shape), jnp.int32),  # beyond float32's 2^24
        jnp.asarray(RNG.random(shape) < 0.5),
        jnp.asarray(floats.reshape(shape), jnp.float32),
    )


def _bits(x):
    a = np.asarray(x)
    return a.view(np.int32) if a.dtype == np.float32 else a


@pytest.mark.parametrize("name", sorted(xla.PLAIN))
@pytest.mark.parametrize("shape", [(17,), (3, 17), (8, 4, 5)])
def test_each_idiom_is_the_identity_bit_for_bit(name, shape):
    fn = getattr(xla, name)
    for x in _inputs(shape):
        for f in (fn, jax.jit(fn), jax.vmap(fn)):
            y = f(x)
            assert y.dtype == x.dtype and y.shape == x.shape
            np.testing.assert_array_equal(_bits(y), _bits(xla.PLAIN[name](x)))


def test_the_barrier_passes_a_pytree_whole():
    tree = {"a": jnp.arange(6, dtype=jnp.int32), "b": jnp.asarray([True, False])}
    got = jax.jit(xla.barrier)(tree)
    for k in tree:
        np.testing.assert_array_equal(got[k], tree[k])
