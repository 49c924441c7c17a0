"""The execute phase of a kv-serve-v0 engine iteration: apply the schedule's `Plan`, advance the
clock by the iteration-latency model, record first tokens and completions, and insert the
prefix segments requests publish (docs/serving.md section 3)."""

from __future__ import annotations

import chex
import jax.numpy as jnp

from kvjax.serve import latency, metrics, ops
from kvjax.serve.engine.blocks import (
    attached_tokens,
    evictable,
    key_rows,
    resident,
    row_gather,
    segment_refs,
)
from kvjax.serve.engine.events import NEVER
from kvjax.serve.engine.requests import next_calls, recompute_preempt
from kvjax.serve.engine.scheduler import Plan
from kvjax.serve.types import (
    EMPTY,
    LOADING,
    OFFLOADING,
    RUNNING,
    SWAPPED,
    TOOL,
    WAITING,
    RequestTable,
    SegmentTable,
    ServeConfig,
    ServeParams,
    ServeState,
)


def insert_segments(
    req: RequestTable, seg: SegmentTable, clock: chex.Array, cfg: ServeConfig, live: chex.Array
) -> tuple[RequestTable, SegmentTable]:
    """Segment inserts (docs/serving.md section 3, Execute): a running request whose computed
    tokens cover its next segment (`segment`, then `publish`) makes it resident when no
    resident row holds that key, and attaches to it, so its blocks move to the segment.

    The row: the key's own (non-resident) row if it has one, else the first free row - never
    used, then not resident and not being re-inserted, then evictable in eviction order (the
    j-th request needing a row takes the j-th free one); of several requests inserting one key
    the lowest table row inserts."""
    G = seg.valid.shape[-1]
    held = attached_tokens(req, seg)
    read_next = (req.segment >= 0) & (held < req.prefix_len)
    publish_next = (req.publish >= 0) & (held < req.publish_len)
    key = jnp.where(read_next, req.segment, jnp.where(publish_next, req.publish, -1))
    tokens = jnp.where(read_next, req.prefix_len, req.publish_len)
    found, own_row = key_rows(key, seg)
    want = (
        (req.status == RUNNING)
        & (key >= 0)
        & (req.computed >= tokens)
        & ~row_gather(resident(seg), own_row, False)
        & live
    )
    want = want & ops.first_of_equal(key, want)
    want, own_row = ops.materialize(want), ops.materialize(own_row)
    reuse = want & found
    new = want & ~found
    # Free rows in allocation order.
    reinserted = jnp.any((own_row[:, None] == jnp.arange(G)[None, :]) & reuse[:, None], axis=0)
    refs = segment_refs(req, G)
    cls = jnp.where(
        ~seg.valid,
        0,
        jnp.where(~seg.on_gpu & ~reinserted, 1, jnp.where(evictable(seg, refs, clock), 2, 3)),
    )
    free = cls < 3
    by_eviction = cls == 2
    before = ops.order(
        (
            cls,
            jnp.where(by_eviction, seg.priority, 0),
            jnp.where(by_eviction, seg.last_access, 0.0),
        ),
        free,
    )
    # (-2: matches no request's rank, which is -1 or a count from 0 that may exceed G)
    free_rank = jnp.where(free, before.prefix_sum(free.astype(jnp.int32)), -2)
    new_rank = jnp.where(new, ops.row_prefix_sum(new.astype(jnp.int32)), -1)
    new_rank, free_rank = ops.materialize(new_rank), ops.materialize(free_rank)
    take = (new_rank[:, None] == free_rank[None, :]) & new[:, None]  # [S, G]
    take = take | ((own_row[:, None] == jnp.arange(G)[None, :]) & reuse[:, None])
    inserts = jnp.any(take, axis=1)  # requests that insert (a free row was left for them)
    row = jnp.sum(jnp.where(take, jnp.arange(G)[None, :], 0), axis=1)
    hit_g = jnp.any(take, axis=0)  # rows written
    fresh_key = hit_g & ~jnp.any(take & reuse[:, None], axis=0)  # rows that change key
    from_req = lambda x: jnp.sum(jnp.where(take, x[:, None], 0), axis=0)  # noqa: E731
    seg = seg.replace(
        valid=seg.valid | hit_g,
        key=jnp.where(hit_g, from_req(key), seg.key),
        parent=jnp.where(hit_g, from_req(req.attached), seg.parent),
        tokens=jnp.where(hit_g, from_req(tokens), seg.tokens),
        on_gpu=seg.on_gpu | hit_g,
        last_access=jnp.where(hit_g, clock, seg.last_access),
        priority=jnp.where(fresh_key, cfg.default_priority, seg.priority),
        pinned_until=jnp.where(fresh_key, 0.0, seg.pinned_until),
    )
    return req.replace(attached=jnp.where(inserts, row, req.attached)), seg


