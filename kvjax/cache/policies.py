"""Baseline cache policies: pure, branch-free functions usable under jit and vmap.

Signature (stable; the LLM adapter and the PPO trainer import it)::

    policy(key, state, params) -> int32[max_actions]

`state` is one (unbatched) `EnvState`; `params` the `EnvParams`; `key` a PRNG key (only the
random policy uses it). The returned action ids follow `kvjax.encode_action`: 0 = keep,
1 + k * S + slot for k in (evict, compress, swap_to_cpu). Every policy only emits actions that are
valid on the state it sees *and* after the earlier actions of the same step (the slots an action
vector names are distinct, and 0 = keep pads the rest).

`POLICIES[name]` is the policy for the default `EnvConfig` (S = 32 slots, A = 3 actions);
`make_policy(name, env_or_config)` builds it for any config (cached, so one object per config and
rollouts compile once). Names, in `POLICY_NAMES` order:

keep           keep-only: never acts; the engine's forced preemption does the work (vLLM default).
random         uniform over the valid actions (and keep), distinct slots.
lru            evict the least recently used GPU residents (system prompt included: plain LRU).
lru_swap       LRU victims, swapped to CPU instead of evicted.
largest_first  evict the largest GPU residents first (most memory per action).
priority_lru   lowest retention priority first, LRU among ties (TensorRT-LLM / SGLang).
value_aware    cost heuristic: per candidate, compress / swap / evict by expected cost; never
               evicts system blocks; reasoning and ephemeral first; swaps sequences paused in a
               tool call (Continuum-style); acts only under (projected) pressure.
lookahead      greedy one-step lookahead: the env's own transition vmapped over candidate actions
               (the other heuristics' choices), best one-step reward wins.
oracle         reads the future (not deployable): sees the scenario's future arrivals and
               plays, at every step, the candidate (the choices of ORACLE_CANDIDATES) whose
               continuation under the base heuristic (ORACLE_BASES, value_aware), simulated on
               the known schedule, ends with the best rubric total. By the rollout-improvement
               argument it never does worse than its base heuristic on any scenario. It bounds the
               heuristics, not every policy: a learned policy can beat it (docs/training.md).

The simple baselines (lru, lru_swap, largest_first, priority_lru) act when GPU usage exceeds the
low watermark (`LOW_WATERMARK` = 0.8 of the budget) and free memory back down to it, up to
`max_actions` victims per step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from kvjax.cache.dynamics import progress, quality_of, slot_memory, step_dynamics
from kvjax.cache.layout import lead, once, prefix_sum, slot_sum
from kvjax.cache.observations import action_mask
from kvjax.cache.rewards import total as rubric_total
from kvjax.cache.scenarios import budget_tokens
from kvjax.cache.types import (
    COMPRESS,
    CONTEXT,
    EVICT,
    GPU,
    SWAP,
    SYSTEM,
    EnvConfig,
    EnvParams,
    EnvState,
)

Policy = Callable[[chex.PRNGKey, EnvState, EnvParams], chex.Array]

POLICY_NAMES = (
    "keep",
    "random",
    "lru",
    "lru_swap",
    "largest_first",
    "priority_lru",
    "value_aware",
    "lookahead",
    "oracle",
)
UPPER_BOUNDS = ("oracle",)  # policies that read the future: labelled as such in tables
LOW_WATERMARK = 0.8  # headroom score is 1.0 below this peak usage
HIGH_WATERMARK = 0.95  # ... and 0.5 below this one
DEFAULT_CONFIG = EnvConfig()
_NEG = -1e30


# -- helpers ---------------------------------------------------------------------------------
def batch_polymorphic(fn: Callable) -> Callable:
    """Mark a policy that also runs on batch-trailing states (kvjax.cache.dynamics): slots
    [S, *batch] in, actions [A, *batch] out, `key` one PRNG key per scenario. The rollout engine
    then calls it on the whole batch without vmap (kvjax.cache.rollout.episodes_trailing)."""
    fn.batch_polymorphic = True
    return fn


def _action_id(kind: chex.Array, slot: chex.Array, S: int) -> chex.Array:
    """kind in (EVICT, COMPRESS, SWAP), slot -> action id (int32)."""
    return (1 + (kind - 1) * S + slot).astype(jnp.int32)


def _gpu_mem(state: EnvState) -> chex.Array:
    """Per-slot GPU memory in fp16-token equivalents (0 off GPU / empty)."""
    s = state.slots
    return jnp.where(s.location == GPU, slot_memory(s), 0.0)


def _argmax(x: chex.Array) -> chex.Array:
    """First index of the maximum along axis 0: a max and a min-reduce, which XLA vectorises
    on CPU far better than argmax's variadic (value, index) reduction under vmap."""
    n = x.shape[0]
    idx = lead(jnp.arange(n, dtype=jnp.float32), x)  # float: see dynamics.slot_sum
    first = jnp.min(jnp.where(x == jnp.max(x, axis=0), idx, float(n)), axis=0)
    return first.astype(jnp.int32).clip(0, n - 1)


