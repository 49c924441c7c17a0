"""The transition: one branch-free step of the cache, in the fixed order of docs/dynamics.md.

1. actions (in order)  2. schedule: swap-in, then admit  3. decode and tool calls
4. complete  5. engine preemption  6. queue timeouts  7. arrivals  8. signals and counters

Memory is in fp16-token equivalents (exact in float32); `B` is the scenario's budget in those
units. Everything is masks and `jnp.where` over fixed-size arrays, so it jits, vmaps and never
retraces. A slot that becomes empty only gets `active=False` and `seq_id=-1`; its other fields
are stale and every rule masks them out (`clear_empty` canonicalises rows for comparisons).

Batch-polymorphic: every function also accepts a state whose arrays carry trailing batch axes
(slots [S, *batch], queue [P, *batch], arrivals [T, K, *batch], scalars [*batch], action
[A, *batch]). Reductions run over axis 0 and per-scenario scalars broadcast from the right, so the
same code serves `vmap` (batch leading, one scenario per call) and the rollout engine's
batch-trailing layout, which XLA vectorises several times better on CPU (kvjax.rollout). The
operations whose fastest form depends on the layout (prefix sums, row gathers, integer sums,
materialised values) are in `kvjax.cache.layout`, each with a plain-jnp form tested equal.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.layout import (
    gather_rows,
    lead,
    once,
    prefix_sum,
    schedule_row,
    slot_any,
    slot_sum,
    slot_sums,
)
from kvjax.cache.scenarios import arrival_row, budget_tokens, has_schedule
from kvjax.cache.types import (
    COMPRESS,
    CONTEXT,
    CPU,
    EVICT,
    GPU,
    SWAP,
    SYSTEM,
    EnvConfig,
    EnvParams,
    EnvState,
    Requests,
    Slots,
    eviction_value_of,
    memory_factor,
)

# Fraction of a token's value kept at each precision, by block type (rows) and tier (columns).
# int8 is near lossless; int4 costs little on short outputs and a lot on long reasoning
# (LMDeploy; SGLang FP4 table). The system prompt's quality scales every sequence's tokens.
QUALITY = np.array(
    [
        [1.0, 0.98, 0.85],  # system
        [1.0, 0.98, 0.85],  # context
        [1.0, 0.99, 0.90],  # generation
        [1.0, 0.95, 0.50],  # reasoning
        [1.0, 0.99, 0.92],  # ephemeral
    ],
    np.float32,
)
RISKY_PRIORITY = 70  # evicting a sequence at or above this priority is risky
RISKY_PROGRESS = 0.7  # ... or one this far through its output
HEADROOM_LEVELS = (0.8, 0.95, 1.0)  # peak usage thresholds for the headroom score
HEADROOM_SCORES = (1.0, 0.5, 0.0, -0.5)  # below 0.8 / below 0.95 / at most 1.0 / above


def quality_of(block_type: chex.Array, precision: chex.Array) -> chex.Array:
    """QUALITY[block_type, precision] as selects (a 2-D gather is slow under vmap on CPU)."""
    q = jnp.ones(block_type.shape, jnp.float32)
    for b in range(QUALITY.shape[0]):
        row = jnp.where(
            precision == 1, QUALITY[b, 1], jnp.where(precision == 2, QUALITY[b, 2], 1.0)
        )
        q = jnp.where(block_type == b, row, q)
    return q


def slot_memory(slots: Slots) -> chex.Array:
    """KV of each slot in fp16-token equivalents (float32 [S]); 0 for empty slots."""
    return jnp.where(slots.active, slots.tokens * memory_factor(slots.precision), 0.0)


def progress(slots: Slots) -> chex.Array:
    """Fraction of its output a sequence has generated (0 for system blocks)."""
    done = (slots.output_len - slots.remaining).astype(jnp.float32)
    return jnp.where(slots.output_len > 0, done / jnp.maximum(slots.output_len, 1), 0.0)


def transfer_seconds(mem: chex.Array, params: EnvParams) -> chex.Array:
    """Seconds to move `mem` fp16-token equivalents over the swap link."""
    return mem * params.kv_bytes_per_token / params.swap_bandwidth


def action_validity(slots: Slots) -> tuple[chex.Array, chex.Array, chex.Array]:
    """Per-slot validity of evict, compress and swap_to_cpu (bool [S] each)."""
    on_gpu = slots.active & (slots.location == GPU)
    return slots.active, on_gpu & (slots.precision < 2), on_gpu


def apply_actions(
    state: EnvState, action: chex.Array, params: EnvParams, cfg: EnvConfig
) -> EnvState:
    """Phase 1 alone: apply `action` (int32 [n], any n) in order; time does not advance.

    Each action is checked against the slots as left by the earlier ones (a slot is evicted
    or swapped at most once; compress twice goes fp16 -> int4). An action that names nothing
    valid (keep excepted) is a counted no-op. Counters are summed once at the end: every
    per-slot quantity they read (value, type, priority, progress) is unchanged by actions.

    Each action names one slot, so its outcome is decided per scenario: the named slot's
    state is read once (one packed int per action), earlier actions on the same slot are
    applied to it, and only the final effects are written back per slot (instead of running
    the whole action sequence on every slot).
    """
    s, c = state.slots, state.counters
    S = cfg.max_seqs
    slot_ids = lead(jnp.arange(S), s.active)
    on_gpu = s.active & (s.location == GPU)
    risky = (
        (s.block_type == SYSTEM) | (s.priority >= RISKY_PRIORITY) | (progress(s) >= RISKY_PROGRESS)
    )
    high_value = (s.block_type == SYSTEM) | (s.block_type == CONTEXT)
    # Everything an action's outcome and counters read from its slot, in one int per slot.
    code = (s.active.astype(jnp.int32) + 2 * on_gpu + 4 * high_value + 8 * risky
            + 16 * s.precision)
    action = once(action)  # the policy's ids decoded once, not once per slot
    n_acts = jnp.int32(0)
    named, pres, done = [], [], []  # per action: slot, its state, (evicted, compressed, swapped)
    for a in range(action.shape[0]):  # static unroll: later actions see earlier ones
        act = action[a]
        n_acts = n_acts + (act != 0)
        ok = (act >= 1) & (act <= 3 * S)
        kind = jnp.where(ok, (act - 1) // S, -1)  # 0 evict, 1 compress, 2 swap, -1 nothing
        slot = jnp.where(ok, act - 1 - jnp.maximum(kind, 0) * S, 0)
        pre = jnp.take_along_axis(code, slot[None], axis=0, mode="promise_in_bounds")[0]
        active, gpu, prec = (pre & 1) > 0, (pre & 2) > 0, pre >> 4
        for b in range(a):  # earlier actions on the same slot
            same = slot == named[b]
            ev_b, cp_b, sw_b = done[b]
            active = active & ~(same & ev_b)
            gpu = gpu & ~(same & sw_b)
            prec = prec + (same & cp_b)
        ev = (kind == EVICT - 1) & active
        cp = (kind == COMPRESS - 1) & active & gpu & (prec < 2)
        sw = (kind == SWAP - 1) & active & gpu
        named.append(slot)
        pres.append(pre)
        done.append((ev, cp, sw))
    # The slot each successful evict / compress / swap hit (-1: none), per action.
    hit_slots = jnp.stack([jnp.where(x, i, -1) for i, d in zip(named, done, strict=True)
                           for x in d])
    hit_slots = once(hit_slots)  # not re-derived for every slot that reads it
    evicted = jnp.zeros_like(s.active)
    swapped = jnp.zeros_like(s.active)
    compressed = jnp.zeros_like(s.precision)
    n_evict = n_compress = n_swap = n_high = n_risky = jnp.int32(0)
    for a, (pre, (ev, cp, sw)) in enumerate(zip(pres, done, strict=True)):
        evicted = evicted | (slot_ids == hit_slots[3 * a])
        compressed = compressed + (slot_ids == hit_slots[3 * a + 1])
        swapped = swapped | (slot_ids == hit_slots[3 * a + 2])
        n_evict, n_compress, n_swap = n_evict + ev, n_compress + cp, n_swap + sw
        n_high = n_high + (ev & ((pre & 4) > 0))
        n_risky = n_risky + (ev & ((pre & 8) > 0))
    precision = s.precision + compressed
    # A swapped slot cannot be compressed afterwards, so it left at its final precision.
    value_sum, swapped_mem = slot_sums(
        jnp.where(evicted, s.eviction_value, 0.0),
        jnp.where(swapped, s.tokens * memory_factor(precision), 0.0),
    )
    c = c.replace(
        evictions=c.evictions + n_evict,
        eviction_value_sum=c.eviction_value_sum + value_sum,
        high_value_lost=c.high_value_lost + n_high,
        risky_evictions=c.risky_evictions + n_risky,
        compressions=c.compressions + n_compress,
        swaps=c.swaps + n_swap,
        latency=c.latency + transfer_seconds(swapped_mem, params),
        # Each action that did something hit exactly one slot; the rest were no-ops.
        invalid_actions=c.invalid_actions + n_acts - (n_evict + n_compress + n_swap),
    )
    s = s.replace(
        active=s.active & ~evicted,
        precision=precision,
        location=jnp.where(swapped, CPU, s.location),
    )
    return state.replace(slots=s, counters=c)


# Request fields copied into a slot on admission (all int32).
_ADMIT_FIELDS = (
    "seq_id",
    "block_type",
    "tokens",
    "priority",
    "output_len",
    "tool_period",
    "tool_wait_len",
    "tool_tokens",
    "arrival_step",
)


def _schedule(state: EnvState, params: EnvParams, B: chex.Array) -> tuple[EnvState, chex.Array]:
    """Swap ready CPU sequences back in, then admit pending requests FIFO, both only up to the
    admit watermark and in order (the first that does not fit blocks the rest)."""
    s, c, q = state.slots, state.counters, state.pending
    t = state.time
    mem = slot_memory(s)
    room = params.admit_watermark * B - slot_sum(jnp.where(s.location == GPU, mem, 0.0))
    ready = s.active & (s.tool_wait == 0) & (s.remaining > 0)
    cand = ready & (s.location == CPU)
    swap_in = cand & (prefix_sum(jnp.where(cand, mem, 0.0)) <= room)
    swapped = slot_sum(jnp.where(swap_in, mem, 0.0))
    room = room - swapped
    c = c.replace(
        swap_ins=c.swap_ins + slot_sum(swap_in),
        latency=c.latency + transfer_seconds(swapped, params),
    )
    s = s.replace(
        location=jnp.where(swap_in, GPU, s.location),
        last_access=jnp.where(swap_in, t, s.last_access),
    )

    # FIFO admission into free slots (k-th admitted request -> k-th free slot).
    P = q.valid.shape[0]
    free = ~s.active
    fits = q.valid & (prefix_sum(jnp.where(q.valid, q.tokens, 0)) <= room)
    admit = fits & (lead(jnp.arange(P), q.valid) < slot_sum(free))
    n_admit = slot_sum(admit)
    rank = prefix_sum(free).astype(jnp.int32) - 1
    take = free & (rank < n_admit)
    rows = gather_rows({f: getattr(q, f) for f in _ADMIT_FIELDS}, jnp.where(take, rank, -1), P)
    new = {f: jnp.where(take, rows[f], getattr(s, f)) for f in _ADMIT_FIELDS}
    s = s.replace(
        **new,
        active=s.active | take,
        precision=jnp.where(take, 0, s.precision),
        location=jnp.where(take, GPU, s.location),
        eviction_value=jnp.where(
            take, eviction_value_of(new["priority"]), s.eviction_value
        ),
        remaining=jnp.where(take, new["output_len"], s.remaining),
        last_access=jnp.where(take, t, s.last_access),
        tool_countdown=jnp.where(take, new["tool_period"], s.tool_countdown),
        tool_wait=jnp.where(take, 0, s.tool_wait),
    )
    return state.replace(slots=s, counters=c), n_admit


def _decode(state: EnvState, params: EnvParams) -> EnvState:
    """Running GPU sequences generate; tool calls pause and resume agentic sequences; ready
    sequences stuck on the CPU stall (latency); finished sequences complete and free."""
    s, c = state.slots, state.counters
    t = state.time
    ready = s.active & (s.tool_wait == 0) & (s.remaining > 0)
    running = ready & (s.location == GPU)
    stalled = ready & (s.location == CPU)
    gen = jnp.where(running, jnp.minimum(params.decode_tokens_per_step, s.remaining), 0)
    quality = quality_of(s.block_type, s.precision)
    system_quality = jnp.min(
        jnp.where(s.active & (s.block_type == SYSTEM), quality, 1.0), axis=0
    )
    remaining = s.remaining - gen

    # Tool calls: a paused sequence counts its wait down (on GPU or CPU); when the tool
    # returns, its result is appended to the KV. A running agentic sequence calls a tool every
    # `tool_period` decode steps unless it has just finished.
    waiting = s.active & (s.tool_wait > 0)
    tool_wait = s.tool_wait - waiting
    returned = waiting & (tool_wait == 0)
    countdown = s.tool_countdown - (running & (s.tool_period > 0))
    calls = running & (s.tool_period > 0) & (countdown <= 0) & (remaining > 0)
    tool_wait = jnp.where(calls, s.tool_wait_len, tool_wait)
    countdown = jnp.where(calls, s.tool_period, countdown)

    done = running & (remaining == 0)
    weighted, n_gen, n_stalled, n_done = slot_sums(gen * quality, gen, stalled, done)
    c = c.replace(
        tokens=c.tokens + weighted * system_quality,
        raw_tokens=c.raw_tokens + n_gen,
        latency=c.latency + params.step_seconds * n_stalled,
        completed=c.completed + n_done,
    )
    s = s.replace(
        active=s.active & ~done,
        tokens=s.tokens + gen + jnp.where(returned, s.tool_tokens, 0),
        remaining=remaining,
        last_access=jnp.where(running | returned, t, s.last_access),
        tool_wait=tool_wait,
        tool_countdown=countdown,
    )
    return state.replace(slots=s, counters=c)


def _preempt(state: EnvState, B: chex.Array) -> tuple[EnvState, chex.Array]:
    """vLLM-like forced preemption while GPU KV exceeds the budget: victims are GPU residents,
    non-system before system, newest arrival first (ties: higher slot first). Each is a failure.
    Returns the state and the peak usage (before preemption)."""
    s, c = state.slots, state.counters
    S = s.active.shape[0]
    T = state.arrivals.valid.shape[0]
    mem = jnp.where(s.location == GPU, slot_memory(s), 0.0)
    used = slot_sum(mem)
    elig = s.active & (s.location == GPU)
    # Victim order as one key (larger = preempted earlier): non-system first, then newest
    # arrival, then higher slot. Arrival steps are > -4S and < T; float32 is exact below 2^24.
    span = (T + 4 * S) * S
    order = (
        jnp.where(s.block_type == SYSTEM, 0, span)
        + (s.arrival_step + 4 * S) * S
        + lead(jnp.arange(S), s.active)
    ).astype(jnp.float32)

    # Preempt one victim per iteration, in order, while over budget: as many iterations as the
    # most preemptions any scenario needs this step (usually 0-2), instead of an [S, S]
    # pairwise comparison of every slot with every other.
    def over(carry):
        victim, freed, cand = carry
        return (used - freed > B) & slot_any(cand)

    def preempt_one(carry):
        victim, freed, cand = carry
        go = over(carry)
        top = jnp.max(jnp.where(cand, order, -1.0), axis=0)
        hit = cand & (order == top) & go
        return victim | hit, freed + slot_sum(jnp.where(hit, mem, 0.0)), cand & ~hit

    init = (jnp.zeros_like(elig), jnp.zeros_like(used), elig)
    victim, _, _ = jax.lax.while_loop(lambda c: jnp.any(over(c)), preempt_one, init)
    n = slot_sum(victim)
    high_value = (s.block_type == SYSTEM) | (s.block_type == CONTEXT)
    c = c.replace(
        preemptions=c.preemptions + n,
        failures=c.failures + n,
        high_value_lost=c.high_value_lost + slot_sum(victim & high_value),
    )
    return state.replace(slots=s.replace(active=s.active & ~victim), counters=c), used / B


def _advance_queue(
    state: EnvState, n_admit: chex.Array, params: EnvParams, cfg: EnvConfig
) -> EnvState:
    """Drop the admitted prefix and timed-out requests, then append this step's arrivals."""
    q, c, t = state.pending, state.counters, state.time
    P, K, T = cfg.max_pending, cfg.max_arrivals, cfg.episode_len
    pos = lead(jnp.arange(P), q.valid)
    count = slot_sum(q.valid)
    left = q.valid & (pos >= n_admit)
    timeout = left & (t - q.arrival_step >= params.max_wait_steps)
    n_timeout = slot_sum(timeout)  # FIFO: the oldest, so a prefix of what is left
    kept = count - n_admit - n_timeout

    # This step's arrivals (none once t >= T): row t + 1 of the scenario's draws (row 0 was
    # the queue at reset), or row t of a hand-built table.
    if has_schedule(state):
        row = jax.tree_util.tree_map(lambda x: schedule_row(x, t, T), state.arrivals)
    else:
        row = arrival_row(state.seed, t + 1, state.regime, params, cfg)
        row = row.replace(valid=row.valid & (t < T))
        row = jax.tree_util.tree_map(once, row)  # drawn once, not re-fused into every reader
    arriving = row.valid
    n_arrive = slot_sum(arriving)
    accepted = jnp.minimum(n_arrive, P - kept)
    overflow = n_arrive - accepted

    # New queue: the kept requests moved to the front, then the arrivals (a row's valid
    # requests come first), in one gather from the rows of [arrivals; queue] ([K + P]): the
    # arrivals first, so that a batch whose queues are short reads only the first few rows
    # (gather_rows bounds its select by the highest row read).
    valid = pos < kept + accepted
    src = jnp.where(pos < kept, K + pos + n_admit + n_timeout, pos - kept)
    names = [f for f in vars(q) if f != "valid"]
    both = {f: jnp.concatenate([getattr(row, f), getattr(q, f)]) for f in names}
    fields = gather_rows(both, jnp.where(valid, src, -1), P + K)
    fields["seq_id"] = jnp.where(valid, fields["seq_id"], -1)
    q = Requests(valid=valid, **fields)
    c = c.replace(
        queue_timeouts=c.queue_timeouts + n_timeout,
        queue_overflows=c.queue_overflows + overflow,
        failures=c.failures + n_timeout + overflow,
    )
    return state.replace(
        pending=q,
        counters=c,
        pending_queue_growth=(kept + accepted - count).astype(jnp.int32),
    )


