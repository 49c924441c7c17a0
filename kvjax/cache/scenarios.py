"""Scenario generator: (key, params) -> initial state; later arrivals drawn when they arrive.

A scenario is fully determined by its key and params: every draw is a word of a counter-based
hash stream seeded from the key (`word_layout` fixes which word is which), so `reset` draws only
the initial cache and queue, the step draws row t + 1 of the arrival schedule at step t
(`arrival_row`), and an oracle or the reference can draw the whole future (`schedule`).
Every draw is branch-free (tables indexed by tier, regime and block type), so
`generate` vmaps over keys and over per-scenario params. Calibration sources are in
docs/dynamics.md ("Scenarios").
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np

from kvjax import rng
from kvjax.cache.types import (
    CONTEXT,
    GPU,
    SYSTEM,
    Counters,
    EnvConfig,
    EnvParams,
    EnvState,
    Requests,
    Slots,
    eviction_value_of,
    memory_factor,
)

# Tier tables (easy, medium, hard): memory budget range and the two arrival regimes a tier
# draws from with equal probability (seed: easy low/medium, medium medium/high, hard high/bursty).
BUDGET_LO = (0.90, 0.75, 0.65)
BUDGET_HI = (1.00, 0.90, 0.80)
TIER_REGIMES = ((0, 1), (1, 2), (2, 3))

# Regime tables (low, medium, high, bursty): mean arrivals per step in the calm state and in the
# burst state; the high regime multiplies each step's rate by Gamma(1/2, 2) (mean 1, CV 1.4 -
# BurstGPT's Gamma shape 0.5), the bursty one is a 2-state Markov-modulated process.
RATE_CALM = (0.6, 1.0, 1.6, 0.5)
RATE_BURST = (0.6, 1.0, 1.6, 3.5)
GAMMA_REGIME = 2
BURSTY_REGIME = 3
BURST_ENTER, BURST_EXIT = 0.25, 0.4  # per-step switch probabilities of the bursty chain

# Block-type tables (system, context, generation, reasoning, ephemeral). Mixes are in 20ths.
INIT_MIX = (0, 6, 6, 5, 3)  # initial residents: 30% context, 30% generation, ...
ARRIVAL_MIX = (0, 5, 7, 5, 3)  # arrivals: 25% context, 35% generation, 25% reasoning, ...
PROMPT_MEDIAN = (4096.0, 4000.0, 1200.0, 1500.0, 800.0)  # tokens
OUTPUT_MEDIAN = (0.0, 60.0, 40.0, 120.0, 16.0)  # tokens
LENGTH_SIGMA = 0.6  # lognormal sigma for prompt and output lengths
PRIORITY_LO = (100, 45, 25, 1, 0)
PRIORITY_HI = (100, 80, 45, 10, 5)
SYSTEM_TOKENS = (2048, 8192)  # one shared system prompt (Mooncake: one per trace)
INITIAL_RESIDENTS = (8, 17)  # non-system sequences at reset, [lo, hi)
INITIAL_OCCUPANCY = (0.60, 0.90)  # KV at reset as a fraction of kv_cache_bytes
TOOL_PERIOD = (2, 6)  # decode steps between tool calls, [lo, hi)
TOOL_WAIT = (1, 5)  # steps a tool call lasts, [lo, hi)
TOOL_TOKENS_MEDIAN = 600.0  # tokens a tool result appends to the context
IN_TOOL_AT_RESET = 0.3  # fraction of agentic residents paused in a tool call at reset


def capacity_tokens(params: EnvParams) -> chex.Array:
    """KV capacity at budget 1.0 in fp16-token equivalents."""
    return jnp.asarray(params.kv_cache_bytes, jnp.float32) / jnp.asarray(
        params.kv_bytes_per_token, jnp.float32
    )


def _lookup(table: tuple, index: chex.Array) -> chex.Array:
    """table[index] for a small static table, as selects (gathers are slow under vmap on CPU)."""
    out = jnp.full(index.shape, table[0], jnp.asarray(table[0]).dtype)
    for i, v in enumerate(table[1:], start=1):
        out = jnp.where(index == i, v, out)
    return out


class _Digits:
    """Draws several small uniform integers from one uint32 word by mixed-radix digits.

    Threefry bits are the dominant cost of a reset, so each slot / arrival uses one word for
    all its discrete draws (exactly uniform up to a bias below n / 2^32)."""

    def __init__(self, word: chex.Array):
        self.x = word

    def take(self, n) -> chex.Array:
        n = jnp.asarray(n, jnp.uint32)
        d = self.x % n
        self.x = self.x // n
        return d.astype(jnp.int32)


_uniform = rng.uniform


def _lognormal(word: chex.Array, median: chex.Array) -> chex.Array:
    return median * jnp.exp(LENGTH_SIGMA * jax.scipy.special.ndtri(_uniform(word)))


def _block_type(digits: _Digits, mix: tuple) -> chex.Array:
    """Categorical over block types from a mix in 20ths (inverse CDF)."""
    d = digits.take(20)
    edges = [sum(mix[: i + 1]) for i in range(len(mix))]
    return sum(jnp.where(d >= e, 1, 0) for e in edges[:-1]).astype(jnp.int32)


def _request_fields(
    w_tokens: chex.Array, w_output: chex.Array, w_tool: chex.Array, digits: _Digits,
    block_type: chex.Array,
) -> dict:
    """Per-request draws that depend only on the block type (one word each for the prompt,
    output and tool-result lengths)."""
    lo = _lookup(PRIORITY_LO, block_type)
    priority = lo + digits.take(_lookup(PRIORITY_HI, block_type) - lo + 1)
    agentic = block_type == CONTEXT
    tool_period = jnp.where(
        agentic, TOOL_PERIOD[0] + digits.take(TOOL_PERIOD[1] - TOOL_PERIOD[0]), 0
    )
    tool_wait_len = jnp.where(agentic, TOOL_WAIT[0] + digits.take(TOOL_WAIT[1] - TOOL_WAIT[0]), 0)
    tokens = jnp.maximum(jnp.round(_lognormal(w_tokens, _lookup(PROMPT_MEDIAN, block_type))), 16.0)
    output_len = jnp.maximum(
        jnp.round(_lognormal(w_output, _lookup(OUTPUT_MEDIAN, block_type))), 1.0
    )
    output_len = jnp.where(block_type == SYSTEM, 0.0, output_len)
    tool_tokens = jnp.where(agentic, jnp.round(_lognormal(w_tool, TOOL_TOKENS_MEDIAN)), 0.0)
    return dict(
        block_type=block_type,
        tokens=tokens.astype(jnp.int32),
        output_len=output_len.astype(jnp.int32),
        priority=priority.astype(jnp.int32),
        tool_period=tool_period.astype(jnp.int32),
        tool_wait_len=tool_wait_len.astype(jnp.int32),
        tool_tokens=tool_tokens.astype(jnp.int32),
    )


# Where a scenario's words sit in its counter stream (a stable layout: the same key always
# gives the same scenario, whichever part is drawn first): S slot rows of SLOT_WORDS, then
# T + 1 arrival rows of K x REQUEST_WORDS, then T + 1 count rows of 2 + K, then MISC_WORDS.
SLOT_WORDS, REQUEST_WORDS, MISC_WORDS = 5, 4, 6


def word_layout(cfg: EnvConfig) -> dict[str, int]:
    """First counter of each block of a scenario's words (see SLOT_WORDS)."""
    S, K, T = cfg.max_seqs, cfg.max_arrivals, cfg.episode_len
    arrivals = S * SLOT_WORDS
    counts = arrivals + (T + 1) * K * REQUEST_WORDS
    misc = counts + (T + 1) * (2 + K)
    return {"slots": 0, "arrivals": arrivals, "counts": counts, "misc": misc}