def _at(x: chex.Array, i: chex.Array) -> chex.Array:
    """x[i] along axis 0 per scenario, for `i` [*batch] in [0, n): a gather of one element per
    scenario (batch-trailing, far cheaper than a masked reduce over every slot)."""
    return jnp.take_along_axis(x, i[None], axis=0, mode="promise_in_bounds")[0]


def _once(*per_slot: chex.Array) -> list[chex.Array]:
    """The given per-slot arrays, each computed once (see kvjax.xla.barrier): every
    reduction of the greedy passes below would otherwise recompute the whole cost chain that
    produced them (batch-trailing only, as layout.once decides)."""
    return [once(x) for x in per_slot]


def _pick_greedy(
    score: chex.Array,
    eligible: chex.Array,
    kind: chex.Array,
    freed: chex.Array,
    need: chex.Array,
    num_actions: int,
) -> chex.Array:
    """Up to `num_actions` distinct slots by descending `score` among `eligible`, each only while
    memory is still needed (`need` minus what earlier picks free). Repeated masked argmax: 3
    passes over 32 slots, much cheaper than a sort under vmap on CPU."""
    S = score.shape[0]
    slot_ids = lead(jnp.arange(S), score)
    score, eligible, kind, freed = _once(jnp.where(eligible, score, _NEG), eligible, kind, freed)
    out = []
    for _ in range(num_actions):  # static unroll
        masked = jnp.where(eligible, score, _NEG)
        i = _argmax(masked)
        hit = slot_ids == i
        take = _at(eligible, i) & (need > 0)
        out.append(jnp.where(take, _action_id(_at(kind, i), i, S), 0))
        need = need - jnp.where(take, _at(freed, i), 0.0)
        eligible = eligible & ~hit
    return jnp.stack(out).astype(jnp.int32)


def _top_sum(value: chex.Array, score: chex.Array, n: int) -> chex.Array:
    """Sum of `value` over the `n` entries with the highest `score` (repeated argmax)."""
    total, taken = jnp.float32(0.0), jnp.zeros(score.shape, bool)
    slot_ids = lead(jnp.arange(score.shape[0]), score)
    # -inf scores carry value 0 (no finite cost), as do the _NEG ones that replace them.
    value, score = _once(value, jnp.where(jnp.isfinite(score), score, _NEG))
    for _ in range(n):
        i = _argmax(jnp.where(taken, _NEG, score))
        hit = slot_ids == i
        total = total + jnp.where(_at(taken, i), 0.0, _at(value, i))
        taken = taken | hit
    return total


def _watermark_need(state: EnvState, params: EnvParams) -> chex.Array:
    """Tokens to free to bring GPU usage back to the low watermark (0 when below it)."""
    B = budget_tokens(state, params)
    used = slot_sum(_gpu_mem(state))
    return jnp.where(used > LOW_WATERMARK * B, used - LOW_WATERMARK * B, 0.0)


