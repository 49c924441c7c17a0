"""The batch layouts of kvjax's kv-cache-v0 step and the XLA-CPU idioms that make them fast.

`kvjax.cache.dynamics` states the rules of docs/dynamics.md; the few operations whose fastest form
depends on the layout or on an XLA CPU quirk live here, each named for what it computes and each
with a plain-`jnp` form (`PLAIN`) that `tests/cache/test_layout.py` proves equal on both layouts:

* one scenario (what `jax.vmap` hands the step): slots [S], queue [P], scalars [];
* batch-trailing (the rollout engine's `episodes_trailing`): slots [S, *batch], queue
  [P, *batch], arrivals [T, K, *batch], scalars [*batch], action [A, *batch].

Reductions run over axis 0 and per-scenario scalars broadcast from the right, so one code path
serves both. Why each idiom (measured on a 2-core x86 CPU, docs/dynamics.md section 8):
`prefix_sum` is a triangular matmul (`jnp.cumsum` lowers to a reduce-window, ~3x slower under
vmap); `once` (`kvjax.xla.barrier`) stops XLA's CPU backend from re-fusing a producer into
every reader;
`gather_rows` / `pick` / `schedule_row` are selects (XLA's CPU gather runs element by element);
`slot_sum` sums integers in float32 batch-trailing (vectorised; exact below 2^24).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from kvjax.xla import barrier


def lead(v: chex.Array, like: chex.Array) -> chex.Array:
    """A vector `v` [n] shaped to run along `like`'s leading axis: [n, 1, ..., 1] (so that it
    broadcasts against [n, *batch]; unchanged for an unbatched `like`)."""
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def prefix_sum(x: chex.Array) -> chex.Array:
    """Inclusive cumulative sum along axis 0, in float32 (exact for the integer-valued token
    counts used here). A triangular matmul (`jnp.cumsum` under vmap is ~3x slower on CPU): for
    one scenario `x @ upper`, which vmap turns into one [batch, n] x [n, n] GEMM; batch-trailing,
    `lower @ x`, one [n, n] x [n, batch] GEMM."""
    n = x.shape[0]
    x = x.astype(jnp.float32)
    # HIGHEST: GPUs would otherwise use TF32 and round token counts above 2,048.
    hi = jax.lax.Precision.HIGHEST
    if x.ndim == 1:
        return jnp.matmul(x, jnp.triu(jnp.ones((n, n), jnp.float32)), precision=hi)
    return jnp.tensordot(jnp.tril(jnp.ones((n, n), jnp.float32)), x, axes=1, precision=hi)


def once(x: chex.Array) -> chex.Array:
    """`x` computed once and shared by all its readers: batch-trailing, behind
    `kvjax.xla.barrier`; for one scenario (under vmap) `x` itself (XLA fuses those readers well
    enough there)."""
    return barrier(x) if x.ndim > 1 else x


def gather_rows(table: dict[str, chex.Array], index: chex.Array, n: int) -> dict[str, chex.Array]:
    """{name: column[index]} along axis 0 for int32 columns [n, *batch] and `index` [m, *batch]
    (outside [0, n): 0).

    The columns stacked into one [F, n, *batch] table and an n-way select, in both layouts: XLA's
    CPU gather runs element by element, while the selects vectorise (batch-trailing: ~1.17x on
    a whole value_aware rollout against one gather per column; one scenario under vmap: the
    whole step ~1.3x faster than one packed row gather, 9.1 vs 12.2 ms per step of 4,096
    scenarios, same process). Batch-trailing (no vmap, so a branch is a real branch), the index
    is materialised once (not re-derived for every column: see `kvjax.xla.barrier`) and the select
    runs over only the first 4, 8, ... rows when no scenario of the batch reads past
    them: admission reads rows below the step's admissions, 4-8 of 16 in most steps of a
    256-scenario micro-batch (the value_aware rollout ~1.05x, same results)."""
    if index.ndim > 1:
        index = barrier(jnp.where((index >= 0) & (index < n), index, -1))
    packed = jnp.stack(list(table.values()))  # [F, n, *batch]

    def select(rows: int) -> chex.Array:  # the first `rows` rows are all that index reads
        out = jnp.zeros((packed.shape[0],) + index.shape, packed.dtype)
        for r in range(rows):
            out = jnp.where(index == r, packed[:, r : r + 1], out)
        return out

    if index.ndim > 1 and n > 4:  # batch-trailing: the whole batch's highest row bounds it
        sizes = [4 << i for i in range((n - 1).bit_length()) if 4 << i < n] + [n]
        branch = jnp.sum(jnp.asarray(sizes[:-1]) <= jnp.max(index))  # smallest size > max
        out = jax.lax.switch(branch, [lambda k=k: select(k) for k in sizes])
    else:
        out = select(n)
    return {f: out[i] for i, f in enumerate(table)}


def pick(table: chex.Array, index: chex.Array, n: int) -> chex.Array:
    """table[index] along axis 0 for `index` in [0, n) (out of range gives 0), as one select
    per row of `table` [n, *rest]; `index` broadcasts against the result's leading axis."""
    out = jnp.zeros(jnp.broadcast_shapes(index.shape, table.shape[1:]), table.dtype)
    for r in range(n):
        out = jnp.where(index == r, table[r], out)
    return out