def scenario_seed(key: chex.PRNGKey) -> chex.Array:
    """The scenario's 64-bit hash seed (uint32 [2]): one threefry call on the reset key."""
    return jax.random.bits(key, (2,), jnp.uint32)


def seed_words(seed: chex.Array, start: chex.Array, shape: tuple[int, ...]) -> chex.Array:
    """Words `start .. start + prod(shape) - 1` of the scenario's stream, shaped `shape` (then
    any trailing batch axes of `seed` [2, *batch] and `start` [*batch])."""
    n = int(np.prod(shape))
    batch = seed.shape[1:]
    counter = jnp.arange(n, dtype=jnp.uint32).reshape((n,) + (1,) * len(batch))
    counter = counter + jnp.asarray(start).astype(jnp.uint32)
    return rng.hash_words(seed, counter).reshape(shape + batch)


def random_words(key: chex.PRNGKey, shape: tuple[int, ...]) -> chex.Array:
    """uint32 words 0 .. prod(shape) - 1 of the scenario `key` draws (one threefry call seeds a
    counter-based hash: ~17 ns per threefry word on CPU would be most of a reset)."""
    return seed_words(scenario_seed(key), 0, shape)


def _switch_draw(seed: chex.Array, row, cfg: EnvConfig) -> chex.Array:
    """The bursty chain's uniform draw of schedule row `row` (its first count word)."""
    start = word_layout(cfg)["counts"] + jnp.asarray(row, jnp.int32) * (2 + cfg.max_arrivals)
    return _uniform(seed_words(seed, start, (1,))[0])