# -- simple baselines ------------------------------------------------------------------------
@batch_polymorphic
def keep(
    key: chex.PRNGKey, state: EnvState, params: EnvParams, *, cfg: EnvConfig = DEFAULT_CONFIG
) -> chex.Array:
    """Never act: the engine preempts (newest first) when the cache overflows."""
    return jnp.zeros((cfg.max_actions,) + state.time.shape, jnp.int32)


def random(
    key: chex.PRNGKey, state: EnvState, params: EnvParams, *, cfg: EnvConfig = DEFAULT_CONFIG
) -> chex.Array:
    """Uniform over the valid action ids (keep included), one slot at most once per step.

    One 32-bit draw per action id, cut into 10-bit fields (one per pick), and a masked argmax:
    ~3x fewer random bits than independent uniforms and no `jax.random.categorical`, both slow
    under vmap on CPU (ties among 1,024 levels go to the lower id: a negligible bias)."""
    S = cfg.max_seqs
    mask = action_mask(state)
    bits = jax.random.bits(key, (mask.shape[0],), jnp.uint32)
    slot_of = jnp.concatenate([jnp.array([-1]), jnp.tile(jnp.arange(S), 3)])
    out = []
    for a in range(cfg.max_actions):
        field = ((bits >> (10 * (a % 3))) & 1023).astype(jnp.int32)
        if a >= 3:  # more than 3 picks: re-draw (rare configs)
            field = jax.random.randint(jax.random.fold_in(key, a), mask.shape, 0, 1024)
        i = _argmax(jnp.where(mask, field, -1))
        out.append(i)
        # the slot just named is not touched again this step (keep stays valid)
        mask = mask & ((slot_of != slot_of[i]) | (i == 0))
    return jnp.stack(out).astype(jnp.int32)


def _victims(
    state: EnvState, params: EnvParams, score: chex.Array, kind: int, cfg: EnvConfig
) -> chex.Array:
    """Evict/swap GPU residents by descending score until back under the low watermark."""
    s = state.slots
    mem = _gpu_mem(state)
    eligible = s.active & (s.location == GPU)
    kinds = jnp.full(score.shape, kind, jnp.int32)
    return _pick_greedy(score, eligible, kinds, mem, _watermark_need(state, params),
                        cfg.max_actions)


def _lru_score(state: EnvState) -> chex.Array:
    """Higher = older access; ties broken towards the lower slot index."""
    s = state.slots
    S = s.active.shape[0]
    return -s.last_access.astype(jnp.float32) - lead(jnp.arange(S), s.active) / (2.0 * S)


@batch_polymorphic
def lru(
    key: chex.PRNGKey, state: EnvState, params: EnvParams, *, cfg: EnvConfig = DEFAULT_CONFIG
) -> chex.Array:
    """Evict the least recently used GPU residents (plain LRU: nothing is pinned)."""
    return _victims(state, params, _lru_score(state), EVICT, cfg)


@batch_polymorphic
def lru_swap(
    key: chex.PRNGKey, state: EnvState, params: EnvParams, *, cfg: EnvConfig = DEFAULT_CONFIG
) -> chex.Array:
    """LRU victims, swapped to CPU instead of evicted (they come back when there is room)."""
    return _victims(state, params, _lru_score(state), SWAP, cfg)


@batch_polymorphic
def largest_first(
    key: chex.PRNGKey, state: EnvState, params: EnvParams, *, cfg: EnvConfig = DEFAULT_CONFIG
) -> chex.Array:
    """Evict the GPU residents holding the most memory first."""
    S = cfg.max_seqs
    score = _gpu_mem(state) - lead(jnp.arange(S), state.slots.active) / (2.0 * S)
    return _victims(state, params, score, EVICT, cfg)


