"""Policies for kv-serve-v0: `policy(key, state, params) -> action dict`, jit/vmap-able.

- `engine_default`: no action - the engine's own rules (vLLM's recompute preemption and LRU
  prefix eviction, or the sglang / trt presets' behaviour). The baseline every result is a
  paired ratio against.
- `random`: uniformly random priorities, and commands drawn among the valid ones (the
  command mask) - a smoke test and a lower reference, not a baseline to beat.
- the heuristic baselines of serve/baselines.py (docs/serving.md section 11):
  `priority_by_role`, `ttl_pin`, `offload_largest_idle`, `infercept`. They live in their own
  module (rules, a role table and a cost model with their helpers); this one is the registry.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from kvjax.serve import actions, baselines
from kvjax.serve.env import ServeEnv

SERVE_POLICY_NAMES = ("engine_default", "random", *baselines.BASELINES)


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
    if name in baselines.BASELINES:
        rule = baselines.BASELINES[name]

        def baseline(key, state, params):
            return rule(key, state, params, cfg)

        baseline.__name__ = name
        return baseline
    raise ValueError(f"unknown kv-serve-v0 policy {name!r}; allowed: {list(SERVE_POLICY_NAMES)}")
