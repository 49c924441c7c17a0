"""Policies for kv-serve-v0: `policy(key, state, params) -> action dict`, jit/vmap-able.

- `engine_default`: no action - the engine's own rules (vLLM's recompute preemption and LRU
  prefix eviction, or the sglang / trt presets' behaviour). The baseline every result is a
  paired ratio against.
- `random`: uniformly random priorities, and commands drawn among the valid ones (the
  command mask) - a smoke test and a lower reference, not a baseline to beat.

The benchmark's heuristic baselines (priority by role, TTL pinning, offload choices, an offline
Belady policy) belong to the benchmark issue (docs/serving.md).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from kvjax.serve import actions
from kvjax.serve.env import ServeEnv

SERVE_POLICY_NAMES = ("engine_default", "random")


def make_policy(name: str, env: ServeEnv) -> Callable:
    """`policy(key, state, params) -> action` for a named policy (SERVE_POLICY_NAMES)."""
    cfg = env.config
    if name == "engine_default":

        def engine_default(key, state, params):
            return actions.noop_action(cfg)

        return engine_default
    if name == "random":

        def random(key, state, params):
            k1, k2, k3 = jax.random.split(key, 3)
            L = cfg.priority_levels
            mask = actions.command_mask(state, params, cfg)
            return dict(
                request_priority=jax.random.randint(k1, (cfg.max_requests,), 0, L + 1),
                segment_priority=jax.random.randint(k2, (cfg.max_segments,), 0, L + 1),
                commands=jax.random.categorical(
                    k3, jnp.where(mask, 0.0, -jnp.inf), shape=(cfg.max_commands,)
                ).astype(jnp.int32),
            )

        return random
    raise ValueError(f"unknown kv-serve-v0 policy {name!r}; allowed: {list(SERVE_POLICY_NAMES)}")