@batch_polymorphic
def priority_lru(
    key: chex.PRNGKey, state: EnvState, params: EnvParams, *, cfg: EnvConfig = DEFAULT_CONFIG
) -> chex.Array:
    """Lowest retention priority first (0 evicts first, 100 last), LRU among equal priority."""
    score = -1000.0 * state.slots.priority.astype(jnp.float32) + _lru_score(state) / 100.0
    return _victims(state, params, score, EVICT, cfg)


# -- value-aware cost heuristic --------------------------------------------------------------
VALUE_AWARE_TARGET = 0.6  # free memory down to this projected peak usage (tuned: 0.5-0.65 tie)


def value_aware_action(
    state: EnvState,
    params: EnvParams,
    cfg: EnvConfig,
    target: chex.Array | float = VALUE_AWARE_TARGET,
    queue_all: chex.Array | float = 1.0,
    swap_bias: chex.Array | float = 1.0,
    crisis: chex.Array | float = 1.0,
    slot_mode: chex.Array | float = 1.0,
) -> chex.Array:
    """The value-aware heuristic with its knobs exposed (they may be traced, for tuning)."""
    s, q = state.slots, state.pending
    B = budget_tokens(state, params)
    mem = _gpu_mem(state)
    used = slot_sum(mem)
    on_gpu = s.active & (s.location == GPU)
    ready = s.active & (s.tool_wait == 0) & (s.remaining > 0)
    running = ready & on_gpu
    paused = s.active & (s.tool_wait > 0)
    # Growth this step: decode on running sequences + tool results that return now.
    dec = jnp.asarray(params.decode_tokens_per_step, jnp.float32)
    rem = s.remaining.astype(jnp.float32)
    growth = slot_sum(jnp.where(running, jnp.minimum(dec, rem), 0.0))
    growth = growth + slot_sum(jnp.where(s.active & (s.tool_wait == 1), s.tool_tokens, 0))
    # What admission will pull in once there is room: the queue head, or (queue_all) the FIFO
    # prefix that fits under the admit watermark above the target.
    qtok = jnp.where(q.valid, q.tokens, 0).astype(jnp.float32)
    csum = prefix_sum(qtok)
    room = (params.admit_watermark - target) * B
    prefix = slot_sum(jnp.where(q.valid & (csum <= jnp.maximum(room, qtok[0])), qtok, 0.0))
    incoming = jnp.where(queue_all > 0, prefix, qtok[0])
    need = used + growth + incoming - target * B

    bt, prec = s.block_type, s.precision
    q_now = quality_of(bt, prec)
    q_next = quality_of(bt, jnp.minimum(prec + 1, 2))
    # Expected cost of each action in rubric units, divided by the memory it frees.
    tok_w = params.w_throughput / params.throughput_target_tokens  # value of one token
    freed_c = jnp.where(prec == 0, 0.5, 0.25) * jnp.where(on_gpu, s.tokens, 0.0)
    sys_scale = jnp.where(bt == SYSTEM, 400.0, rem)  # system quality scales every token
    cost_c = tok_w * sys_scale * (q_now - q_next)
    cost_c = jnp.where(on_gpu & (prec < 2), cost_c / jnp.maximum(freed_c, 1.0), jnp.inf)
    # swap: a paused sequence costs ~nothing until its tool returns; a ready one stalls.
    stall = jnp.where(paused, 0.0, 1.0)
    cost_s = stall * (params.w_latency * params.latency_scale * params.step_seconds
                      + tok_w * dec) * 3.0 + swap_bias
    cost_s = jnp.where(on_gpu & (s.remaining > 0), cost_s / jnp.maximum(mem, 1.0), jnp.inf)
    # evict: lost tokens, the eviction-quality mean, high-value loss, risky evictions.
    risky = (s.priority >= 70) | (progress(s) >= 0.7)
    high = bt == CONTEXT
    cost_e = (tok_w * rem + params.w_eviction_quality * (1.0 - s.eviction_value)
              + params.w_eviction_quality * 0.25 * high
              + params.w_risky_eviction * 0.25 * risky)
    cost_e = jnp.where(on_gpu & (bt != SYSTEM), cost_e / jnp.maximum(mem, 1.0), jnp.inf)
    # cheapest kind per slot (ties: evict, then compress, then swap)
    best_cost = jnp.minimum(cost_e, jnp.minimum(cost_c, cost_s))
    kind = jnp.where(cost_e == best_cost, EVICT, jnp.where(cost_c == best_cost, COMPRESS, SWAP))
    kind = kind.astype(jnp.int32)
    freed = jnp.where(kind == COMPRESS, freed_c, mem)
    score = -best_cost
    # Crisis: the cheapest picks cannot stop a forced preemption (a failure, by far the
    # costliest outcome) - free the most memory instead: evict the largest non-system blocks,
    # swapping context blocks (high value) rather than losing them.
    top3 = _top_sum(jnp.where(jnp.isfinite(best_cost), freed, 0.0), score, cfg.max_actions)
    crisis_on = (crisis > 0) & (used + growth - B > 0) & (top3 < used + growth - target * B)
    big = on_gpu & (bt != SYSTEM)
    kind = jnp.where(crisis_on, jnp.where(high, SWAP, EVICT), kind)
    freed = jnp.where(crisis_on, mem, freed)
    score = jnp.where(crisis_on, jnp.where(big, mem, _NEG), score)
    eligible = jnp.where(crisis_on, big, jnp.isfinite(best_cost))
    # Slot pressure: queued requests wait for a free slot, which only an eviction (or a
    # completion) makes; evict the cheapest non-system block per missing slot.
    n_free = slot_sum(~s.active)
    short = (slot_mode > 0) & (slot_sum(q.valid) > n_free) & ~crisis_on
    ev_ok = jnp.isfinite(cost_e)
    kind = jnp.where(short, EVICT, kind)
    score = jnp.where(short, jnp.where(ev_ok, -cost_e, _NEG), score)
    eligible = jnp.where(short, ev_ok, eligible)
    freed = jnp.where(short, mem, freed)
    need = jnp.where(short, jnp.maximum(need, 1.0), need)
    return _pick_greedy(score, eligible, kind, freed, need, cfg.max_actions)