def burst_state(seed: chex.Array, row: chex.Array, cfg: EnvConfig) -> chex.Array:
    """Whether the bursty regime's 2-state chain is in its burst state at schedule row `row`:
    it starts calm at row 0 and switches on each row's first count word (enter w.p.
    BURST_ENTER, leave w.p. BURST_EXIT). A pure function of (seed, row): T + 1 chain steps,
    masked past `row`."""
    row = jnp.asarray(row, jnp.int32)
    burst = jnp.zeros(row.shape, jnp.bool_)
    for r in range(cfg.episode_len + 1):
        u = _switch_draw(seed, r, cfg)
        nxt = jnp.where(burst, u >= BURST_EXIT, u < BURST_ENTER)
        burst = jnp.where(r < row, nxt, burst)
    return burst


def arrival_row(
    seed: chex.Array,
    row: chex.Array,
    regime: chex.Array,
    params: EnvParams,
    cfg: EnvConfig,
    burst: chex.Array | None = None,
) -> Requests:
    """Row `row` of a scenario's arrival schedule (row 0: the queue at reset; row t + 1 arrives
    at the end of step t), drawn from its words alone: Requests [K]. `burst`: the chain's
    state at this row when the caller has it (default: `burst_state(seed, row, cfg)`).

    Batch-polymorphic: `seed` [2, *batch] with `row`, `regime` [*batch] gives Requests
    [K, *batch]."""
    S, K = cfg.max_seqs, cfg.max_arrivals
    layout = word_layout(cfg)
    row = jnp.asarray(row, jnp.int32)
    if burst is None:
        burst = burst_state(seed, row, cfg)
    wc = seed_words(seed, layout["counts"] + row * (2 + K), (2 + K,))
    # The per-step rate: the regime's (calm or burst) rate; the high regime multiplies it by
    # Gamma(1/2, scale 2) = Z^2 for a standard normal Z (exact, and no rejection loop).
    rate = jnp.where(
        burst & (regime == BURSTY_REGIME), _lookup(RATE_BURST, regime), _lookup(RATE_CALM, regime)
    )
    z = jax.scipy.special.ndtri(_uniform(wc[1]))
    rate = rate * jnp.where(regime == GAMMA_REGIME, z * z, 1.0)
    rate = rate * jnp.asarray(params.arrival_scale, jnp.float32)
    p = jnp.minimum(rate / K, 1.0)
    count = jnp.sum(_uniform(wc[2:]) < p, axis=0, dtype=jnp.int32)

    wa = seed_words(seed, layout["arrivals"] + row * (K * REQUEST_WORDS), (K, REQUEST_WORDS))
    digits = _Digits(wa[:, 0])
    f = _request_fields(wa[:, 1], wa[:, 2], wa[:, 3], digits, _block_type(digits, ARRIVAL_MIX))
    k = jnp.arange(K, dtype=jnp.int32).reshape((K,) + (1,) * row.ndim)
    valid = k < count  # a FIFO prefix
    seq_id = S + row * K + k
    out = Requests(
        valid=valid,
        seq_id=jnp.where(valid, seq_id, -1),
        arrival_step=jnp.broadcast_to(row - 1, valid.shape),
        **{name: jnp.where(valid, v, 0) for name, v in f.items()},
    )
    return out