def execute(
    state: ServeState, plan: Plan, params: ServeParams, cfg: ServeConfig, live: chex.Array = True
) -> ServeState:
    """Apply the plan and advance the clock; with `live` False (past the horizon) the plan is
    empty and nothing changes."""
    req, seg, m = state.requests, state.segments, state.metrics
    G, R = cfg.max_segments, cfg.finished_log
    swapped = req.status == SWAPPED
    n_pre = jnp.sum(plan.preempt).astype(jnp.int32)
    n_adm = jnp.sum(plan.admit).astype(jnp.int32)
    pc = state.preempt_counter + n_pre

    # Preemption by recompute: free the blocks, computed -> 0, prepend to the waiting queue
    # (the victim nearest the head of the running order ends up first).
    req, lost = recompute_preempt(req, seg, plan.preempt, plan.preempt_pos - pc)
    # Admission: a swapped request starts loading its KV back; others start (re)prefilling,
    # after the prefix-cache hit.
    load_start = jnp.maximum(state.clock, state.link_free[1])
    load = plan.admit & swapped
    load_done = load_start + latency.transfer_time(params, plan.load_before + req.cpu_blocks)
    link_in = jnp.where(jnp.any(load), jnp.max(jnp.where(load, load_done, 0.0)), state.link_free[1])
    fresh = plan.admit & ~swapped
    req = req.replace(
        status=jnp.where(load, LOADING, jnp.where(fresh, RUNNING, req.status)),
        xfer_done=jnp.where(load, load_done, req.xfer_done),
        run_key=jnp.where(plan.admit, state.run_counter + plan.admit_pos, req.run_key),
        computed=jnp.where(fresh, plan.hit, req.computed),
        attached=jnp.where(fresh, plan.hit_row, req.attached),
        hit_tokens=req.hit_tokens + plan.hit,
    )
    lookups = jnp.sum(jnp.where(fresh, req.target, 0))

    # Segments: evictions, then touch those in use (LRU clock).
    touched = (segment_refs(req, G) > 0) & live
    seg = seg.replace(
        on_gpu=seg.on_gpu & ~plan.evict,
        pinned_until=jnp.where(plan.evict, 0.0, seg.pinned_until),
        last_access=jnp.where(touched, state.clock, seg.last_access),
    )

    # The iteration's duration (or, with nothing to compute, a jump to the next event).
    tok = plan.tokens
    prefilling = req.computed < req.target
    decode = (tok > 0) & ~prefilling
    num_tokens = jnp.sum(tok)
    ctx = jnp.sum(jnp.where(decode, req.computed, 0))
    pairs = jnp.sum(
        jnp.where((tok > 0) & prefilling, latency.prefill_pairs(tok, req.computed), 0.0)
    )
    busy = num_tokens > 0
    in_flight = (req.status == OFFLOADING) | (req.status == LOADING)
    t_event = jnp.minimum(
        state.next_arrival,
        jnp.min(jnp.where(in_flight, req.xfer_done, NEVER)),
    )
    if cfg.agentic:
        t_event = jnp.minimum(t_event, jnp.min(jnp.where(req.status == TOOL, req.arrival, NEVER)))
    deadline = jnp.min(
        jnp.where(
            (req.status == WAITING) & (req.first_token < 0),
            req.arrival + params.client_timeout,
            NEVER,
        )
    )
    pins = jnp.min(
        jnp.where(
            seg.valid & seg.on_gpu & (seg.pinned_until > state.clock), seg.pinned_until, NEVER
        )
    )
    t_event = jnp.minimum(jnp.minimum(t_event, deadline), pins)
    t_event = jnp.minimum(t_event, params.horizon)
    idle = jnp.maximum(t_event - state.clock, params.t_cpu)
    dt = jnp.where(busy, latency.iteration_time(params, num_tokens, ctx, pairs), idle)
    dt = jnp.where(live, dt, 0.0)
    clock = state.clock + dt

    # Progress: prefill chunks advance `computed`; a finished prefill or a decode emits a token.
    emits = (tok > 0) & (req.computed + tok >= req.target)
    computed = req.computed + tok
    generated = req.generated + emits
    first = emits & (req.first_token < 0)
    req = req.replace(
        computed=computed,
        generated=generated,
        first_token=jnp.where(first, clock, req.first_token),
        last_token=jnp.where(emits, clock, req.last_token),
    )
    req, seg = insert_segments(req, seg, clock, cfg, live)

    # Completions: record TTFT / TPOT, score against the SLOs, free the row.
    done = (req.status == RUNNING) & (req.generated >= req.output_len) & live
    ttft = req.first_token - req.arrival
    tpot = metrics.time_per_output_token(req.first_token, req.last_token, req.generated)
    good = done & metrics.meets_slo(ttft, tpot, params)
    slot = m.log_count + ops.row_prefix_sum(done.astype(jnp.int32))
    pos = jnp.where(done, slot % R, R)
    n_done = jnp.sum(done).astype(jnp.int32)
    avg = lambda x: jnp.sum(jnp.where(done, x, 0.0)) / jnp.maximum(n_done, 1)  # noqa: E731
    blend = jnp.where(n_done > 0, 0.2, 0.0)
    req = req.replace(status=jnp.where(done, EMPTY, req.status))
    m = m.replace(
        finished=m.finished + n_done,
        good=m.good + jnp.sum(good).astype(jnp.int32),
        preemptions=m.preemptions + n_pre,
        output_tokens=m.output_tokens + jnp.sum(emits).astype(jnp.int32),
        prompt_tokens=m.prompt_tokens + lookups,
        hit_tokens=m.hit_tokens + jnp.sum(plan.hit),
        recomputed_tokens=m.recomputed_tokens + jnp.sum(lost),
        prefill_tokens=m.prefill_tokens + jnp.sum(jnp.where(prefilling, tok, 0)),
        ttft_sum=m.ttft_sum + jnp.sum(jnp.where(done, ttft, 0.0)),
        tpot_sum=m.tpot_sum + jnp.sum(jnp.where(done, tpot, 0.0)),
        e2e_sum=m.e2e_sum + jnp.sum(jnp.where(done, req.last_token - req.arrival, 0.0)),
        log_ttft=m.log_ttft.at[pos].set(ttft, mode="drop"),
        log_tpot=m.log_tpot.at[pos].set(tpot, mode="drop"),
        log_count=m.log_count + n_done,
    )
    if cfg.agentic:
        req = next_calls(req, done, state.seed, clock, params, cfg)
    ratio = jnp.where(
        plan.retracted,
        params.sglang_ratio_init,
        jnp.maximum(state.new_token_ratio - params.sglang_ratio_decay, params.sglang_ratio_min),
    )
    ratio = jnp.where(live, ratio, state.new_token_ratio)
    return state.replace(
        requests=req,
        segments=seg,
        metrics=m,
        clock=clock,
        run_counter=state.run_counter + n_adm,
        preempt_counter=pc,
        new_token_ratio=ratio,
        link_free=state.link_free.at[1].set(link_in),
        last_iter_time=jnp.where(busy, dt, state.last_iter_time),
        recent_ttft=(1 - blend) * state.recent_ttft + blend * avg(ttft),
        recent_tpot=(1 - blend) * state.recent_tpot + blend * avg(tpot),
        iterations=state.iterations + jnp.asarray(live, jnp.int32),
    )
