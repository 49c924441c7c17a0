"""Minimal gymnax-style spaces with `sample(key)` and `contains(x)`."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp


class MultiDiscrete:
    """`shape` independent integers in [0, n)."""

    def __init__(self, n: int, shape: tuple[int, ...], dtype=jnp.int32):
        self.n, self.shape, self.dtype = n, shape, dtype

    def sample(self, key: chex.PRNGKey) -> chex.Array:
        return jax.random.randint(key, self.shape, 0, self.n).astype(self.dtype)

    def contains(self, x: Any) -> chex.Array:
        x = jnp.asarray(x)
        if x.shape != self.shape or not jnp.issubdtype(x.dtype, jnp.integer):
            return jnp.bool_(False)
        return jnp.all((x >= 0) & (x < self.n))


class Box:
    """Real-valued array of fixed shape within [low, high]."""

    def __init__(self, low: float, high: float, shape: tuple[int, ...], dtype=jnp.float32):
        self.low, self.high, self.shape, self.dtype = low, high, shape, dtype

    def sample(self, key: chex.PRNGKey) -> chex.Array:
        if self.dtype == jnp.bool_:
            return jax.random.bernoulli(key, 0.5, self.shape)
        lo, hi = max(self.low, -1e3), min(self.high, 1e3)
        return jax.random.uniform(key, self.shape, self.dtype, lo, hi)

    def contains(self, x: Any) -> chex.Array:
        x = jnp.asarray(x)
        if x.shape != self.shape or x.dtype != self.dtype:
            return jnp.bool_(False)
        if self.dtype == jnp.bool_:
            return jnp.bool_(True)
        return jnp.all(jnp.isfinite(x) & (x >= self.low) & (x <= self.high))


class Dict:
    """A named collection of spaces (sampled with split keys)."""

    def __init__(self, spaces: dict[str, Any]):
        self.spaces = spaces

    def sample(self, key: chex.PRNGKey) -> dict[str, chex.Array]:
        keys = jax.random.split(key, len(self.spaces))
        return {k: sp.sample(kk) for (k, sp), kk in zip(self.spaces.items(), keys, strict=True)}

    def contains(self, x: Any) -> chex.Array:
        get = x.get if isinstance(x, dict) else lambda k: getattr(x, k, None)
        parts = [
            jnp.bool_(False) if get(k) is None else jnp.asarray(sp.contains(get(k)))
            for k, sp in self.spaces.items()
        ]
        return jnp.all(jnp.stack(parts))
