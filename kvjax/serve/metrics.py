"""kv-serve-v0's score and the serving metrics the field reports (serving.md section 5).

The reward is dense and telescoping: `score(state) = good / (arrival_rate * horizon)`, the
requests finished within both SLOs (TTFT <= ttft_slo and TPOT <= tpot_slo) per request the
workload offers in the window, and each step's reward is the change of `score`, so an
episode's return is its final score = goodput / offered rate. Credit comes only when a request
completes within its SLOs: no term rewards idle memory, utilisation or a proxy the engine does
not have; a timed-out or late request simply earns nothing.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

from kvjax.serve.types import ServeParams, ServeState

QUANTILES = (50, 90, 99)


def score(state: ServeState, params: ServeParams) -> chex.Array:
    """Requests within both SLOs per request offered in the window (the potential)."""
    offered = (
        jnp.asarray(params.arrival_rate, jnp.float32) * params.calls_per_arrival * params.horizon
    )
    return state.metrics.good.astype(jnp.float32) / offered


def time_per_output_token(
    first_token: chex.Array, last_token: chex.Array, generated: chex.Array
) -> chex.Array:
    """TPOT: seconds from a request's first to its last token per token after the first (0
    before its second token)."""
    per = (last_token - first_token) / jnp.maximum(generated - 1, 1).astype(jnp.float32)
    return jnp.where(generated > 1, per, 0.0)


def meets_slo(ttft: chex.Array, tpot: chex.Array, params: ServeParams) -> chex.Array:
    """Whether a finished request met both SLOs (TTFT <= ttft_slo and TPOT <= tpot_slo): the
    requests `score` counts."""
    return (ttft <= params.ttft_slo) & (tpot <= params.tpot_slo)


def episode_metrics(state: ServeState, params: ServeParams) -> dict[str, chex.Array]:
    """Per-scenario metrics of a (final) state; percentiles over the finished-request log (the
    last `finished_log` completions)."""
    m = state.metrics
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    duration = jnp.maximum(jnp.minimum(state.clock, params.horizon), 1e-9)
    R = m.log_ttft.shape[-1]
    valid = jnp.arange(R) < jnp.minimum(m.log_count, R)[..., None]
    out = dict(
        score=score(state, params),
        goodput=f32(m.good) / duration,
        throughput_tokens=f32(m.output_tokens) / duration,
        throughput_requests=f32(m.finished) / duration,
        slo_attainment=f32(m.good) / jnp.maximum(f32(m.finished), 1.0),
        hit_rate=f32(m.hit_tokens) / jnp.maximum(f32(m.prompt_tokens), 1.0),
        preemptions_per_s=f32(m.preemptions + m.agent_preemptions) / duration,
        recomputed_fraction=f32(m.recomputed_tokens) / jnp.maximum(f32(m.prefill_tokens), 1.0),
        mean_ttft=m.ttft_sum / jnp.maximum(f32(m.finished), 1.0),
        mean_tpot=m.tpot_sum / jnp.maximum(f32(m.finished), 1.0),
        mean_e2e=m.e2e_sum / jnp.maximum(f32(m.finished), 1.0),
        arrived=m.arrived,
        finished=m.finished,
        good=m.good,
        timed_out=m.timed_out,
        preemptions=m.preemptions,
        agent_preemptions=m.agent_preemptions,
        offloads=m.offloads,
        invalid_commands=m.invalid_commands,
        iterations=state.iterations,
        clock=state.clock,
    )
    for name, log in (("ttft", m.log_ttft), ("tpot", m.log_tpot)):
        x = jnp.where(valid, log, jnp.nan)
        for q in QUANTILES:
            out[f"p{q}_{name}"] = jnp.nan_to_num(jnp.nanpercentile(x, q, axis=-1), nan=0.0)
    return out


METRICS = tuple(
    [
        "score",
        "goodput",
        "throughput_tokens",
        "throughput_requests",
        "slo_attainment",
        "hit_rate",
        "preemptions_per_s",
        "recomputed_fraction",
        "mean_ttft",
        "mean_tpot",
        "mean_e2e",
    ]
    + [f"p{q}_{n}" for n in ("ttft", "tpot") for q in QUANTILES]
)
