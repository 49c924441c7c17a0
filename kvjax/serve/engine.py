"""One engine iteration of kv-serve-v0, as a flat list of named phases (docs/serving.md section 3).

    iterate(state) = arrivals -> transfers -> timeouts -> schedule -> execute

`schedule` decides, without changing the state, which running requests get tokens, which are
preempted, which waiting requests are admitted and which cached segments are evicted; `execute`
applies that plan, advances the clock by the iteration-latency model and records first tokens
and completions. Every rule reads the request table in an order (running order, waiting order,
LRU order) through the pairwise order matrices of serve/ops.py; no Python loop runs over
requests, and the code is the same for one scenario and under vmap.

Memory and segment rules, in one place (the helpers below; docs/serving.md section 1):
- `attached_tokens`: the prompt tokens a request's attached segment holds for it;
- `private_blocks`: the blocks a request holds itself (its computed tokens beyond its attached
  segment's), on the GPU while RUNNING, OFFLOADING or LOADING;
- segments form a tree of rows: a resident segment holds its own tokens beyond its parent's
  (`segment_blocks`); it is referenced while an attached request is on the GPU, and
  `evictable` when it is a leaf, unreferenced and not pinned;
- free = pool - private - cached, never negative.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from kvjax.serve import latency, metrics, ops, workload
from kvjax.serve.types import (
    BLOCK_TOKENS,
    EMPTY,
    ENGINES,
    LOADING,
    OFFLOADING,
    RUNNING,
    SGLANG,
    SWAPPED,
    TOOL,
    TRT,
    WAITING,
    Metrics,
    RequestTable,
    SegmentTable,
    ServeConfig,
    ServeParams,
    ServeState,
)

# A time no event reaches (float32 seconds).
NEVER = 3.0e38


def ceil_blocks(tokens: chex.Array) -> chex.Array:
    """Blocks needed for `tokens` tokens."""
    return (jnp.maximum(tokens, 0) + BLOCK_TOKENS - 1) // BLOCK_TOKENS


def pool_blocks(params: ServeParams) -> chex.Array:
    """GPU KV pool in blocks of the scenario's KV dtype (fp8 holds twice the tokens)."""
    return jnp.asarray(params.gpu_pool_tokens, jnp.int32) * (1 + params.kv_dtype) // BLOCK_TOKENS


def cpu_pool_blocks(params: ServeParams) -> chex.Array:
    return jnp.asarray(params.cpu_pool_tokens, jnp.int32) * (1 + params.kv_dtype) // BLOCK_TOKENS


def engine_is(params: ServeParams, cfg: ServeConfig, engine: int):
    """Whether the scenario's engine is `engine`: a Python bool when the config names its
    engine (the other engines' rules are then not traced at all), else a traced bool."""
    if cfg.engine is None:
        return params.engine == engine
    return cfg.engine == ENGINES[engine]


def on_gpu(req: RequestTable) -> chex.Array:
    """Rows whose KV occupies GPU blocks."""
    return (req.status == RUNNING) | (req.status == OFFLOADING) | (req.status == LOADING)


def row_gather(values: chex.Array, rows: chex.Array, fill=0) -> chex.Array:
    """values[rows] for rows >= 0, `fill` for -1 (a gather from a small segment-table column)."""
    return jnp.where(rows >= 0, values[jnp.clip(rows, 0, values.shape[-1] - 1)], fill)


def attached_tokens(req: RequestTable, seg: SegmentTable) -> chex.Array:
    """int32 [S]: prompt tokens held for each request by the segment it is attached to."""
    return row_gather(seg.tokens, req.attached)


def private_blocks(req: RequestTable, seg: SegmentTable) -> chex.Array:
    """GPU blocks each request holds itself (0 off the GPU)."""
    own = jnp.maximum(req.computed - attached_tokens(req, seg), 0)
    return jnp.where(on_gpu(req), ceil_blocks(own), 0)


def segment_refs(req: RequestTable, num_segments: int) -> chex.Array:
    """int32 [G]: attached requests holding GPU blocks per segment."""
    # (materialized: the [S] operands are computed once, not per [S, G] element; ops.py)
    attached, gpu = ops.materialize(req.attached), ops.materialize(on_gpu(req))
    onehot = attached[:, None] == jnp.arange(num_segments)[None, :]
    return jnp.sum(onehot & gpu[:, None], axis=0).astype(jnp.int32)