@batch_polymorphic
def value_aware(
    key: chex.PRNGKey, state: EnvState, params: EnvParams, *, cfg: EnvConfig = DEFAULT_CONFIG
) -> chex.Array:
    """Choose compress / swap / evict per candidate by expected cost per freed token.

    Pressure: the projected peak usage of this step - current GPU KV, plus decode growth and
    tool results that return now, plus what admission will pull from the pending queue - above
    `VALUE_AWARE_TARGET` (below the 0.8 headroom level) is the memory to free, with up to
    `max_actions` actions (so 2-3 under high pressure, none when there is headroom).
    Costs, in rubric units per freed token:
      compress  the quality lost on the sequence's remaining output (QUALITY table; the system
                prompt's quality scales every token);
      swap      the stall of a ready sequence on the CPU; ~free for one paused in a tool call
                (Continuum-style);
      evict     its remaining output, the eviction-quality mean (reasoning and ephemeral blocks
                are worth least), high-value (context) loss and risky-eviction penalties;
                system blocks are never evicted.
    """
    return value_aware_action(state, params, cfg)


# -- search-based policies -------------------------------------------------------------------
_CANDIDATE_BASES = ("value_aware", "keep", "lru", "lru_swap", "largest_first", "priority_lru")
ORACLE_CANDIDATES = ("value_aware", "keep", "largest_first", "priority_lru")


def _candidates(key: chex.PRNGKey, state: EnvState, params: EnvParams, cfg: EnvConfig,
                names: tuple[str, ...] = _CANDIDATE_BASES):
    """[C, A] candidate action vectors: the heuristics' own choices (value_aware first, so it
    wins ties)."""
    return jnp.stack([_BASE_FNS[n](key, state, params, cfg=cfg) for n in names])


