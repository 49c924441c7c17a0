"""Policies for kv-serve-v0: `policy(key, state, params) -> action dict`, jit/vmap-able.

- `engine_default`: no action - the engine's own rules (vLLM's recompute preemption and LRU
  prefix eviction, or the sglang / trt presets' behaviour). The baseline every result is a
  paired ratio against.
- `random`: uniformly random priorities, and commands drawn among the valid ones (the
  command mask) - a smoke test and a lower reference, not a baseline to beat.
- the heuristic baselines of serve/baselines.py (docs/serving.md section 11):
  `priority_by_role`, `ttl_pin`, `offload_largest_idle`, `infercept`. They live in their own
  module (rules, a role table and a cost model with their helpers); this one is the registry.
- `belady_offline` (serve/offline.py): OFFLINE, future-aware - Belady on prefix segments,
  reading the workload's future arrivals, tool return times and true output lengths. A bound
  for the online policies, never a deployable one: `label()` marks it wherever it is shown.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from kvjax.serve import actions, baselines, offline
from kvjax.serve.env import ServeEnv

SERVE_POLICY_NAMES = ("engine_default", "random", *baselines.BASELINES, *offline.OFFLINE)
# Policies that read the future (not deployable; labelled wherever results are shown).
OFFLINE_POLICIES = tuple(offline.OFFLINE)


def label(name: str) -> str:
    """A policy's name for tables and reports: offline (future-aware) ones say so."""
    return f"{name} (offline: reads the future)" if name in OFFLINE_POLICIES else name


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
    if name in baselines.BASELINES or name in offline.OFFLINE:
        rule = {**baselines.BASELINES, **offline.OFFLINE}[name]

        def baseline(key, state, params):
            return rule(key, state, params, cfg)

        baseline.__name__ = name
        return baseline
    raise ValueError(f"unknown kv-serve-v0 policy {name!r}; allowed: {list(SERVE_POLICY_NAMES)}")