def stack_last(columns: list[chex.Array]) -> chex.Array:
    """`jnp.stack(columns, axis=-1)` as float32, for bool and float32 columns of one shape
    (at most 31 bool ones).

    XLA's CPU backend emits a stack along the minor axis as a per-element branch over the
    operands, which does not vectorise. Here the bool columns are packed into one int32 bit
    field and unpacked by a broadcast shift, and each float column is placed by a select on
    the column index: one vectorised loop over [..., n] (the per-slot observation ~1.6x faster
    in isolation, docs/benchmarks.md)."""
    n = len(columns)
    col = jnp.arange(n, dtype=jnp.int32)
    bits = jnp.zeros(columns[0].shape, jnp.int32)
    for c, x in enumerate(columns):
        if x.dtype == jnp.bool_:
            bits = bits | (x.astype(jnp.int32) << c)
    out = ((bits[..., None] >> col) & 1).astype(jnp.float32)
    for c, x in enumerate(columns):
        if x.dtype != jnp.bool_:
            out = jnp.where(col == c, x.astype(jnp.float32)[..., None], out)
    return out


def slot_sum(x: chex.Array) -> chex.Array:
    """Sum over axis 0 (slots or queue rows); bools count as int32.

    Batch-trailing integer arrays are summed in float32 (exact: every count and token sum here
    is far below 2^24): XLA's CPU backend vectorises float reductions over a major axis across
    the batch, but runs integer ones element by element (~4x slower)."""
    if x.ndim > 1 and x.dtype != jnp.float32:
        return jnp.sum(x.astype(jnp.float32), axis=0).astype(jnp.int32)
    return jnp.sum(x, axis=0, dtype=jnp.int32 if x.dtype == jnp.bool_ else None)


def slot_sums(*xs: chex.Array) -> list[chex.Array]:
    """`slot_sum` of several arrays of one shape. Batch-trailing they are stacked and reduced
    together: one pass instead of one per sum (each a separate loop on XLA's CPU backend)."""
    if xs[0].ndim < 2:
        return [slot_sum(x) for x in xs]
    sums = jnp.sum(jnp.stack([x.astype(jnp.float32) for x in xs]), axis=1)
    return [
        t if x.dtype == jnp.float32 else t.astype(jnp.int32) for t, x in zip(sums, xs, strict=True)
    ]


def slot_any(x: chex.Array) -> chex.Array:
    """Any over axis 0 (see slot_sum for why it counts)."""
    return slot_sum(x) > 0


def schedule_row(x: chex.Array, t: chex.Array, T: int) -> chex.Array:
    """Row `t` of an arrival-schedule field [T, K, *batch] (zeros once t >= T). Batch-trailing:
    a T-way select, materialised once (see `kvjax.xla.barrier`) instead of being re-fused into, and
    recomputed by, every element of the queue that reads it."""
    if x.ndim == 2:  # one scenario: index it
        return jnp.where(t < T, x[jnp.minimum(t, T - 1)], jnp.zeros((), x.dtype))
    return barrier(pick(x, t, T))


def _plain_gather_rows(table, index, n):
    ok = (index >= 0) & (index < n)
    safe = jnp.clip(index, 0, n - 1)
    return {f: jnp.where(ok, jnp.take_along_axis(col, safe, axis=0), 0) for f, col in table.items()}


def _plain_pick(table, index, n):
    idx = jnp.broadcast_to(index, jnp.broadcast_shapes(index.shape, table.shape[1:]))
    ok = (idx >= 0) & (idx < n)
    got = jnp.take_along_axis(table, jnp.clip(idx, 0, n - 1)[None], axis=0)[0]
    return jnp.where(ok, got, jnp.zeros((), table.dtype))


# The plain-jnp meaning of each idiom (what tests/cache/test_layout.py checks them against).
PLAIN = {
    "prefix_sum": lambda x: jnp.cumsum(x.astype(jnp.float32), axis=0),
    "once": lambda x: x,
    "stack_last": lambda cols: jnp.stack([jnp.asarray(c, jnp.float32) for c in cols], axis=-1),
    "gather_rows": _plain_gather_rows,
    "pick": _plain_pick,
    "slot_sum": lambda x: jnp.sum(x, axis=0, dtype=jnp.int32 if x.dtype == jnp.bool_ else None),
    "slot_any": lambda x: jnp.any(x, axis=0),
    "schedule_row": lambda x, t, T: jnp.where(
        t < T,
        jnp.take_along_axis(x, jnp.minimum(t, T - 1)[None, None], axis=0)[0]
        if x.ndim > 2
        else x[jnp.minimum(t, T - 1)],
        jnp.zeros((), x.dtype),
    ),
}

__all__ = [
    "PLAIN",
    "gather_rows",
    "lead",
    "once",
    "pick",
    "prefix_sum",
    "schedule_row",
    "slot_any",
    "slot_sum",
    "slot_sums",
    "stack_last",
]
