"""The schedule phase of a kv-serve-v0 engine iteration: the iteration's decisions as a `Plan`,
without changing the state (docs/serving.md section 3)."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax.numpy as jnp

from kvjax.serve import ops
from kvjax.serve.engine.blocks import (
    attached_tokens,
    ceil_blocks,
    evictable,
    key_rows,
    memory,
    private_blocks,
    resident,
    row_gather,
    segment_blocks,
    segment_refs,
)
from kvjax.serve.engine.rules import (
    engine_is,
    may_apply,
    preemption_room,
    running_order_keys,
    sglang_admission_ok,
    sglang_future,
    sglang_retract_headroom,
    surely,
    trt_admission_ok,
    trt_reservation,
)
from kvjax.serve.types import (
    LOADING,
    RUNNING,
    SGLANG,
    SWAPPED,
    TRT,
    WAITING,
    ServeConfig,
    ServeParams,
    ServeState,
)


class Plan(NamedTuple):
    """The iteration's decisions; the `_pos` and `load_before` fields are meaningful only on
    the rows they describe (victims, admissions, admitted loads)."""

    tokens: chex.Array  # int32 [S] tokens computed this iteration (running and admitted)
    preempt: chex.Array  # bool [S] running requests preempted (recompute)
    preempt_pos: chex.Array  # int32 [S] a victim's place among this iteration's victims
    admit: chex.Array  # bool [S] waiting or swapped requests admitted
    admit_pos: chex.Array  # int32 [S] an admitted request's place among the admissions
    hit: chex.Array  # int32 [S] prefix tokens an admitted request finds cached
    hit_row: chex.Array  # int32 [S] the segment row it hits (-1 none)
    load_before: chex.Array  # int32 [S] an admitted load's CPU blocks ahead on the link
    evict: chex.Array  # bool [G] cached segments evicted
    retracted: chex.Array  # bool, a preemption happened


def queue_prefix_sums(
    order: ops.Order,
    running: chex.Array,
    waiting: chex.Array,
    run_value: chex.Array | int,
    wait_value: chex.Array | int,
) -> tuple[chex.Array, chex.Array]:
    """Exclusive prefix sums of a running-only value in the running order and of a
    waiting-only value in the queue order, from one prefix sum in `order` (running rows first,
    then waiting rows): a running row has only running rows before it; a waiting row has every
    running row, whose total is subtracted, then the waiting rows ahead of it. Each sum reads
    the whole [S, S] order, so two for the price of one (the products were the largest share
    of an iteration, docs/serving-benchmarks.md). Only the first result's running rows and the
    second's waiting rows are meaningful."""
    run_value = jnp.where(running, run_value, 0)
    s = order.prefix_sum(run_value + jnp.where(waiting, wait_value, 0))
    return s, s - jnp.sum(run_value)


