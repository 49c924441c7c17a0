"""The XLA:CPU idioms both environments' steps use, each beside its plain form, with the one
measurement that put it there.

Both idioms answer the same quirk of XLA's CPU backend - loop fusion pulls a value's whole
elementwise producer chain into every loop that reads it and recomputes it there - but in two
different shapes of program, where the measurements disagree about what stops it:

- `barrier` (`lax.optimization_barrier`): the producer is fused on its own and its
  readers load the result. Measured in kv-cache-v0's batch-trailing step ([slot, batch]
  arrays, several readers of a per-scenario value): 183 fusions instead of 215, the value_aware
  rollout 1.09-1.21x faster (docs/benchmarks.md). Under `vmap` it gained 1.00-1.11x (within
  noise) and is not used there (`kvjax.cache.layout.once`).
- `materialize` (a sum with zeros over a new axis of two): the consumer is an
  [n, n] or [n, G] broadcast of an [n] vector under `vmap` (kv-serve-v0's order matrices). There
  the barrier did not stop the fusion (the CPU pipeline had removed it by then) and a reduce
  does: XLA's CPU backend never fuses a reduce into its consumers. A 30-op chain broadcast to
  [64, 64] ran 18x faster, and a toy vLLM iteration 1.26x (1.04x -> 1.31x in the same-process
  A/B of docs/serving-benchmarks.md).

Both are the identity, bit for bit (tests/harness/test_xla.py); `PLAIN` maps each to it.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp


def barrier(x: Any) -> Any:
    """`x` (an array or a pytree of arrays) computed once, into its own buffers, before any
    reader uses it: the batch-trailing form (see the module docstring)."""
    return jax.lax.optimization_barrier(x)


def materialize(x: chex.Array) -> chex.Array:
    """`x` (an int, float or bool array) unchanged, computed once before the consumers that
    broadcast it: the under-`vmap` form (see the module docstring). Floats travel as their
    int bits, so the sum with zeros is exact."""
    if x.dtype == jnp.bool_:
        return jnp.sum(jnp.stack([x, jnp.zeros_like(x)]), axis=0, dtype=jnp.int32) > 0
    if jnp.issubdtype(x.dtype, jnp.floating):
        bits = jax.lax.bitcast_convert_type(x, jnp.int32)
        return jax.lax.bitcast_convert_type(materialize(bits), x.dtype)
    return jnp.sum(jnp.stack([x, jnp.zeros_like(x)]), axis=0, dtype=x.dtype)


# The plain meaning of each idiom (what the tests check them against).
PLAIN = {"barrier": lambda x: x, "materialize": lambda x: x}

__all__ = ["PLAIN", "barrier", "materialize"]
