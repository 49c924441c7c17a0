"""Memory and segment rules of the kv-serve-v0 engine, in one place (docs/serving.md section 1).

- `attached_tokens`: the prompt tokens a request's attached segment holds for it;
- `private_blocks`: the blocks a request holds itself (its computed tokens beyond its attached
  segment's), on the GPU while RUNNING, OFFLOADING or LOADING;
- segments form a tree of rows: a resident segment holds its own tokens beyond its parent's
  (`segment_blocks`); it is referenced while an attached request is on the GPU, and
  `evictable` when it is a leaf, unreferenced and not pinned;
- free = pool - private - cached, never negative (`memory`).
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

from kvjax.serve import ops
from kvjax.serve.types import (
    BLOCK_TOKENS,
    EMPTY,
    LOADING,
    OFFLOADING,
    RUNNING,
    RequestTable,
    SegmentTable,
    ServeParams,
    ServeState,
)


def ceil_blocks(tokens: chex.Array) -> chex.Array:
    """Blocks needed for `tokens` tokens."""
    return (jnp.maximum(tokens, 0) + BLOCK_TOKENS - 1) // BLOCK_TOKENS


def pool_blocks(params: ServeParams) -> chex.Array:
    """GPU KV pool in blocks of the scenario's KV dtype (fp8 holds twice the tokens)."""
    return jnp.asarray(params.gpu_pool_tokens, jnp.int32) * (1 + params.kv_dtype) // BLOCK_TOKENS


def cpu_pool_blocks(params: ServeParams) -> chex.Array:
    return jnp.asarray(params.cpu_pool_tokens, jnp.int32) * (1 + params.kv_dtype) // BLOCK_TOKENS


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
