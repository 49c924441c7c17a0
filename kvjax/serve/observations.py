"""What the agent sees of kv-serve-v0: fixed-shape request and segment features, globals and
the command mask. It shows what an engine knows - `max_tokens` and the tokens generated so far -
and never a request's true output length or when a tool returns (serving.md section 7)."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax.numpy as jnp

from kvjax.serve import actions, engine, metrics
from kvjax.serve.types import (
    ENGINES,
    LOADING,
    OFFLOADING,
    RUNNING,
    SWAPPED,
    TOOL,
    WAITING,
    ServeConfig,
    ServeParams,
    ServeState,
)

REQUEST_FEATURES = (
    "waiting",
    "running",
    "swapped",
    "transferring",
    "prefilling",
    "prompt_k",
    "computed_k",
    "generated_k",
    "max_tokens_k",
    "age_over_ttft_slo",
    "started",
    "tpot_over_slo",
    "priority",
    "blocks_share",
    "attached",
    "has_prefix",
    "preemptions",
    "in_tool",
)
# Features of a TOOL row (an agentic session's next call, not yet arrived) the agent sees.
TOOL_VISIBLE = tuple(REQUEST_FEATURES.index(k) for k in ("priority", "has_prefix", "in_tool"))
SEGMENT_FEATURES = ("valid", "on_gpu", "tokens_k", "refs", "pinned_s", "priority", "idle_s")
GLOBAL_FEATURES = (
    (
        "time_frac",
        "free",
        "used",
        "cached",
        "cpu_used",
        "waiting",
        "running",
        "backlog",
        "last_iter_ms",
        "recent_ttft_over_slo",
        "recent_tpot_over_slo",
        "reserve",
        "new_token_ratio",
    )
    + tuple(f"engine_{e}" for e in ENGINES)
    + ("fp8",)
)


class ServeObservation(NamedTuple):
    requests: chex.Array  # float32 [S, len(REQUEST_FEATURES)]
    segments: chex.Array  # float32 [G, len(SEGMENT_FEATURES)]
    globals: chex.Array  # float32 [len(GLOBAL_FEATURES)]
    command_mask: chex.Array  # bool [num_command_ids]


def observe(state: ServeState, params: ServeParams, cfg: ServeConfig) -> ServeObservation:
    req, seg = state.requests, state.segments
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    mem = engine.memory(state, params)
    pool = jnp.maximum(f(mem["pool"]), 1.0)
    L1 = max(cfg.priority_levels - 1, 1)
    running = req.status == RUNNING
    started = req.first_token >= 0
    tpot = metrics.time_per_output_token(req.first_token, req.last_token, req.generated)
    r = jnp.stack(
        [
            f(req.status == WAITING),
            f(running),
            f(req.status == SWAPPED),
            f((req.status == OFFLOADING) | (req.status == LOADING)),
            f(running & (req.computed < req.target)),
            f(req.prompt) / 1e3,
            f(req.computed) / 1e3,
            f(req.generated) / 1e3,
            f(req.max_tokens) / 1e3,
            jnp.where(req.status > 0, (state.clock - req.arrival) / params.ttft_slo, 0.0),
            f(started),
            tpot / params.tpot_slo,
            f(req.priority) / L1,
            f(engine.private_blocks(req, seg)) / pool,
            f(req.attached >= 0),
            f(req.segment >= 0),
            f(req.preemptions),
            f(req.status == TOOL),
        ],
        axis=-1,
    )
    r = jnp.where((req.status > 0)[:, None], r, 0.0)
    # A session waiting for its tool shows only that and its prefix flags: engines know neither
    # when a tool returns nor what it adds (serving.md section 7).
    shown = jnp.isin(jnp.arange(len(REQUEST_FEATURES)), jnp.asarray(TOOL_VISIBLE))
    r = jnp.where((req.status == TOOL)[:, None] & ~shown[None, :], 0.0, r)
    refs = engine.segment_refs(req, cfg.max_segments)
    s = jnp.stack(
        [
            f(seg.valid),
            f(seg.on_gpu),
            f(seg.tokens) / 1e3,
            f(refs),
            jnp.maximum(seg.pinned_until - state.clock, 0.0),
            f(seg.priority) / L1,
            jnp.where(seg.on_gpu, state.clock - seg.last_access, 0.0),
        ],
        axis=-1,
    )
    g = jnp.concatenate(
        [
            jnp.stack(
                [
                    state.clock / params.horizon,
                    f(mem["free"]) / pool,
                    f(mem["used"]) / pool,
                    f(mem["cached"]) / pool,
                    f(mem["cpu_used"]) / jnp.maximum(f(mem["cpu_pool"]), 1.0),
                    f(jnp.sum((req.status == WAITING) | (req.status == SWAPPED)))
                    / cfg.max_requests,
                    f(jnp.sum(running)) / f(params.max_num_seqs),
                    f(state.next_arrival <= state.clock),
                    state.last_iter_time * 1e3,
                    state.recent_ttft / params.ttft_slo,
                    state.recent_tpot / params.tpot_slo,
                    f(state.reserve_level) / max(len(cfg.reserve_levels) - 1, 1),
                    state.new_token_ratio,
                ]
            ),
            f(jnp.arange(len(ENGINES)) == params.engine),
            f(params.kv_dtype == 1)[None],
        ]
    )
    return ServeObservation(r, s, g, actions.command_mask(state, params, cfg))