def resident(seg: SegmentTable) -> chex.Array:
    return seg.valid & seg.on_gpu


def segment_blocks(seg: SegmentTable) -> chex.Array:
    """int32 [G]: blocks a resident segment holds of its own (its tokens beyond its parent's)."""
    own = seg.tokens - row_gather(seg.tokens, seg.parent)
    return jnp.where(resident(seg), own // BLOCK_TOKENS, 0)


def is_leaf(seg: SegmentTable) -> chex.Array:
    """Resident segments no resident segment extends."""
    G = seg.valid.shape[-1]
    child = resident(seg)[None, :] & (seg.parent[None, :] == jnp.arange(G)[:, None])
    return resident(seg) & ~jnp.any(child, axis=1)


def evictable(seg: SegmentTable, refs: chex.Array, clock: chex.Array) -> chex.Array:
    """Segments the engine may evict: leaves, unreferenced and not pinned."""
    return is_leaf(seg) & (refs == 0) & (seg.pinned_until <= clock)


def key_rows(keys: chex.Array, seg: SegmentTable) -> tuple[chex.Array, chex.Array]:
    """For each key ([S], -1 none): whether a valid row holds it, and that row (-1 if not)."""
    G = seg.valid.shape[-1]
    keys = ops.materialize(keys)
    match = (keys[:, None] == seg.key[None, :]) & seg.valid[None, :] & (keys >= 0)[:, None]
    found = jnp.any(match, axis=1)
    row = jnp.sum(jnp.where(match, jnp.arange(G)[None, :], 0), axis=1)
    return found, jnp.where(found, row, -1)


def memory(state: ServeState, params: ServeParams) -> dict[str, chex.Array]:
    """Block accounting: pool, used (private), cached (segments), free, cpu_used, cpu_pool."""
    used = jnp.sum(private_blocks(state.requests, state.segments))
    cached = jnp.sum(segment_blocks(state.segments))
    pool = pool_blocks(params)
    cpu_used = jnp.sum(jnp.where(state.requests.status != EMPTY, state.requests.cpu_blocks, 0))
    return dict(
        pool=pool,
        used=used,
        cached=cached,
        free=pool - used - cached,
        cpu_used=cpu_used,
        cpu_pool=cpu_pool_blocks(params),
    )


# -- request transitions (each written once; docs/serving.md section 3) --------------------------
def fresh_request(cfg: ServeConfig, prompt: chex.Array | int, queue_key: chex.Array | int = 0):
    """The progress fields of a row a new request is placed in (an arrival, an agentic
    session's next call): nothing attached, computed or generated, no token yet, the default
    retention priority, no preemption, hit or transfer; `target` its prompt, `queue_key` its
    place in the queue. A dict of field -> value (scalars or [S] arrays)."""
    return dict(
        attached=-1,
        computed=0,
        target=prompt,
        generated=0,
        queue_key=queue_key,
        run_key=0,
        priority=cfg.default_priority,
        first_token=-1.0,
        last_token=-1.0,
        preemptions=0,
        recomputed=0,
        hit_tokens=0,
        xfer_done=0.0,
        cpu_blocks=0,
    )


def set_rows(req: RequestTable, rows: chex.Array, fields: dict) -> RequestTable:
    """`req` with `fields` (field -> value) written on `rows` only."""
    return req.replace(**{k: jnp.where(rows, v, getattr(req, k)) for k, v in fields.items()})


def recompute_preempt(
    req: RequestTable, seg: SegmentTable, rows: chex.Array, queue_key: chex.Array | int
) -> tuple[RequestTable, chex.Array]:
    """Preemption by recompute (the engine's, and the agent's preempt command): `rows` free
    their private blocks, keep no computed KV and no segment, and wait at `queue_key`
    (negative: ahead of every arrival) to prefill their prompt and generated tokens again.
    Returns the table and int32 [S] the tokens each row must recompute (0 off `rows`)."""
    lost = jnp.where(rows, jnp.maximum(req.computed - attached_tokens(req, seg), 0), 0)
    req = req.replace(
        status=jnp.where(rows, WAITING, req.status),
        queue_key=jnp.where(rows, queue_key, req.queue_key),
        computed=jnp.where(rows, 0, req.computed),
        target=jnp.where(rows, req.prompt + req.generated, req.target),
        attached=jnp.where(rows, -1, req.attached),
        preemptions=req.preemptions + rows,
        recomputed=req.recomputed + lost,
    )
    return req, lost


# -- phase 1: arrivals -------------------------------------------------------------------------
def arrivals(
    state: ServeState, params: ServeParams, cfg: ServeConfig, live: chex.Array = True
) -> ServeState:
    """Move up to K arrived requests (arrival <= clock) from the stream into empty rows, in
    stream order. When no row is free they wait behind the pointer, their arrival time kept,
    so their waiting counts in TTFT and the client timeout."""
    req = state.requests
    K = cfg.max_arrivals_per_iter
    nxt = state.next_index
    # Agentic sessions' next calls whose tool has returned enter the queue first.
    woken = (req.status == TOOL) & (req.arrival <= state.clock) & live
    req = req.replace(
        status=jnp.where(woken, WAITING, req.status),
        queue_key=jnp.where(woken, nxt, req.queue_key),
    )
    n_woken = jnp.sum(woken).astype(jnp.int32)
    # The next K + 1 requests of the stream (one draw each, vectorised) and their arrival times
    # as the same float32 running sum the stream defines.
    d = workload.draw_request(state.seed, state.stream_start + nxt + jnp.arange(K + 1), params, cfg)
    times = [state.next_arrival]
    for k in range(1, K + 1):
        times.append(times[-1] + d["gap"][k])
    t = jnp.stack(times)  # t[k]: arrival of request nxt + k
    empty = req.status == EMPTY
    # Candidate k enters the k-th empty row (row order) if it has arrived; arrival times
    # increase, so the entering candidates are a prefix 0..n-1.
    n = jnp.sum((t[:K] <= state.clock) & (jnp.arange(K) < jnp.sum(empty)) & live)
    slot = ops.row_prefix_sum(empty.astype(jnp.int32))  # empty rows before each row
    put = empty & (slot < n)
    pick = lambda x: sum(jnp.where(slot == k, x[k], 0) for k in range(K))  # noqa: E731
    prompt = pick(d["prompt"])
    index = nxt + slot
    req = set_rows(
        req,
        put,
        dict(
            status=WAITING,
            index=index,
            turn=0,
            arrival=pick(t),
            prompt=prompt,
            output_len=pick(d["output_len"]),
            max_tokens=pick(d["max_tokens"]),
            segment=pick(d["segment"]),
            segment_up=pick(d["segment_up"]),
            prefix_len=pick(d["prefix_len"]),
            publish=pick(d["publish"]),
            publish_len=pick(d["publish_len"]),
            **fresh_request(cfg, prompt, queue_key=index),
        ),
    )
    nxt = nxt + n.astype(jnp.int32)
    t_next = jnp.sum(jnp.where(jnp.arange(K + 1) == n, t, 0.0))
    arrived = state.metrics.arrived + (nxt - state.next_index) + n_woken
    return state.replace(
        requests=req,
        next_index=nxt,
        next_arrival=t_next,
        metrics=state.metrics.replace(arrived=arrived),
    )


# -- phase 2: transfers ------------------------------------------------------------------------
def transfers(state: ServeState, live: chex.Array = True) -> ServeState:
    """Finish CPU transfers whose time has come: an offload frees its GPU blocks (the request
    waits, swapped, at the head of the queue); a load frees its CPU blocks and resumes it."""
    req = state.requests
    done = (req.xfer_done <= state.clock) & live
    off = (req.status == OFFLOADING) & done
    load = (req.status == LOADING) & done
    req = req.replace(
        status=jnp.where(off, SWAPPED, jnp.where(load, RUNNING, req.status)),
        attached=jnp.where(off, -1, req.attached),
        cpu_blocks=jnp.where(load, 0, req.cpu_blocks),
    )
    return state.replace(requests=req)


# -- phase 3: client timeouts ------------------------------------------------------------------
def timeouts(state: ServeState, params: ServeParams, live: chex.Array = True) -> ServeState:
    """Drop waiting requests that have produced no token within the client timeout (the only
    way a request leaves unserved; counted)."""
    req = state.requests
    drop = (
        (req.status == WAITING)
        & (req.first_token < 0)
        & (state.clock - req.arrival > params.client_timeout)
        & live
    )
    req = req.replace(status=jnp.where(drop, EMPTY, req.status))
    m = state.metrics
    return state.replace(
        requests=req, metrics=m.replace(timed_out=m.timed_out + jnp.sum(drop).astype(jnp.int32))
    )


# -- phase 4: schedule -------------------------------------------------------------------------
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


def running_order_keys(req: RequestTable, params: ServeParams, cfg: ServeConfig):
    """Keys of the running order (first = scheduled first, last = first victim): retention
    priority (higher first), then the engine's rule - vLLM and TRT: order of admission (the
    last scheduled is preempted first); SGLang: most decoded first (fewest decoded retracted
    first, ties: longest prompt)."""
    sgl = engine_is(params, cfg, SGLANG)
    # Priority and (SGLang) decoded tokens packed in one key: each key costs an [S, S] compare.
    fewest = 0xFFFF - jnp.minimum(req.generated, 0xFFFF)
    retention = ((cfg.priority_levels - 1) - req.priority) * 0x10000
    if sgl is False:  # a static vLLM or TRT engine: no SGLang keys to compare
        return (retention, req.run_key)
    return (retention + jnp.where(sgl, fewest, 0), jnp.where(sgl, req.prompt, 0), req.run_key)


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
    if is_trt is not True:  # preempting every later request frees its blocks
        held_run = jnp.sum(jnp.where(running, held, 0))
        room = available + jnp.where(can_preempt, held_run - held_before - held, 0)
    if is_sgl is not False:
        # SGLang retracts until every kept request has retract_tokens free for its next decodes;
        # and keeps new_token_ratio x (the remaining output, capped) free for every request.
        future = jnp.minimum(
            jnp.maximum(req.max_tokens - req.generated, 0), params.sglang_reserve_cap
        )
        kept_before, w_reserve_before = sums(1, future)
        shortage = jnp.sum(demand) > available
        sgl_headroom = jnp.where(
            is_sgl & shortage, ceil_blocks((kept_before + 1) * params.sglang_retract_tokens), 0
        )
        demand_incl = demand_incl + sgl_headroom
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
    if is_trt is not False:
        # TRT (GUARANTEED_NO_EVICT): every request holds a reservation for prompt + max_tokens.
        full = ceil_blocks(req.prompt + req.max_tokens - jnp.where(hit > 0, hit_tokens, 0))
        reserved_running = jnp.sum(
            jnp.where(on_gpu(req), ceil_blocks(req.prompt + req.max_tokens - attached), 0)
        )
        pinned_or_used = jnp.sum(jnp.where(~evict_ok, seg_blocks, 0))
        _, full_before = sums(0, full)
        trt_ok = reserved_running + full_before + full <= pool - pinned_or_used
        guard = jnp.where(is_trt, trt_ok, guard)
    if is_sgl is not False:
        ratio = state.new_token_ratio
        run_reserve = jnp.sum(jnp.where(running | (req.status == LOADING), future, 0))
        w_reserve = w_reserve_before + future
        sgl_reserve = ceil_blocks(jnp.ceil(ratio * (run_reserve + w_reserve)).astype(jnp.int32))
        guard = jnp.where(is_sgl, cum_blocks + sgl_reserve <= adm_available, guard)
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


def next_calls(
    req: RequestTable,
    done: chex.Array,
    seed: chex.Array,
    clock: chex.Array,
    params: ServeParams,
    cfg: ServeConfig,
) -> RequestTable:
    """Agentic sessions (docs/serving.md section 7): a completed call whose session has calls
    left, and whose next prompt fits, keeps its row as the next call - in TOOL until its tool
    returns - reading this call's history and publishing its own."""
    session = workload.draw_session(seed, req.index, params, cfg)
    this = workload.draw_call(seed, req.index, req.turn, params, cfg)
    turn = req.turn + 1
    following = workload.draw_call(seed, req.index, turn, params, cfg)
    prompt = req.prompt + req.generated + this["new_tokens"]
    cap = jnp.asarray(params.max_model_len, jnp.int32) - jnp.asarray(params.max_tokens, jnp.int32)
    go = done & (turn < session["turns"]) & (prompt <= cap)
    out = following["output_len"]
    return set_rows(
        req,
        go,
        dict(
            status=TOOL,
            turn=turn,
            arrival=clock + this["tool_gap"],
            prompt=prompt,
            output_len=out,
            segment=workload.history_key(req.index, req.turn, cfg),
            segment_up=session["segment"],  # the system prompt (-1: none)
            prefix_len=req.publish_len,
            publish=workload.history_key(req.index, turn, cfg),
            publish_len=workload.block_floor(prompt + out - 1),
            **fresh_request(cfg, prompt),
        ),
    )


# -- phase 5: execute --------------------------------------------------------------------------
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