def lookahead(
    key: chex.PRNGKey, state: EnvState, params: EnvParams, *, cfg: EnvConfig = DEFAULT_CONFIG
) -> chex.Array:
    """Greedy one-step lookahead: step the env's own dynamics for each candidate (vmapped) and
    play the one with the best one-step reward (change in rubric total)."""
    cands = _candidates(key, state, params, cfg)
    nxt = jax.vmap(lambda a: step_dynamics(state, a, params, cfg))(cands)
    score = jax.vmap(lambda st: rubric_total(st, params))(nxt)
    return cands[jnp.argmax(score)]


ORACLE_BASES = ("value_aware",)  # heuristics the oracle simulates to the episode's end


def _play_out(state: EnvState, params: EnvParams, base: str, cfg: EnvConfig) -> chex.Array:
    """Final rubric total of following `base` from `state` to the end of the episode, on the
    scenario's known future (its arrival schedule is in the state)."""

    def body(st):
        return step_dynamics(st, _BASE_FNS[base](None, st, params, cfg=cfg), params, cfg)

    # T - t iterations (under vmap, finished scenarios are held by a select)
    final = jax.lax.while_loop(lambda st: st.time < cfg.episode_len, body, state)
    return rubric_total(final, params)


def oracle(
    key: chex.PRNGKey, state: EnvState, params: EnvParams, *, cfg: EnvConfig = DEFAULT_CONFIG
) -> chex.Array:
    """Reads the future (an upper bound on the heuristics only): for each candidate action,
    simulate the rest of the episode under each base heuristic on the scenario's known
    arrivals, and play the candidate with the best final total. Since the base heuristics'
    own actions are candidates and the dynamics are deterministic, this never scores below
    any of them (rollout improvement)."""
    cands = _candidates(key, state, params, cfg, ORACLE_CANDIDATES)
    nxt = jax.vmap(lambda a: step_dynamics(state, a, params, cfg))(cands)
    finals = jnp.stack(
        [jax.vmap(lambda st, b=b: _play_out(st, params, b, cfg))(nxt) for b in ORACLE_BASES]
    )  # [bases, C]
    return cands[jnp.argmax(jnp.max(finals, axis=0))]


_BASE_FNS: dict[str, Callable[..., chex.Array]] = {
    "keep": keep,
    "random": random,
    "lru": lru,
    "lru_swap": lru_swap,
    "largest_first": largest_first,
    "priority_lru": priority_lru,
    "value_aware": value_aware,
}
POLICIES: dict[str, Policy] = {**_BASE_FNS, "lookahead": lookahead, "oracle": oracle}
assert tuple(POLICIES) == POLICY_NAMES


@functools.cache
def _make(name: str, cfg: EnvConfig) -> Policy:
    fn = POLICIES[name]
    policy = functools.partial(fn, cfg=cfg)
    functools.update_wrapper(policy, fn)
    return policy


def make_policy(name: str, env_or_config=None) -> Policy:
    """The policy `name` for an env (or EnvConfig; default config when None). Cached: the same
    (name, config) returns the same object, so jitted rollouts compile once."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; allowed: {list(POLICY_NAMES)}")
    cfg = getattr(env_or_config, "config", env_or_config) or DEFAULT_CONFIG
    if not isinstance(cfg, EnvConfig):
        raise ValueError(f"expected a KVCacheEnv or EnvConfig, got {type(env_or_config)!r}")
    return _make(name, cfg)


__all__ = [
    "LOW_WATERMARK",
    "HIGH_WATERMARK",
    "ORACLE_BASES",
    "ORACLE_CANDIDATES",
    "POLICIES",
    "POLICY_NAMES",
    "UPPER_BOUNDS",
    "batch_polymorphic",
    "Policy",
    "keep",
    "largest_first",
    "lookahead",
    "lru",
    "lru_swap",
    "make_policy",
    "oracle",
    "priority_lru",
    "random",
    "value_aware",
]
