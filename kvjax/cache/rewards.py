"""The seed's rubric as one pure function of the state: seven weighted components, four
weight-0 metrics and their weighted `total`.

Every component is 0 before the first step, so the per-step reward `total(s') - total(s)` sums
over an episode to the final rubric total - the number the LLM evaluation reports.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

from kvjax.cache.types import EnvParams, EnvState
from kvjax.validation import check_single

COMPONENTS = (
    "failure_penalty",
    "throughput_reward",
    "headroom_bonus",
    "memory_efficiency",
    "eviction_quality",
    "latency_penalty",
    "risky_eviction_penalty",
)
METRICS = ("total_tokens_metric", "total_failures_metric", "total_latency_metric",
           "pressure_steps_metric")
WEIGHT_FIELDS = dict(
    failure_penalty="w_failure",
    throughput_reward="w_throughput",
    headroom_bonus="w_headroom",
    memory_efficiency="w_memory_efficiency",
    eviction_quality="w_eviction_quality",
    latency_penalty="w_latency",
    risky_eviction_penalty="w_risky_eviction",
)


def weights(params: EnvParams) -> dict[str, chex.Array]:
    """Component name -> weight (the seed's defaults live in EnvParams)."""
    return {k: getattr(params, v) for k, v in WEIGHT_FIELDS.items()}


def rubric(state: EnvState, params: EnvParams) -> dict[str, chex.Array]:
    """Components, metrics and `total` (float32 scalars; a batch-trailing state - see
    kvjax.cache.dynamics - gives one value per scenario). A batch-leading state (what
    `jax.vmap(env.reset_env)` returns) is rejected: use `jax.vmap(rubric, in_axes=(0, None))`."""
    check_single(state, "kvjax.rubric", trailing_ok=True)
    c = state.counters
    played = state.time > 0
    episode_len = state.arrivals.valid.shape[0]  # arrivals: [T, K, *batch]
    f = c.failures.astype(jnp.float32)
    failure = -jnp.minimum(f * 0.15 + jnp.maximum(0.0, f - 2.0) * 0.1, 1.0)
    throughput = jnp.minimum(c.tokens / params.throughput_target_tokens, 1.0)
    headroom = c.headroom / episode_len
    peak = state.usage_peak
    efficiency = jnp.where(peak > 1.0, -0.2, jnp.where(peak < 0.85, 0.2, 0.0))
    mean_value = jnp.where(
        c.evictions > 0, c.eviction_value_sum / jnp.maximum(c.evictions, 1), 1.0
    )
    quality = jnp.clip(mean_value - 0.25 * c.high_value_lost, -1.0, 1.0)
    latency = -jnp.minimum(c.latency * params.latency_scale, params.latency_cap)
    risky = -jnp.minimum(0.25 * c.risky_evictions, 1.0)
    comps = dict(
        failure_penalty=failure,
        throughput_reward=throughput,
        headroom_bonus=headroom,
        memory_efficiency=jnp.where(played, efficiency, 0.0),
        eviction_quality=jnp.where(played, quality, 0.0),
        latency_penalty=latency,
        risky_eviction_penalty=risky,
    )
    comps = {k: jnp.asarray(v, jnp.float32) + 0.0 for k, v in comps.items()}  # no -0.0
    w = weights(params)
    total = sum(w[k] * comps[k] for k in COMPONENTS)
    out = dict(comps)
    out["total"] = jnp.asarray(total, jnp.float32)
    out["total_tokens_metric"] = c.tokens
    out["total_failures_metric"] = c.failures.astype(jnp.float32)
    out["total_latency_metric"] = c.latency
    out["pressure_steps_metric"] = state.time_above_0_95.astype(jnp.float32)
    return out


def total(state: EnvState, params: EnvParams) -> chex.Array:
    """The weighted rubric total alone."""
    return rubric(state, params)["total"]