def no_schedule(cfg: EnvConfig) -> Requests:
    """The arrival table of a generated scenario: [T, 0] (no entries). Its arrivals are drawn
    from the scenario's seed when they arrive (`arrival_row`); a hand-built scenario carries a
    full [T, K] table instead (`build`), which the step reads."""
    T = cfg.episode_len
    empty = jnp.zeros((T, 0), jnp.int32)
    names = [f.name for f in dataclasses.fields(Requests) if f.name != "valid"]
    return Requests(valid=jnp.zeros((T, 0), jnp.bool_), **{f: empty for f in names})


def has_schedule(state: EnvState) -> bool:
    """Whether the state carries its arrivals as a table (hand-built) rather than drawing them
    from its seed (generated). Static: from shapes alone."""
    return state.arrivals.valid.shape[1] != 0


def schedule(
    seed: chex.Array, regime: chex.Array, params: EnvParams, cfg: EnvConfig
) -> Requests:
    """A generated scenario's whole future, rows 1..T of its draws (Requests [T, K]): what
    the step draws one row at a time (for oracles, the reference and tests)."""
    burst = jnp.zeros(jnp.shape(regime), jnp.bool_)
    rows = []
    for r in range(cfg.episode_len + 1):
        rows.append(arrival_row(seed, r, regime, params, cfg, burst=burst))
        u = _switch_draw(seed, r, cfg)
        burst = jnp.where(burst, u >= BURST_EXIT, u < BURST_ENTER)
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *rows[1:])


def with_schedule(state: EnvState, params: EnvParams, cfg: EnvConfig) -> EnvState:
    """A generated (one-scenario) state with its future drawn into a [T, K] table - the form
    `build` makes and the reference reads; a state that has a table is returned unchanged."""
    if has_schedule(state):
        return state
    return state.replace(arrivals=schedule(state.seed, state.regime, params, cfg))