def headroom_score(peak_usage: chex.Array) -> chex.Array:
    """1.0 below 0.8, 0.5 below 0.95, 0.0 up to 1.0, -0.5 above (per step)."""
    lo, mid, hi = HEADROOM_LEVELS
    a, b, d, e = HEADROOM_SCORES
    return jnp.where(
        peak_usage < lo, a, jnp.where(peak_usage < mid, b, jnp.where(peak_usage <= hi, d, e))
    )


def clear_empty(slots: Slots) -> Slots:
    """Canonical empty rows: zeros everywhere, seq_id -1. The step itself only resets seq_id:
    every rule masks by `active`, so stale fields of empty rows are inert (and clearing all 17
    fields every step costs ~20% of the step). Use this to compare states field by field."""
    empty = ~slots.active
    cleared = jax.tree_util.tree_map(lambda x: jnp.where(empty, jnp.zeros((), x.dtype), x), slots)
    return cleared.replace(active=slots.active, seq_id=jnp.where(empty, -1, slots.seq_id))


def advance(state: EnvState, params: EnvParams, cfg: EnvConfig) -> EnvState:
    """Phases 2-8: the engine's part of a step, after the agent has acted."""
    B = budget_tokens(state, params)
    state, n_admit = _schedule(state, params, B)
    state = _decode(state, params)
    state, peak = _preempt(state, B)
    state = _advance_queue(state, n_admit, params, cfg)
    c = state.counters.replace(headroom=state.counters.headroom + headroom_score(peak))
    return state.replace(
        slots=state.slots.replace(seq_id=jnp.where(state.slots.active, state.slots.seq_id, -1)),
        counters=c,
        time=state.time + 1,
        usage_peak=peak.astype(jnp.float32),
        time_above_0_95=state.time_above_0_95 + (peak > 0.95),
    )


def step_dynamics(
    state: EnvState, action: chex.Array, params: EnvParams, cfg: EnvConfig
) -> EnvState:
    """One full step without auto-reset. `action` is int32 [max_actions]."""
    return advance(apply_actions(state, action, params, cfg), params, cfg)


__all__ = [
    "QUALITY",
    "action_validity",
    "advance",
    "apply_actions",
    "clear_empty",
    "gather_rows",
    "headroom_score",
    "lead",
    "prefix_sum",
    "progress",
    "quality_of",
    "slot_any",
    "slot_memory",
    "slot_sum",
    "slot_sums",
    "step_dynamics",
    "transfer_seconds",
]
