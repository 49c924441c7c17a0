"""kvjax.base: the one params normalisation every env's jitted code relies on."""

import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.base import normalize_params
from kvjax.cache.types import EnvParams
from kvjax.serve.types import ServeParams


def test_fields_are_typed_by_their_defaults():
    p = normalize_params(EnvParams(difficulty=2, kv_cache_bytes=2**30))
    assert p.difficulty.dtype == jnp.int32 and int(p.difficulty) == 2
    assert p.kv_cache_bytes.dtype == jnp.float32  # an int given for a float field
    assert p.max_wait_steps.dtype == jnp.int32 and p.step_seconds.dtype == jnp.float32
    s = normalize_params(ServeParams(horizon=30, max_num_seqs=np.int64(8)))
    assert s.horizon.dtype == jnp.float32 and s.max_num_seqs.dtype == jnp.int32
    assert float(s.horizon) == 30.0 and int(s.max_num_seqs) == 8


def test_normalized_params_compile_one_program_whatever_numbers_the_caller_passed():
    """Python ints, Python floats and numpy 64-bit scalars for the same fields give one
    signature, so a jitted function traces once."""
    import chex
    import jax

    _, params = kvjax.make("kv-cache-v0", difficulty="hard")
    variants = [
        params,
        params.replace(difficulty=1, kv_cache_bytes=2**31, step_seconds=1),
        params.replace(difficulty=np.int64(0), kv_cache_bytes=np.float64(1e9)),
    ]

    @jax.jit
    @chex.assert_max_traces(n=1)
    def total(p):
        return p.kv_cache_bytes * p.difficulty + p.step_seconds

    for p in variants:
        total(normalize_params(p))