def generate(key: chex.PRNGKey, params: EnvParams, cfg: EnvConfig) -> EnvState:
    """Draw one scenario: tier, budget, arrival regime, initial cache and queue. Later arrivals
    are drawn when they arrive (`arrival_row`), from the same seed."""
    S, P, K = cfg.max_seqs, cfg.max_pending, cfg.max_arrivals
    seed = scenario_seed(key)
    layout = word_layout(cfg)
    w_slot = seed_words(seed, layout["slots"], (S, SLOT_WORDS))  # digits, 3 lengths, done
    w_misc = seed_words(seed, layout["misc"], (MISC_WORDS,))

    misc = _Digits(w_misc[0])
    difficulty = jnp.asarray(params.difficulty, jnp.int32)
    tier = jnp.where(difficulty == 3, misc.take(3), difficulty)
    regime = _lookup(tuple(r[0] for r in TIER_REGIMES), tier) + misc.take(2)
    n_res = INITIAL_RESIDENTS[0] + misc.take(INITIAL_RESIDENTS[1] - INITIAL_RESIDENTS[0])
    sys_tokens = SYSTEM_TOKENS[0] + _Digits(w_misc[1]).take(SYSTEM_TOKENS[1] - SYSTEM_TOKENS[0])
    lo, hi = _lookup(BUDGET_LO, tier), _lookup(BUDGET_HI, tier)
    budget = lo + (hi - lo) * _uniform(w_misc[2])
    occupancy = INITIAL_OCCUPANCY[0] + (INITIAL_OCCUPANCY[1] - INITIAL_OCCUPANCY[0]) * _uniform(
        w_misc[3]
    )

    # Initial residents: slot 0 the shared system prompt, slots 1..n the sequences in flight.
    slot = jnp.arange(S)
    digits = _Digits(w_slot[:, 0])
    btype = jnp.where(slot == 0, SYSTEM, _block_type(digits, INIT_MIX))
    f = _request_fields(w_slot[:, 1], w_slot[:, 2], w_slot[:, 3], digits, btype)
    active = slot <= n_res
    # Scale resident lengths so the cache starts at the drawn occupancy (independent of the
    # tier: a tight budget then starts under pressure, as in the seed's hard tier).
    cap = capacity_tokens(params)
    others = jnp.where(active & (slot > 0), f["tokens"], 0).astype(jnp.float32)
    scale = jnp.maximum(occupancy * cap - sys_tokens, 0.0) / jnp.maximum(others.sum(), 1.0)
    tokens = jnp.where(slot == 0, sys_tokens, jnp.maximum(jnp.round(others * scale), 16.0))
    tokens = jnp.where(active, tokens, 0.0).astype(jnp.int32)
    # In-flight sequences have generated part of their output already (up to 80%).
    done_frac = 0.8 * _uniform(w_slot[:, 4])
    remaining = jnp.maximum(jnp.round(f["output_len"] * (1.0 - done_frac)), 1).astype(jnp.int32)
    remaining = jnp.where(btype == SYSTEM, 0, remaining)
    agentic = f["tool_period"] > 0
    countdown = jnp.where(agentic, 1 + digits.take(TOOL_PERIOD[1] - 1), 0)
    in_tool = agentic & (digits.take(10) < int(IN_TOOL_AT_RESET * 10))
    tool_wait = jnp.where(in_tool, 1 + digits.take(TOOL_WAIT[1] - 1), 0)
    last_access = -1 - digits.take(8)

    def act(x, empty=0):
        return jnp.where(active, x, jnp.asarray(empty, x.dtype))

    slots = Slots(
        active=active,
        seq_id=act(slot.astype(jnp.int32), -1),
        block_type=act(f["block_type"]),
        tokens=tokens,
        precision=jnp.zeros((S,), jnp.int32),
        location=jnp.zeros((S,), jnp.int32),
        priority=act(f["priority"]),
        eviction_value=act(eviction_value_of(f["priority"])),
        output_len=act(f["output_len"]),
        remaining=act(remaining),
        last_access=act(last_access.astype(jnp.int32)),
        tool_period=act(f["tool_period"]),
        tool_wait_len=act(f["tool_wait_len"]),
        tool_tokens=act(f["tool_tokens"]),
        tool_countdown=act(countdown.astype(jnp.int32)),
        tool_wait=act(tool_wait.astype(jnp.int32)),
        arrival_step=act(slot.astype(jnp.int32) - 2 * S),
    )

    # The queue at reset is row 0 of the schedule (arrival_step -1); rows 1..T arrive at the
    # end of steps 0..T-1 and are drawn then (dynamics), continuing the bursty chain.
    row0 = arrival_row(seed, 0, regime, params, cfg, burst=jnp.bool_(False))
    pending = jax.tree_util.tree_map(
        lambda x: jnp.concatenate([x, jnp.zeros((P - K,), x.dtype)]), row0
    )
    pending = pending.replace(seq_id=jnp.where(pending.valid, pending.seq_id, -1))

    zf, zn = jnp.float32(0.0), jnp.int32(0)
    counters = Counters(
        tokens=zf, raw_tokens=zf, failures=zn, preemptions=zn, queue_overflows=zn,
        queue_timeouts=zn, completed=zn, latency=zf, headroom=zf, evictions=zn,
        eviction_value_sum=zf, high_value_lost=zn, risky_evictions=zn, compressions=zn,
        swaps=zn, swap_ins=zn, invalid_actions=zn,
    )  # fmt: skip
    state = EnvState(
        slots=slots,
        pending=pending,
        arrivals=no_schedule(cfg),
        counters=counters,
        time=zn,
        usage_peak=zf,
        time_above_0_95=zn,
        pending_queue_growth=zn,
        tier=tier.astype(jnp.int32),
        regime=regime.astype(jnp.int32),
        memory_budget=budget.astype(jnp.float32),
        seed=seed,
    )
    return state.replace(usage_peak=usage(state, params))


def gpu_tokens(slots: Slots) -> chex.Array:
    """GPU KV in fp16-token equivalents: sum over active GPU-resident slots."""
    on_gpu = slots.active & (slots.location == GPU)
    return jnp.sum(jnp.where(on_gpu, slots.tokens * memory_factor(slots.precision), 0.0))


def budget_tokens(state: EnvState, params: EnvParams) -> chex.Array:
    """The scenario's budget in fp16-token equivalents."""
    return state.memory_budget * capacity_tokens(params)


def usage(state: EnvState, params: EnvParams) -> chex.Array:
    """GPU KV memory used, normalised by the scenario's budget (1.0 = at budget; not clamped)."""
    return gpu_tokens(state.slots) / budget_tokens(state, params)


_SLOT_DEFAULTS = dict(
    seq_id=-1, block_type=2, tokens=0, precision=0, location=0, priority=35, output_len=10,
    remaining=None, last_access=-1, tool_period=0, tool_wait_len=0, tool_tokens=0,
    tool_countdown=None, tool_wait=0, arrival_step=None,
)  # fmt: skip
_REQUEST_DEFAULTS = dict(
    seq_id=-1, block_type=2, tokens=0, output_len=10, priority=35, tool_period=0,
    tool_wait_len=0, tool_tokens=0, arrival_step=-1,
)  # fmt: skip


