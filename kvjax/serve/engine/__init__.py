"""One engine iteration of kv-serve-v0, as a flat list of named phases (docs/serving.md section 3).

    iterate(state) = arrivals -> transfers -> timeouts -> schedule -> execute

`schedule` decides, without changing the state, which running requests get tokens, which are
preempted, which waiting requests are admitted and which cached segments are evicted; `execute`
applies that plan, advances the clock by the iteration-latency model and records first tokens
and completions. Every rule reads the request table in an order (running order, waiting order,
LRU order) through the pairwise order matrices of serve/ops.py; no Python loop runs over
requests, and the code is the same for one scenario and under vmap.

The phases and the rules they share, by module:
- events.py: `arrivals`, `transfers`, `timeouts` (and NEVER, a time no event reaches);
- scheduler.py: `schedule` -> `Plan`; executor.py: `execute` (and `insert_segments`);
- requests.py: request transitions written once (`fresh_request` / `set_rows`,
  `recompute_preempt`, `next_calls`);
- blocks.py: blocks and segments (`ceil_blocks`, `pool_blocks`, `private_blocks`,
  `segment_blocks`, `evictable`, `memory`, ...);
- rules.py: per-engine rules (`engine_is`, `running_order_keys`, `preemption_room`, SGLang's
  retract headroom and admission reserve, TRT's reservations).
Every name other modules and tests use is re-exported here (`from kvjax.serve import engine`).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from kvjax.serve import ops, workload
from kvjax.serve.engine.blocks import (
    attached_tokens,
    ceil_blocks,
    cpu_pool_blocks,
    evictable,
    is_leaf,
    key_rows,
    memory,
    on_gpu,
    pool_blocks,
    private_blocks,
    resident,
    row_gather,
    segment_blocks,
    segment_refs,
)
from kvjax.serve.engine.events import NEVER, arrivals, timeouts, transfers
from kvjax.serve.engine.executor import execute, insert_segments
from kvjax.serve.engine.requests import fresh_request, next_calls, recompute_preempt, set_rows
from kvjax.serve.engine.rules import engine_is, running_order_keys
from kvjax.serve.engine.scheduler import Plan, queue_prefix_sums, schedule
from kvjax.serve.types import (
    BLOCK_TOKENS,
    Metrics,
    RequestTable,
    SegmentTable,
    ServeConfig,
    ServeParams,
    ServeState,
)


def iterate(state: ServeState, params: ServeParams, cfg: ServeConfig) -> ServeState:
    """One engine iteration; a no-op once the clock has reached the horizon.

    Every phase is gated by `live` rather than selecting between the new and the old state at
    the end: XLA's CPU backend fused such a whole-state select into its consumers and
    recomputed the schedule per state leaf (7x slower when `params.engine` is traced)."""
    live = state.clock < params.horizon
    nxt = arrivals(state, params, cfg, live)
    nxt = transfers(nxt, live)
    nxt = timeouts(nxt, params, live)
    return execute(nxt, schedule(nxt, params, cfg, live), params, cfg, live)


def run(state: ServeState, params: ServeParams, cfg: ServeConfig) -> ServeState:
    """The control period: `iterations_per_step` engine iterations (lax.scan)."""

    def body(st, _):
        return iterate(st, params, cfg), None

    state, _ = jax.lax.scan(body, state, None, length=cfg.iterations_per_step)
    return state


def empty_state(seed: chex.Array, params: ServeParams, cfg: ServeConfig) -> ServeState:
    """An idle engine at time 0 with its stream's first arrival drawn (the reset)."""
    S, G, R = cfg.max_requests, cfg.max_segments, cfg.finished_log
    zi = lambda *s: jnp.zeros(s, jnp.int32)  # noqa: E731
    zf = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
    none = jnp.full((S,), -1, jnp.int32)
    fresh = fresh_request(cfg, prompt=0)
    # Empty rows start at priority 0, not the default: no rule reads an empty row's priority.
    fresh["priority"] = 0
    req = RequestTable(
        status=zi(S),
        index=none,
        turn=zi(S),
        arrival=zf(S),
        prompt=zi(S),
        output_len=zi(S),
        max_tokens=zi(S),
        segment=none,
        segment_up=none,
        prefix_len=zi(S),
        publish=none,
        publish_len=zi(S),
        **{
            k: jnp.full((S,), v, jnp.float32 if isinstance(v, float) else jnp.int32)
            for k, v in fresh.items()
        },
    )
    plen = (jnp.asarray(params.prefix_tokens, jnp.int32) // BLOCK_TOKENS) * BLOCK_TOKENS
    # The synthetic workload's system prompts are rows 0..num_prefixes-1, keyed by number.
    prompts = jnp.arange(G) < params.num_prefixes
    seg = SegmentTable(
        valid=prompts,
        key=jnp.where(prompts, jnp.arange(G), -1),
        parent=jnp.full((G,), -1, jnp.int32),
        tokens=jnp.full((G,), plen, jnp.int32),
        on_gpu=jnp.zeros((G,), bool),
        last_access=zf(G),
        priority=jnp.full((G,), cfg.default_priority, jnp.int32),
        pinned_until=zf(G),
    )
    zero_metrics = Metrics(
        arrived=zi(),
        finished=zi(),
        good=zi(),
        timed_out=zi(),
        preemptions=zi(),
        agent_preemptions=zi(),
        offloads=zi(),
        invalid_commands=zi(),
        output_tokens=zi(),
        prompt_tokens=zi(),
        hit_tokens=zi(),
        recomputed_tokens=zi(),
        prefill_tokens=zi(),
        ttft_sum=zf(),
        tpot_sum=zf(),
        e2e_sum=zf(),
        log_ttft=zf(R),
        log_tpot=zf(R),
        log_count=zi(),
    )
    start = workload.stream_start(seed, params, cfg)
    first = workload.draw_request(seed, start, params, cfg)
    return ServeState(
        requests=req,
        segments=seg,
        metrics=zero_metrics,
        seed=seed,
        stream_start=start,
        clock=zf(),
        next_index=zi(),
        next_arrival=first["gap"].astype(jnp.float32),
        run_counter=zi(),
        preempt_counter=zi(),
        new_token_ratio=jnp.asarray(params.sglang_ratio_init, jnp.float32),
        reserve_level=zi(),
        link_free=zf(2),
        last_iter_time=zf(),
        recent_ttft=zf(),
        recent_tpot=zf(),
        iterations=zi(),
        steps=zi(),
    )


__all__ = [
    "NEVER",
    "Plan",
    "arrivals",
    "attached_tokens",
    "ceil_blocks",
    "cpu_pool_blocks",
    "empty_state",
    "engine_is",
    "evictable",
    "execute",
    "fresh_request",
    "insert_segments",
    "is_leaf",
    "iterate",
    "key_rows",
    "memory",
    "next_calls",
    "on_gpu",
    "ops",
    "pool_blocks",
    "private_blocks",
    "queue_prefix_sums",
    "recompute_preempt",
    "resident",
    "row_gather",
    "run",
    "running_order_keys",
    "schedule",
    "segment_blocks",
    "segment_refs",
    "set_rows",
    "timeouts",
    "transfers",
]
