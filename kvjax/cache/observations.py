"""Observations: fixed-shape arrays for policies, and a compact JSON summary for LLMs.

Both are computed from the same state. `observe` is jit/vmap-safe; `summarize` is host-side
(it turns one unbatched state into plain Python values for a prompt).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.cache.dynamics import action_validity, progress, slot_memory
from kvjax.cache.layout import stack_last
from kvjax.cache.scenarios import budget_tokens, usage
from kvjax.cache.types import (
    BLOCK_TYPES,
    CPU,
    LOCATIONS,
    PRECISIONS,
    EnvParams,
    EnvState,
)
from kvjax.validation import check_single

SLOT_FEATURES = (
    "active", "system", "context", "generation", "reasoning", "ephemeral",
    "int8", "int4", "on_cpu", "memory_frac", "priority", "eviction_value", "progress",
    "remaining", "idle_steps", "tool_wait", "paused", "stalled_on_cpu", "arrival_age",
)
GLOBAL_FEATURES = (
    "memory_usage", "memory_budget", "usage_peak", "episode_remaining", "time_above_0_95",
    "pending_queue_growth", "pending_count", "pending_tokens_frac", "pending_oldest_wait",
    "pending_head_frac", "free_slots", "cpu_frac",
)


@struct.dataclass
class Observation:
    """What a policy sees. Shapes: slots [S, len(SLOT_FEATURES)], globals [len(GLOBAL_FEATURES)],
    action_mask [1 + 3S] (bool; True = the action would act on the current state)."""

    slots: chex.Array
    globals: chex.Array
    action_mask: chex.Array


def action_mask(state: EnvState) -> chex.Array:
    """[1 + 3S] bool: keep, then evict / compress / swap_to_cpu for each slot."""
    evict, compress, swap = action_validity(state.slots)
    return jnp.concatenate([jnp.ones((1,), bool), evict, compress, swap])


def observe(state: EnvState, params: EnvParams) -> Observation:
    """Normalised per-slot and global features (float32) plus the action mask (one scenario;
    jax.vmap it for a batch)."""
    check_single(state, "kvjax.observe")
    s, q = state.slots, state.pending
    T = state.arrivals.valid.shape[-2]
    P = q.valid.shape[-1]
    S = s.active.shape[-1]
    B = budget_tokens(state, params)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    act = f32(s.active)
    mem = slot_memory(s)
    ready = s.active & (s.tool_wait == 0) & (s.remaining > 0)
    slot_feats = stack_last(  # the SLOT_FEATURES in order; 0/1 features as bools
        [
            s.active,
            *[s.block_type == i for i in range(len(BLOCK_TYPES))],
            s.precision == 1,
            s.precision == 2,
            s.location == CPU,
            mem / B,
            f32(s.priority) / 100.0,
            s.eviction_value,
            progress(s),
            f32(s.remaining) / 100.0,
            f32(state.time - s.last_access) / T,
            f32(s.tool_wait) / 4.0,
            s.tool_wait > 0,
            ready & (s.location == CPU),
            f32(state.time - s.arrival_step) / (4.0 * T),
        ]
    )
    slot_feats = slot_feats * act[..., None]  # empty rows are all zeros (stale fields inert)
    pend_tokens = jnp.sum(jnp.where(q.valid, q.tokens, 0))
    oldest = jnp.max(jnp.where(q.valid, state.time - q.arrival_step, 0))
    cpu_mem = jnp.sum(jnp.where(s.location == CPU, mem, 0.0))
    glob = jnp.stack(
        [
            usage(state, params),
            state.memory_budget,
            state.usage_peak,
            f32(T - state.time) / T,
            f32(state.time_above_0_95) / T,
            f32(state.pending_queue_growth) / P,
            f32(jnp.sum(q.valid)) / P,
            f32(pend_tokens) / B,
            f32(oldest) / jnp.maximum(f32(params.max_wait_steps), 1.0),
            f32(q.tokens[0]) / B,
            f32(S - jnp.sum(s.active)) / S,
            cpu_mem / B,
        ]
    )
    return Observation(slots=slot_feats, globals=glob, action_mask=action_mask(state))


def _entry(s: dict[str, np.ndarray], i: int, B: float) -> dict[str, Any]:
    mem = float(s["tokens"][i]) * 0.5 ** int(s["precision"][i])
    out_len = int(s["output_len"][i])
    prog = (out_len - int(s["remaining"][i])) / out_len if out_len > 0 else 0.0
    return {
        "seq_id": int(s["seq_id"][i]),
        "type": BLOCK_TYPES[int(s["block_type"][i])],
        "tokens": int(s["tokens"][i]),
        "precision": PRECISIONS[int(s["precision"][i])],
        "location": LOCATIONS[int(s["location"][i])],
        "memory_frac": round(mem / B, 4) if int(s["location"][i]) == 0 else 0.0,
        "priority": int(s["priority"][i]),
        "eviction_value": round(float(s["eviction_value"][i]), 3),
        "progress": round(prog, 3),
        "tool_wait": int(s["tool_wait"][i]),
        "last_access": int(s["last_access"][i]),
    }


def summarize(state: EnvState, params: EnvParams, top_k: int = 5) -> dict[str, Any]:
    """The seed's compact observation for one (unbatched) state, as JSON-ready Python values.

    Candidates are ranked by eviction safety: eviction_value high first, then priority low,
    then progress low (the least harm first)."""
    check_single(state, "kvjax.summarize", hint="it is host-side, not vmappable: pick one "
                 "scenario, e.g. jax.tree_util.tree_map(lambda x: x[i], state)")
    state = jax.device_get(state)
    s = {k: np.asarray(v) for k, v in vars(state.slots).items()}
    q = {k: np.asarray(v) for k, v in vars(state.pending).items()}
    T = int(np.asarray(state.arrivals.valid).shape[-2])
    t = int(state.time)
    B = float(np.asarray(budget_tokens(state, params)))
    idx = [int(i) for i in np.nonzero(s["active"])[0]]
    entries = {i: _entry(s, i, B) for i in idx}
    by_memory = sorted(idx, key=lambda i: (-entries[i]["memory_frac"], -entries[i]["tokens"], i))
    by_safety = sorted(
        idx,
        key=lambda i: (-entries[i]["eviction_value"], entries[i]["priority"],
                       entries[i]["progress"], i),
    )
    types = [BLOCK_TYPES[int(s["block_type"][i])] for i in idx]
    waits = [t - int(a) for a, v in zip(q["arrival_step"], q["valid"], strict=True) if v]
    return {
        "step": t,
        "memory_usage": round(float(np.asarray(usage(state, params))), 4),
        "memory_budget": round(float(state.memory_budget), 4),
        "episode_remaining": T - t,
        "time_above_0_95": int(state.time_above_0_95),
        "pending_queue_growth": int(state.pending_queue_growth),
        "cache_overview": {
            "sequences": len(idx),
            "free_slots": int(len(s["active"]) - len(idx)),
            "by_type": {b: types.count(b) for b in BLOCK_TYPES},
            "compressed": sum(int(s["precision"][i]) > 0 for i in idx),
            "swapped": sum(int(s["location"][i]) == CPU for i in idx),
            "paused_for_tool": sum(int(s["tool_wait"][i]) > 0 for i in idx),
        },
        "top_memory_entries": [entries[i] for i in by_memory[:top_k]],
        "top_eviction_candidates": [entries[i] for i in by_safety[:top_k]],
        "pending_summary": {
            "count": len(waits),
            "total_tokens": int(np.sum(np.where(q["valid"], q["tokens"], 0))),
            "oldest_wait_steps": max(waits) if waits else 0,
            "max_wait_steps": int(np.asarray(params.max_wait_steps)),
        },
        "visible_seq_ids": [entries[i]["seq_id"] for i in by_safety],
    }