def build(
    cfg: EnvConfig,
    params: EnvParams,
    slots: dict[int, dict] | None = None,
    pending: list[dict] | None = None,
    arrivals: dict[int, list[dict]] | None = None,
    memory_budget: float = 1.0,
    time: int = 0,
) -> EnvState:
    """A hand-built scenario (host-side; for tests, notebooks and what-if studies).

    `slots` maps slot index -> fields (missing fields take defaults: a generation sequence
    with 10 tokens to go); `pending` lists queued requests in FIFO order; `arrivals` maps a
    step t -> requests that arrive at the end of step t. Field names are those of `Slots` and
    `Requests`; `eviction_value` is always 1 - priority / 100.
    """
    S, P, K, T = cfg.max_seqs, cfg.max_pending, cfg.max_arrivals, cfg.episode_len
    slots, pending, arrivals = slots or {}, pending or [], arrivals or {}
    if len(pending) > P or any(len(v) > K for v in arrivals.values()):
        raise ValueError(f"at most {P} pending requests and {K} arrivals per step")
    cols = {k: np.zeros((S,), np.int32) for k in _SLOT_DEFAULTS}
    cols["seq_id"][:] = -1
    active = np.zeros((S,), bool)
    for i, spec in slots.items():
        unknown = set(spec) - set(_SLOT_DEFAULTS)
        if unknown:
            raise ValueError(
                f"unknown slot fields {sorted(unknown)}; allowed: {sorted(_SLOT_DEFAULTS)}"
            )
        row = {**_SLOT_DEFAULTS, "seq_id": i, "arrival_step": i - 2 * S, **spec}
        row["remaining"] = row["output_len"] if row["remaining"] is None else row["remaining"]
        if row["tool_countdown"] is None:
            row["tool_countdown"] = row["tool_period"]
        active[i] = True
        for k, v in row.items():
            cols[k][i] = v

    def table(rows: list[dict], n: int) -> dict[str, np.ndarray]:
        out = {k: np.zeros((n,), np.int32) for k in _REQUEST_DEFAULTS}
        out["seq_id"][:] = -1
        for j, spec in enumerate(rows):
            unknown = set(spec) - set(_REQUEST_DEFAULTS)
            if unknown:
                allowed = sorted(_REQUEST_DEFAULTS)
                raise ValueError(f"unknown request fields {sorted(unknown)}; allowed: {allowed}")
            for k, v in {**_REQUEST_DEFAULTS, "seq_id": 1000 + j, **spec}.items():
                out[k][j] = v
        out["valid"] = np.arange(n) < len(rows)
        return out

    q = table(pending, P)
    rows = [table([{"arrival_step": t, "seq_id": 2000 + 10 * t + j, **r}
                   for j, r in enumerate(arrivals.get(t, []))], K) for t in range(T)]  # fmt: skip
    sched = {k: np.stack([r[k] for r in rows]) for k in q}
    zf, zn = jnp.float32(0.0), jnp.int32(0)
    counters = Counters(
        **{f: (zf if f in _FLOAT_COUNTERS else zn) for f in Counters.__dataclass_fields__}
    )
    state = EnvState(
        slots=Slots(
            active=jnp.asarray(active),
            eviction_value=jnp.asarray(
                np.where(active, 1.0 - cols["priority"] / 100.0, 0.0), jnp.float32
            ),
            **{k: jnp.asarray(v) for k, v in cols.items()},
        ),
        pending=Requests(**{k: jnp.asarray(v) for k, v in q.items()}),
        arrivals=Requests(**{k: jnp.asarray(v) for k, v in sched.items()}),
        counters=counters,
        time=jnp.int32(time),
        usage_peak=zf,
        time_above_0_95=zn,
        pending_queue_growth=zn,
        tier=zn,
        regime=zn,
        memory_budget=jnp.float32(memory_budget),
        seed=jnp.zeros((2,), jnp.uint32),
    )
    return state.replace(usage_peak=usage(state, params))


_FLOAT_COUNTERS = ("tokens", "raw_tokens", "latency", "headroom", "eviction_value_sum")
