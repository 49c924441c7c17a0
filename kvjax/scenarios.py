"""Scenario generator: (key, params) -> initial state with its whole arrival schedule.

A scenario is fully determined by its key and params, so it is reproducible and an oracle can
read its future. Every draw is branch-free (tables indexed by tier, regime and block type), so
`generate` vmaps over keys and over per-scenario params. Calibration sources are in
docs/dynamics.md ("Scenarios").
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from kvjax.types import (
    CONTEXT,
    GPU,
    SYSTEM,
    Counters,
    EnvConfig,
    EnvParams,
    EnvState,
    Requests,
    Slots,
    memory_factor,
)

# Tier tables (easy, medium, hard): memory budget range and the two arrival regimes a tier
# draws from with equal probability (seed: easy low/medium, medium medium/high, hard high/bursty).
BUDGET_LO = jnp.array([0.90, 0.75, 0.65], jnp.float32)
BUDGET_HI = jnp.array([1.00, 0.90, 0.80], jnp.float32)
TIER_REGIMES = jnp.array([[0, 1], [1, 2], [2, 3]], jnp.int32)

# Regime tables (low, medium, high, bursty): mean arrivals per step in the calm state, in the
# burst state, and the Gamma shape of the per-step rate (0 = plain Poisson-like).
RATE_CALM = jnp.array([0.6, 1.0, 1.6, 0.5], jnp.float32)
RATE_BURST = jnp.array([0.6, 1.0, 1.6, 3.5], jnp.float32)
GAMMA_SHAPE = jnp.array([0.0, 0.0, 0.5, 0.0], jnp.float32)
BURST_ENTER, BURST_EXIT = 0.25, 0.4  # 2-state Markov-modulated arrivals (bursty regime only)

# Block-type tables (system, context, generation, reasoning, ephemeral).
INIT_MIX = jnp.array([0.0, 0.30, 0.30, 0.25, 0.15], jnp.float32)  # initial residents
ARRIVAL_MIX = jnp.array([0.0, 0.25, 0.35, 0.25, 0.15], jnp.float32)
PROMPT_MEDIAN = jnp.array([4096.0, 4000.0, 1200.0, 1500.0, 800.0], jnp.float32)  # tokens
OUTPUT_MEDIAN = jnp.array([0.0, 60.0, 40.0, 120.0, 16.0], jnp.float32)  # tokens
LENGTH_SIGMA = 0.6  # lognormal sigma for prompt and output lengths
PRIORITY_LO = jnp.array([100, 45, 25, 1, 0], jnp.int32)
PRIORITY_HI = jnp.array([100, 80, 45, 10, 5], jnp.int32)
SYSTEM_TOKENS = (2048, 8192)  # one shared system prompt (Mooncake: one per trace)
INITIAL_RESIDENTS = (8, 17)  # non-system sequences at reset, [lo, hi)
INITIAL_OCCUPANCY = (0.60, 0.90)  # KV at reset as a fraction of kv_cache_bytes
TOOL_PERIOD = (2, 6)  # decode steps between tool calls, [lo, hi)
TOOL_WAIT = (1, 5)  # steps a tool call lasts, [lo, hi)
TOOL_TOKENS_MEDIAN = 600.0  # tokens a tool result appends to the context


def capacity_tokens(params: EnvParams) -> chex.Array:
    """KV capacity at budget 1.0 in fp16-token equivalents."""
    return jnp.asarray(params.kv_cache_bytes, jnp.float32) / jnp.asarray(
        params.kv_bytes_per_token, jnp.float32
    )


def _lognormal(key: chex.PRNGKey, median: chex.Array, shape) -> chex.Array:
    return median * jnp.exp(LENGTH_SIGMA * jax.random.normal(key, shape))


def _request_fields(key: chex.PRNGKey, block_type: chex.Array) -> dict[str, chex.Array]:
    """Per-request draws that depend only on the block type (any shape)."""
    k_len, k_out, k_pri, k_per, k_wait, k_tool = jax.random.split(key, 6)
    shape = block_type.shape
    tokens = jnp.maximum(jnp.round(_lognormal(k_len, PROMPT_MEDIAN[block_type], shape)), 16.0)
    output_len = jnp.maximum(jnp.round(_lognormal(k_out, OUTPUT_MEDIAN[block_type], shape)), 1.0)
    output_len = jnp.where(block_type == SYSTEM, 0.0, output_len)
    priority = jax.random.randint(
        k_pri, shape, PRIORITY_LO[block_type], PRIORITY_HI[block_type] + 1
    )
    agentic = block_type == CONTEXT
    tool_period = jnp.where(agentic, jax.random.randint(k_per, shape, *TOOL_PERIOD), 0)
    tool_wait_len = jnp.where(agentic, jax.random.randint(k_wait, shape, *TOOL_WAIT), 0)
    tool_tokens = jnp.where(
        agentic, jnp.round(_lognormal(k_tool, jnp.float32(TOOL_TOKENS_MEDIAN), shape)), 0.0
    )
    return dict(
        block_type=block_type.astype(jnp.int32),
        tokens=tokens.astype(jnp.int32),
        output_len=output_len.astype(jnp.int32),
        priority=priority.astype(jnp.int32),
        tool_period=tool_period.astype(jnp.int32),
        tool_wait_len=tool_wait_len.astype(jnp.int32),
        tool_tokens=tool_tokens.astype(jnp.int32),
    )


def _arrival_counts(key: chex.PRNGKey, regime: chex.Array, params: EnvParams, cfg: EnvConfig):
    """Arrivals per step for T + 1 rows (row 0 is the queue at reset), each in [0, K]."""
    k_burst, k_gamma, k_count = jax.random.split(key, 3)
    rows = cfg.episode_len + 1
    # 2-state Markov chain (only used by the bursty regime; start in the calm state).
    u = jax.random.uniform(k_burst, (rows,))

    def chain(burst, u_t):
        nxt = jnp.where(burst, u_t >= BURST_EXIT, u_t < BURST_ENTER)
        return nxt, burst

    _, burst = jax.lax.scan(chain, jnp.bool_(False), u)
    rate = jnp.where(burst, RATE_BURST[regime], RATE_CALM[regime])
    # Overdispersed regime: rate x Gamma(k, 1/k) per step (mean 1, CV 1/sqrt(k)).
    shape = jnp.maximum(GAMMA_SHAPE[regime], 1e-3)
    mult = jax.random.gamma(k_gamma, shape, (rows,)) / shape
    rate = rate * jnp.where(GAMMA_SHAPE[regime] > 0, mult, 1.0)
    rate = rate * jnp.asarray(params.arrival_scale, jnp.float32)
    p = jnp.minimum(rate / cfg.max_arrivals, 1.0)
    hits = jax.random.uniform(k_count, (rows, cfg.max_arrivals)) < p[:, None]
    return hits.sum(axis=1).astype(jnp.int32)


def generate(key: chex.PRNGKey, params: EnvParams, cfg: EnvConfig) -> EnvState:
    """Draw one scenario: tier, budget, arrival regime, initial cache, queue and schedule."""
    S, P, K, T = cfg.max_seqs, cfg.max_pending, cfg.max_arrivals, cfg.episode_len
    keys = jax.random.split(key, 12)
    difficulty = jnp.asarray(params.difficulty, jnp.int32)
    tier = jnp.where(difficulty == 3, jax.random.randint(keys[0], (), 0, 3), difficulty)
    regime = TIER_REGIMES[tier, jax.random.randint(keys[1], (), 0, 2)]
    budget = jax.random.uniform(keys[2], (), minval=BUDGET_LO[tier], maxval=BUDGET_HI[tier])

    # Initial residents: slot 0 the shared system prompt, slots 1..n the sequences in flight.
    n_res = jax.random.randint(keys[3], (), *INITIAL_RESIDENTS)
    slot = jnp.arange(S)
    btype = jax.random.categorical(keys[4], jnp.log(INIT_MIX), shape=(S,))
    btype = jnp.where(slot == 0, SYSTEM, btype)
    f = _request_fields(keys[5], btype)
    active = slot <= n_res
    # Scale resident lengths so the cache starts at the drawn occupancy (independent of the
    # tier: a tight budget then starts under pressure, as in the seed's hard tier).
    cap = capacity_tokens(params)
    sys_tokens = jax.random.randint(keys[6], (), *SYSTEM_TOKENS).astype(jnp.float32)
    occupancy = jax.random.uniform(keys[7], (), minval=INITIAL_OCCUPANCY[0],
                                   maxval=INITIAL_OCCUPANCY[1])
    others = jnp.where(active & (slot > 0), f["tokens"], 0).astype(jnp.float32)
    scale = jnp.maximum(occupancy * cap - sys_tokens, 0.0) / jnp.maximum(others.sum(), 1.0)
    tokens = jnp.where(slot == 0, sys_tokens, jnp.maximum(jnp.round(others * scale), 16.0))
    tokens = jnp.where(active, tokens, 0.0).astype(jnp.int32)
    # In-flight sequences have generated part of their output already.
    done_frac = jax.random.uniform(keys[8], (S,), maxval=0.8)
    remaining = jnp.maximum(jnp.round(f["output_len"] * (1.0 - done_frac)), 1).astype(jnp.int32)
    remaining = jnp.where(btype == SYSTEM, 0, remaining)
    kc, kw, ks = jax.random.split(keys[9], 3)
    agentic = f["tool_period"] > 0
    countdown = jnp.where(agentic, jax.random.randint(kc, (S,), 1, TOOL_PERIOD[1]), 0)
    in_tool = agentic & (jax.random.uniform(ks, (S,)) < 0.3)
    tool_wait = jnp.where(in_tool, jax.random.randint(kw, (S,), 1, TOOL_WAIT[1]), 0)
    zi = jnp.zeros((S,), jnp.int32)

    def act(x, empty=0):
        return jnp.where(active, x, jnp.asarray(empty, x.dtype))

    slots = Slots(
        active=active,
        seq_id=act(slot.astype(jnp.int32), -1),
        block_type=act(f["block_type"]),
        tokens=tokens,
        precision=zi,
        location=zi,
        priority=act(f["priority"]),
        eviction_value=act(1.0 - f["priority"].astype(jnp.float32) / 100.0),
        output_len=act(f["output_len"]),
        remaining=act(remaining),
        last_access=act(jax.random.randint(jax.random.fold_in(keys[9], 7), (S,), -8, 0)),
        tool_period=act(f["tool_period"]),
        tool_wait_len=act(f["tool_wait_len"]),
        tool_tokens=act(f["tool_tokens"]),
        tool_countdown=act(countdown.astype(jnp.int32)),
        tool_wait=act(tool_wait.astype(jnp.int32)),
        arrival_step=act(slot.astype(jnp.int32) - 2 * S),
    )

    # Arrival schedule: row 0 is the queue at reset, rows 1..T arrive at the end of steps 0..T-1.
    counts = _arrival_counts(keys[10], regime, params, cfg)
    k_idx = jnp.arange(K)
    valid = k_idx[None, :] < counts[:, None]  # [T+1, K], FIFO prefix within a step
    abtype = jax.random.categorical(keys[11], jnp.log(ARRIVAL_MIX), shape=(T + 1, K))
    af = _request_fields(jax.random.fold_in(keys[11], 1), abtype)
    row = jnp.arange(T + 1, dtype=jnp.int32)[:, None]
    seq_id = S + row * K + k_idx[None, :].astype(jnp.int32)
    schedule = Requests(
        valid=valid,
        seq_id=jnp.where(valid, seq_id, -1),
        arrival_step=jnp.broadcast_to(row - 1, (T + 1, K)),
        **{k: jnp.where(valid, v, 0) for k, v in af.items()},
    )
    pending = jax.tree_util.tree_map(
        lambda x: jnp.concatenate([x[0], jnp.zeros((P - K,), x.dtype)]), schedule
    )
    pending = pending.replace(seq_id=jnp.where(pending.valid, pending.seq_id, -1))
    arrivals = jax.tree_util.tree_map(lambda x: x[1:], schedule)

    zf, zn = jnp.float32(0.0), jnp.int32(0)
    counters = Counters(
        tokens=zf, raw_tokens=zf, failures=zn, preemptions=zn, queue_overflows=zn,
        queue_timeouts=zn, completed=zn, latency=zf, headroom=zf, evictions=zn,
        eviction_value_sum=zf, high_value_lost=zn, risky_evictions=zn, compressions=zn,
        swaps=zn, swap_ins=zn, invalid_actions=zn,
    )
    state = EnvState(
        slots=slots,
        pending=pending,
        arrivals=arrivals,
        counters=counters,
        time=zn,
        usage_peak=zf,
        time_above_0_95=zn,
        pending_queue_growth=zn,
        tier=tier.astype(jnp.int32),
        regime=regime.astype(jnp.int32),
        memory_budget=budget.astype(jnp.float32),
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
