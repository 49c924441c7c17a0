"""Heuristic baselines of kv-serve-v0 (docs/serving.md section 11): jittable policies built on
the literature's rules, each a pure function `policy(key, state, params, cfg) -> action`
(policies.make_policy binds `cfg`). No Python loop runs over rows; the only loop is over the
`max_commands` command slots. Every command they emit is allowed by `actions.command_mask` of
the state they see (tests/serve/test_policies.py).

- `priority_by_role`: Dynamo-style retention priorities from a fixed role table (ROLE_TABLE).
- `ttl_pin`: Continuum-style - pin a session's cached history while its next call waits in a
  tool gap, re-pinning before the pin's TTL runs out.
- `offload_largest_idle`: under memory pressure, offload the decoding request holding the
  most private blocks.
- `infercept`: InferCept-style per-pause choice between preserving (pin) and discarding a
  session's history, from a recompute-vs-memory cost model.

What they read: the request and segment tables as the engine knows them. ttl_pin and
infercept read a TOOL row's `segment` (the history key its session will read - an engine
knows which session a cached history belongs to), never its `arrival` (the tool's return
time, which no engine knows).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from kvjax.serve import actions, engine, workload
from kvjax.serve.types import (
    BLOCK_TOKENS,
    EMPTY,
    LOADING,
    OFFLOADING,
    RUNNING,
    TOOL,
    ServeConfig,
    ServeParams,
)

# Role table of priority_by_role: retention levels 0 (evict / preempt first) .. L - 1 (keep),
# as fractions of the top level (L = 4: high 3, middle 2, low 0; new rows start at 1).
#   segments: system prompt -> high; session history (agentic) or a non-root trace node
#             -> middle; anything else -> low. Trace roots (parent -1: a shared beginning of
#             prompts, the shallowest depth) count as system prompts.
#   requests: running (or transferring) with computed context >= the mean over the running
#             ones -> high (preempting them discards the most KV); other running -> middle;
#             waiting, swapped, in a tool call -> low.
ROLE_TABLE = dict(high=1.0, middle=0.5, low=0.0)
# Available share of the pool (free + evictable cached) under which offload_largest_idle acts.
OFFLOAD_FREE_SHARE = 0.1
# ttl_pin / infercept re-pin a segment whose pin has less than this share of pin_ttl left.
REPIN_SHARE = 0.5


def level(name: str, cfg: ServeConfig) -> int:
    """The retention level (0..L-1) of a ROLE_TABLE entry."""
    return int(round(ROLE_TABLE[name] * (cfg.priority_levels - 1)))


def segment_roles(state, params: ServeParams, cfg: ServeConfig) -> tuple[chex.Array, chex.Array]:
    """bool [G] system-prompt and history segments (valid rows). Agentic: system prompts are
    workload.SYSTEM_KEYS, histories keys >= max_segments (workload.history_key); a replayed
    trace: roots are system prompts, deeper nodes histories; synthetic: keys < num_prefixes
    are system prompts."""
    seg = state.segments
    if cfg.agentic:
        system = jnp.isin(seg.key, jnp.asarray(workload.SYSTEM_KEYS))
        history = seg.key >= cfg.max_segments
    elif cfg.trace is not None:
        system = seg.parent < 0
        history = ~system
    else:
        system = (seg.key >= 0) & (seg.key < params.num_prefixes)
        history = jnp.zeros_like(system)
    return seg.valid & system, seg.valid & history & ~system


def priority_by_role(key, state, params: ServeParams, cfg: ServeConfig) -> dict:
    """Retention priorities from ROLE_TABLE (set every step: action value = level + 1); no
    commands."""
    req = state.requests
    hi, mid, lo = (level(n, cfg) + 1 for n in ("high", "middle", "low"))
    system, history = segment_roles(state, params, cfg)
    seg_p = jnp.where(system, hi, jnp.where(history, mid, lo))
    seg_p = jnp.where(state.segments.valid, seg_p, 0)
    active = (req.status == RUNNING) | (req.status == LOADING) | (req.status == OFFLOADING)
    n = jnp.maximum(jnp.sum(active), 1)
    mean = jnp.sum(jnp.where(active, req.computed, 0)) / n
    long = active & (req.computed >= mean)
    req_p = jnp.where(long, hi, jnp.where(active, mid, jnp.where(req.status != EMPTY, lo, 0)))
    noop = actions.noop_action(cfg)
    return dict(
        request_priority=req_p.astype(jnp.int32),
        segment_priority=seg_p.astype(jnp.int32),
        commands=noop["commands"],
    )


def available_blocks(state, params: ServeParams, cfg: ServeConfig) -> chex.Array:
    """GPU blocks an admission could use now: free + the evictable cached segments' own."""
    refs = engine.segment_refs(state.requests, cfg.max_segments)
    evictable = engine.evictable(state.segments, refs, state.clock)
    cached = jnp.sum(jnp.where(evictable, engine.segment_blocks(state.segments), 0))
    return engine.memory(state, params)["free"] + cached


def tool_histories(state, cfg: ServeConfig) -> chex.Array:
    """bool [G]: resident segments some session in a tool gap (a TOOL row) will read next."""
    req, seg = state.requests, state.segments
    waiting = (req.status == TOOL) & (req.segment >= 0)
    read = jnp.any(waiting[:, None] & (req.segment[:, None] == seg.key[None, :]), axis=0)
    return read & engine.resident(seg)