def schedule(
    state: ServeState, params: ServeParams, cfg: ServeConfig, live: chex.Array = True
) -> Plan:
    """The iteration's decisions (no state change); nothing at all when not `live`."""
    req, seg = state.requests, state.segments
    G = cfg.max_segments
    budget = jnp.asarray(params.max_batched_tokens, jnp.int32)
    mem = memory(state, params)
    refs = segment_refs(req, G)
    evict_ok = evictable(seg, refs, state.clock)
    seg_blocks = segment_blocks(seg)
    evictable_blocks = jnp.sum(jnp.where(evict_ok, seg_blocks, 0))
    available = mem["free"] + evictable_blocks

    # Running requests first, in running order, under the token budget.
    running = req.status == RUNNING
    waiting = (req.status == WAITING) | (req.status == SWAPPED)
    swapped = req.status == SWAPPED
    # The running order and the waiting (queue) order as one order: running rows first, then
    # waiting rows, the rest last - one [S, S] matrix (or one sort) instead of two. Each prefix
    # sum below carries a running-only and a waiting-only value at once (`queue_prefix_sums`).
    run_keys = running_order_keys(req, params, cfg)
    wait_keys = (req.queue_key,) + (0,) * (len(run_keys) - 1)
    keys = [jnp.where(running, r, w) for r, w in zip(run_keys, wait_keys, strict=True)]
    order = ops.order((jnp.where(running, 0, 1), *keys), running | waiting)
    sums = lambda run_value, wait_value: queue_prefix_sums(  # noqa: E731
        order, running, waiting, run_value, wait_value
    )

    # The prefix hit a waiting request would find: the resident row keyed `segment`, else the
    # one keyed `segment_up`.
    _, row_read = key_rows(req.segment, seg)
    _, row_up = key_rows(req.segment_up, seg)
    res = resident(seg)
    hit_row = jnp.where(
        row_gather(res, row_read, False),
        row_read,
        jnp.where(row_gather(res, row_up, False), row_up, -1),
    )
    hit_row = jnp.where(waiting & ~swapped, hit_row, -1)
    hit_tokens = row_gather(seg.tokens, hit_row)
    hit = jnp.where(hit_row >= 0, jnp.minimum(hit_tokens, req.target - 1), 0)
    hit_row = jnp.where(hit > 0, hit_row, -1)
    w_need = jnp.where(waiting & ~swapped, req.target - hit, 0)

    # Tokens: the running order's, then the queue's, under one budget (needs clipped to the
    # budget: the same decisions, and the float prefix sums stay exact).
    need = jnp.where(running, jnp.maximum(req.target - req.computed, 1), 0)
    run_ahead, w_ahead = sums(jnp.minimum(need, budget), jnp.minimum(w_need, budget))
    run_tok = jnp.where(running, jnp.clip(budget - run_ahead, 0, need), 0)
    attached = attached_tokens(req, seg)
    own = jnp.maximum(req.computed - attached, 0)
    demand = jnp.where(running, ceil_blocks(own + run_tok) - ceil_blocks(own), 0)
    held = private_blocks(req, seg)
    # Keep the longest prefix of the running order whose demand fits in what is available
    # plus what preempting every later request frees (victims are taken from the tail).
    # (With the demand: a queued swapped request's place on the CPU link - the swapped CPU
    # blocks ahead of it - which is what its load waits behind if it is admitted.)
    is_trt, is_sgl = engine_is(params, cfg, TRT), engine_is(params, cfg, SGLANG)
    can_preempt = ~jnp.asarray(is_trt)
    demand_before, load_before = sums(demand, jnp.where(swapped, req.cpu_blocks, 0))
    demand_incl = demand_before + demand
    held_before, n_prior = sums(held, 1)  # (n_prior: waiting requests ahead in the queue)
    room = available
    if not surely(is_trt):  # preempting every later request frees its blocks
        room = preemption_room(available, running, held, held_before, can_preempt)
    if may_apply(is_sgl):
        # SGLang retracts until every kept request has retract_tokens free for its next decodes;
        # and keeps new_token_ratio x (the remaining output, capped) free for every request.
        future = sglang_future(req, params)
        kept_before, w_reserve_before = sums(1, future)
        shortage = jnp.sum(demand) > available
        demand_incl = demand_incl + sglang_retract_headroom(kept_before, is_sgl & shortage, params)
    fits = demand_incl <= room
    kept = running & fits
    preempt = running & ~fits & can_preempt
    run_tok = jnp.where(kept, run_tok, 0)  # TRT: a request that does not fit just waits
    retracted = jnp.any(preempt)

    # Waiting requests, in queue order, only in an iteration that preempted nothing.
    # Segments some waiting request will hit are not counted as evictable for admission.
    hit_row = ops.materialize(hit_row)
    hit_onehot = hit_row[:, None] == jnp.arange(G)[None, :]
    wanted = jnp.any(hit_onehot, axis=0)
    kept_demand = jnp.sum(jnp.where(kept, demand, 0))
    freed = jnp.sum(jnp.where(preempt, held, 0))
    adm_available = (
        mem["free"] + jnp.sum(jnp.where(evict_ok & ~wanted, seg_blocks, 0)) - kept_demand
    )
    used_tokens = jnp.sum(run_tok)
    w_tok = jnp.clip(budget - used_tokens - w_ahead, 0, w_need)
    w_blocks = jnp.where(swapped, req.cpu_blocks, ceil_blocks(w_tok))
    preempt_pos, blocks_before = sums(preempt.astype(jnp.int32), w_blocks)
    cum_blocks = blocks_before + w_blocks
    n_running = jnp.sum(running | (req.status == LOADING))
    partial_running = jnp.sum(kept & (req.computed + run_tok < req.target))
    partial_new = waiting & ~swapped & (w_tok < w_need)
    partial_ok = ~partial_new | (partial_running + 1 <= params.max_partial_prefills)
    # Engine-specific admission guards.
    pool = mem["pool"]
    reserve = jnp.asarray(cfg.reserve_levels, jnp.float32)[state.reserve_level]
    agent_reserve = jnp.ceil(reserve * pool.astype(jnp.float32)).astype(jnp.int32)
    guard = True
    if may_apply(is_trt):
        # TRT (GUARANTEED_NO_EVICT): every request holds a reservation for prompt + max_tokens.
        full = trt_reservation(req, hit, hit_tokens)
        pinned_or_used = jnp.sum(jnp.where(~evict_ok, seg_blocks, 0))
        _, full_before = sums(0, full)
        trt_ok = trt_admission_ok(req, attached, full, full_before, pool, pinned_or_used)
        guard = jnp.where(is_trt, trt_ok, guard)
    if may_apply(is_sgl):
        sgl_ok = sglang_admission_ok(
            state.new_token_ratio, req, future, w_reserve_before, cum_blocks, adm_available
        )
        guard = jnp.where(is_sgl, sgl_ok, guard)
    ok = (
        waiting
        & (swapped | (w_tok > 0))
        & (n_running + n_prior + 1 <= params.max_num_seqs)
        & (cum_blocks + agent_reserve <= adm_available)
        & partial_ok
        & guard
        & ~retracted
    )
    # The queue is admitted up to its first request that is not: the admitted requests are a
    # prefix of it, so an admitted request's place among them is its place in the queue, and
    # the swapped blocks ahead of it are all being loaded.
    admit = ops.materialize(waiting & ~order.any_before(waiting & ~ok) & ok)
    admit_pos = n_prior
    tokens = run_tok + jnp.where(admit & ~swapped, w_tok, 0)
    hit = jnp.where(admit, hit, 0)
    hit_row = jnp.where(admit, hit_row, -1)

    # Evict cached segments, lowest retention priority first, then least recently used, until
    # the blocks this iteration allocates are covered.
    alloc = kept_demand + jnp.sum(jnp.where(admit, w_blocks, 0))
    shortfall = alloc - (mem["free"] + freed)
    keep_seg = evict_ok & ~jnp.any(hit_onehot & admit[:, None], axis=0)
    before_seg = ops.order((seg.priority, seg.last_access), keep_seg)
    evict = keep_seg & (before_seg.prefix_sum(seg_blocks) < shortfall)
    return Plan(
        jnp.where(live, tokens, 0),
        preempt & live,
        preempt_pos,
        admit & live,
        admit_pos,
        jnp.where(live, hit, 0),
        jnp.where(live, hit_row, -1),
        load_before,
        evict & live,
        retracted & live,
    )
