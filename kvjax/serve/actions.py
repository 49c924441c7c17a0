"""The agent's interface to kv-serve-v0: retention priorities and a few discrete commands.

An action is a dict of int32 arrays:
- `request_priority` [S]: 0 leaves a request's retention priority as it is, v in 1..L sets it
  to level v - 1 (0 = evict first, L - 1 = keep). The engine honours it when it picks
  preemption victims (lowest level first, then its own rule).
- `segment_priority` [G]: the same for prefix segments (LRU eviction goes lowest level first).
- `commands` [A]: command ids, applied in order. 0 is noop; then, with S requests, G segments:
  `offload(r)` 1 + r, `preempt(r)` 1 + S + r, `pin(g)` 1 + 2S + g, `drop(g)` 1 + 2S + G + g,
  `reserve(l)` 1 + 2S + 2G + l. A command that names nothing valid (`command_mask`) is a
  counted no-op, as is a priority value outside 0..L.

All zeros is the engine default: nothing changes.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

from kvjax.serve import engine, latency
from kvjax.serve.types import (
    COMMAND_KINDS,
    EMPTY,
    OFFLOADING,
    RUNNING,
    ServeConfig,
    ServeParams,
    ServeState,
)


def command_offsets(cfg: ServeConfig) -> dict[str, int]:
    """First id of each command kind."""
    S, G = cfg.max_requests, cfg.max_segments
    return dict(
        noop=0,
        offload=1,
        preempt=1 + S,
        pin=1 + 2 * S,
        drop=1 + 2 * S + G,
        reserve=1 + 2 * S + 2 * G,
    )


def encode_command(kind: str, target: int, cfg: ServeConfig) -> int:
    """('offload', 3) -> command id; target is a request row, segment row or reserve level."""
    if kind not in COMMAND_KINDS:
        raise ValueError(f"unknown command {kind!r}; allowed: {list(COMMAND_KINDS)}")
    if kind == "noop":
        return 0
    size = dict(
        offload=cfg.max_requests,
        preempt=cfg.max_requests,
        pin=cfg.max_segments,
        drop=cfg.max_segments,
        reserve=len(cfg.reserve_levels),
    )[kind]
    if not 0 <= int(target) < size:
        raise ValueError(f"{kind} target must be in [0, {size}), got {target}")
    return command_offsets(cfg)[kind] + int(target)


def decode_command(command_id: int, cfg: ServeConfig) -> tuple[str, int]:
    """Inverse of encode_command; noop -> ('noop', -1)."""
    n = cfg.num_command_ids
    if not 0 <= int(command_id) < n:
        raise ValueError(f"command id must be in [0, {n}), got {command_id}")
    offsets = command_offsets(cfg)
    kind = max((k for k in offsets if offsets[k] <= int(command_id)), key=offsets.get)
    return kind, (-1 if kind == "noop" else int(command_id) - offsets[kind])


def noop_action(cfg: ServeConfig) -> dict[str, chex.Array]:
    """The engine default: change nothing."""
    return dict(
        request_priority=jnp.zeros((cfg.max_requests,), jnp.int32),
        segment_priority=jnp.zeros((cfg.max_segments,), jnp.int32),
        commands=jnp.zeros((cfg.max_commands,), jnp.int32),
    )


def command_mask(state: ServeState, params: ServeParams, cfg: ServeConfig) -> chex.Array:
    """bool [num_command_ids]: which commands would take effect now (the one validity rule).

    offload: a running request with computed KV whose blocks fit in the free CPU tier;
    preempt: a running request; pin: a segment cached on the GPU; drop: a segment the engine
    could evict (engine.evictable: a leaf no request uses, not pinned); reserve: always; noop:
    always."""
    req, seg = state.requests, state.segments
    mem = engine.memory(state, params)
    need_cpu = engine.ceil_blocks(req.computed)
    running = req.status == RUNNING
    offload = running & (req.computed > 0) & (need_cpu <= mem["cpu_pool"] - mem["cpu_used"])
    cached = engine.resident(seg)
    refs = engine.segment_refs(req, cfg.max_segments)
    droppable = engine.evictable(seg, refs, state.clock)
    return jnp.concatenate(
        [
            jnp.ones((1,), bool),
            offload,
            running,
            cached,
            droppable,
            jnp.ones((len(cfg.reserve_levels),), bool),
        ]
    )


def apply(state: ServeState, action: dict, params: ServeParams, cfg: ServeConfig) -> ServeState:
    """Apply priorities, then each command in order (each checked against the mask of the
    state the earlier ones left)."""
    L = cfg.priority_levels
    req, seg = state.requests, state.segments
    rp = jnp.asarray(action["request_priority"], jnp.int32)
    sp = jnp.asarray(action["segment_priority"], jnp.int32)
    bad = jnp.sum((rp < 0) | (rp > L)) + jnp.sum((sp < 0) | (sp > L))
    set_r = (rp >= 1) & (rp <= L) & (req.status != EMPTY)
    set_s = (sp >= 1) & (sp <= L) & seg.valid
    state = state.replace(
        requests=req.replace(priority=jnp.where(set_r, rp - 1, req.priority)),
        segments=seg.replace(priority=jnp.where(set_s, sp - 1, seg.priority)),
    )
    invalid = bad.astype(jnp.int32)
    off = command_offsets(cfg)
    S, G = cfg.max_requests, cfg.max_segments
    rows, segs = jnp.arange(S), jnp.arange(G)
    for a in range(cfg.max_commands):
        cid = jnp.asarray(action["commands"], jnp.int32)[a]
        in_range = (cid >= 0) & (cid < cfg.num_command_ids)
        mask = command_mask(state, params, cfg)
        valid = in_range & mask[jnp.clip(cid, 0, cfg.num_command_ids - 1)]
        invalid = invalid + (~valid).astype(jnp.int32)
        req, seg, m = state.requests, state.segments, state.metrics
        is_off = valid & (cid >= off["offload"]) & (cid < off["preempt"])
        is_pre = valid & (cid >= off["preempt"]) & (cid < off["pin"])
        is_pin = valid & (cid >= off["pin"]) & (cid < off["drop"])
        is_drop = valid & (cid >= off["drop"]) & (cid < off["reserve"])
        is_res = valid & (cid >= off["reserve"])
        r_off = is_off & (rows == cid - off["offload"])
        r_pre = is_pre & (rows == cid - off["preempt"])
        g_pin = is_pin & (segs == cid - off["pin"])
        g_drop = is_drop & (segs == cid - off["drop"])
        # offload: copy the request's KV to the CPU tier (asynchronous; GPU blocks are freed
        # when the copy completes); it then waits, swapped, at the head of the queue.
        blocks = engine.ceil_blocks(req.computed)
        start = jnp.maximum(state.clock, state.link_free[0])
        done_at = start + latency.transfer_time(params, blocks)
        link_out = jnp.where(is_off, jnp.sum(jnp.where(r_off, done_at, 0.0)), state.link_free[0])
        pc = state.preempt_counter + (is_off | is_pre).astype(jnp.int32)
        req = req.replace(
            status=jnp.where(r_off, OFFLOADING, req.status),
            xfer_done=jnp.where(r_off, done_at, req.xfer_done),
            cpu_blocks=jnp.where(r_off, blocks, req.cpu_blocks),
            queue_key=jnp.where(r_off, -pc, req.queue_key),
            preemptions=req.preemptions + r_off,
        )
        # preempt: the engine's recompute preemption (never a silent delete), at the head of
        # the queue like an offload.
        req, lost = engine.recompute_preempt(req, seg, r_pre, -pc)
        seg = seg.replace(
            pinned_until=jnp.where(
                g_pin, state.clock + params.pin_ttl, jnp.where(g_drop, 0.0, seg.pinned_until)
            ),
            on_gpu=seg.on_gpu & ~g_drop,
        )
        m = m.replace(
            offloads=m.offloads + is_off.astype(jnp.int32),
            agent_preemptions=m.agent_preemptions + is_pre.astype(jnp.int32),
            recomputed_tokens=m.recomputed_tokens + jnp.sum(lost),
        )
        state = state.replace(
            requests=req,
            segments=seg,
            metrics=m,
            preempt_counter=pc,
            link_free=state.link_free.at[0].set(link_out),
            reserve_level=jnp.where(is_res, cid - off["reserve"], state.reserve_level),
        )
    m = state.metrics
    return state.replace(metrics=m.replace(invalid_commands=m.invalid_commands + invalid))


__all__ = ["apply", "command_mask", "decode_command", "encode_command", "noop_action"]