def pin_commands(state, params: ServeParams, cfg: ServeConfig, want, score) -> chex.Array:
    """int32 [A]: pin the `want` segments whose pin has less than REPIN_SHARE x pin_ttl left,
    highest `score` first, at most max_commands; the rest noop."""
    seg = state.segments
    left = seg.pinned_until - state.clock
    due = want & engine.resident(seg) & (left < REPIN_SHARE * params.pin_ttl)
    k = min(cfg.max_commands, cfg.max_segments)
    top, rows = jax.lax.top_k(jnp.where(due, score, -jnp.inf), k)
    pin = actions.command_offsets(cfg)["pin"]
    cmds = jnp.where(top > -jnp.inf, pin + rows, 0).astype(jnp.int32)
    return jnp.zeros((cfg.max_commands,), jnp.int32).at[:k].set(cmds)


def ttl_pin(key, state, params: ServeParams, cfg: ServeConfig) -> dict:
    """Continuum-like TTL pinning: pin the cached history of every session whose next call is
    in a tool gap (pins last `pin_ttl`; re-pinned while the call still waits), most recently
    completed sessions first (the history's last access is its call's completion)."""
    want = tool_histories(state, cfg)
    cmds = pin_commands(state, params, cfg, want, state.segments.last_access)
    return {**actions.noop_action(cfg), "commands": cmds}


def offload_largest_idle(key, state, params: ServeParams, cfg: ServeConfig) -> dict:
    """When the available share of the GPU pool is below OFFLOAD_FREE_SHARE, offload the
    running request that decodes (its prefill done) and holds the most private blocks (lowest
    row on ties); otherwise nothing. One command per step. Available = free + evictable cached
    blocks (available_blocks): a warm prefix cache fills idle memory, so the plain free share
    is ~0 long before admissions run short."""
    req, seg = state.requests, state.segments
    pool = engine.pool_blocks(params)
    pressure = available_blocks(state, params, cfg) < OFFLOAD_FREE_SHARE * pool
    mask = actions.command_mask(state, params, cfg)
    off = actions.command_offsets(cfg)["offload"]
    allowed = mask[off : off + cfg.max_requests]
    decoding = (req.status == RUNNING) & (req.computed >= req.target) & allowed
    blocks = jnp.where(decoding, engine.private_blocks(req, seg), -1)
    r = jnp.argmax(blocks)
    act = pressure & decoding[r]
    cmds = jnp.zeros((cfg.max_commands,), jnp.int32).at[0].set(jnp.where(act, off + r, 0))
    return {**actions.noop_action(cfg), "commands": cmds.astype(jnp.int32)}


def infercept_costs(state, params: ServeParams, cfg: ServeConfig) -> dict[str, chex.Array]:
    """InferCept-like cost model per segment [G] (seconds of GPU time), for the histories
    sessions in a tool gap will read (`want`):

    - recompute (discard): if the history is evicted, the next call falls back to its system
      prompt (`segment_up`, T0 tokens if resident) and prefills the T - T0 tokens beyond it:
      lin_b (T - T0) + attn_prefill (T - T0) (T0 + (T - T0) / 2) (latency.py's linear and
      attention terms; chunking does not change the total query-key pairs).
    - hold (preserve): pinning keeps its (T - T0) / 16 blocks from everyone else over the
      expected tool gap (`tool_gap_median`): share of the pool x gap x price, where the price
      is 1 - the available share of the pool (available = free + evictable cached blocks, what
      an admission could use now; the plain free share is ~0 whenever a warm cache fills idle
      memory). A full pool prices a pool-second at one GPU-second (memory-bound throughput);
      an empty one at nothing.

    preserve = want & recompute > hold."""
    req, seg = state.requests, state.segments
    waiting = (req.status == TOOL) & (req.segment >= 0)
    reads = waiting[:, None] & (req.segment[:, None] == seg.key[None, :])  # [S, G]
    _, up_row = engine.key_rows(req.segment_up, seg)
    up_tokens = jnp.where(
        engine.row_gather(seg.on_gpu, up_row, False), engine.row_gather(seg.tokens, up_row), 0
    )
    t0 = jnp.max(jnp.where(reads, up_tokens[:, None], 0), axis=0).astype(jnp.float32)
    t = seg.tokens.astype(jnp.float32)
    d = jnp.maximum(t - t0, 0.0)
    recompute = params.lin_b * d + params.attn_prefill * d * (t0 + 0.5 * d)
    pool = jnp.maximum(engine.pool_blocks(params), 1).astype(jnp.float32)
    avail = available_blocks(state, params, cfg)
    price = 1.0 - jnp.clip(avail / pool, 0.0, 1.0)
    share = d / BLOCK_TOKENS / pool  # blocks of the KV dtype, as the pool
    hold = share * params.tool_gap_median * price
    want = tool_histories(state, cfg)
    return dict(recompute=recompute, hold=hold, want=want, preserve=want & (recompute > hold))


def infercept(key, state, params: ServeParams, cfg: ServeConfig) -> dict:
    """InferCept-like: for each session in a tool gap, preserve its history (pin, re-pinned
    while it waits) when the expected recompute cost exceeds the memory-time cost of holding
    it (infercept_costs), else discard it (do nothing: it stays evictable). Largest net saving
    first, at most max_commands pins per step. Offload - InferCept's third choice - applies
    to running requests only in this engine, not to a paused session's cached history."""
    c = infercept_costs(state, params, cfg)
    cmds = pin_commands(state, params, cfg, c["preserve"], c["recompute"] - c["hold"])
    return {**actions.noop_action(cfg), "commands": cmds}


BASELINES = dict(
    priority_by_role=priority_by_role,
    ttl_pin=ttl_pin,
    offload_largest_idle=offload_largest_idle,
    infercept=infercept,
)
