"""Order statistics over small fixed-size tables, written for XLA.

Every scheduling rule of kv-serve-v0 is "walk the rows in some order and stop at the first
that does not fit", which is a prefix sum in that order. Sorting small arrays under vmap is
slow on XLA's CPU backend (argsort of 32-64 keys per scenario ran 2.3x slower than pairwise
comparisons in a measured prototype, jax-env-conventions.md), so the order is a [n, n]
"row j comes before row i" matrix from pairwise lexicographic comparisons, and a prefix sum
in that order is one matrix-vector product with it. That costs O(n^2) per order, which is
cheap for the toy preset's 64 rows but dominates at 512 (h100-llama3-8b ran 0.1x the pure-Python
reference with it), so above SORT_ABOVE rows an `Order` is a sorted permutation instead
(`lax.sort` over the keys, then cumulative sums in sorted order: O(n log n)). `order` picks the
form; tests/serve/test_ops.py proves the forms equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp

from kvjax.xla import materialize

# Tables with more rows than this order their rows by sorting (see the module docstring).
SORT_ABOVE = 128


def before_matrix(keys: Sequence[chex.Array], valid: chex.Array) -> chex.Array:
    """bool [n, n]: entry [i, j] is True when row j comes strictly before row i in the
    lexicographic order of `keys` (each an int or float [n]; the row index breaks ties),
    invalid rows after every valid row (their own order is unspecified and never used)."""
    n = valid.shape[-1]
    idx = jnp.arange(n)
    keys, valid = [materialize(k) for k in keys], materialize(valid)
    # Start from the row-index tie-break and fold keys from the least to the most significant.
    before = idx[None, :] < idx[:, None]
    for k in reversed(tuple(keys)):
        ki, kj = k[:, None], k[None, :]
        before = (kj < ki) | ((kj == ki) & before)
    vi, vj = valid[:, None], valid[None, :]
    return (vj & ~vi) | (vj & vi & before)


def prefix_sum(before: chex.Array, x: chex.Array, inclusive: bool = False) -> chex.Array:
    """Sum of `x` over the rows before each row (plus the row itself if `inclusive`).

    The product runs in float32 (XLA's CPU backend has no fast integer dot; exact while the
    sums stay below 2^24) and is cast back to x's dtype."""
    s = jnp.einsum(
        "ij,j->i", before.astype(jnp.float32), x.astype(jnp.float32), precision="highest"
    )
    if jnp.issubdtype(x.dtype, jnp.integer):
        s = jnp.round(s)
    s = s.astype(x.dtype)
    return s + x if inclusive else s


def row_prefix_sum(x: chex.Array, inclusive: bool = False) -> chex.Array:
    """Sum of `x` (integers) over the rows with a smaller index (a cumsum in row order).

    A Hillis-Steele scan: log2(n) rounds of "add the array shifted by 1, 2, 4, ... rows", each
    `materialize`d (fused together, every round would recompute the previous ones per element).
    On XLA's CPU backend under vmap it made a whole engine iteration ~1.17x faster than the
    product with a constant triangular matrix (a small GEMM with a transposed output) and
    ~1.16x faster than `jnp.cumsum` (a reduce-window), same-process A/B, bit-identical."""
    n = x.shape[-1]
    y, shift = x, 1
    while shift < n:
        y = materialize(y + jnp.concatenate([jnp.zeros((shift,), y.dtype), y[:-shift]]))
        shift *= 2
    return y if inclusive else y - x


def any_before(before: chex.Array, flag: chex.Array) -> chex.Array:
    """True where some earlier row has `flag` set."""
    return jnp.any(before & materialize(flag)[None, :], axis=-1)


class Order:
    """The rows of a table in a lexicographic order of `keys` (row index breaking ties; invalid
    rows last), for prefix sums in that order. `method`: "pairwise" (a before-matrix) or "sort"
    (a permutation); None picks by size (SORT_ABOVE)."""

    def __init__(self, keys: Sequence[chex.Array], valid: chex.Array, method: str | None = None):
        n = valid.shape[-1]
        self.method = method or ("sort" if n > SORT_ABOVE else "pairwise")
        if self.method == "pairwise":
            self.before = before_matrix(keys, valid)
        elif self.method == "sort":
            operands = ((~valid).astype(jnp.int32), *keys, jnp.arange(n))
            self.perm = jax.lax.sort(operands, num_keys=len(operands))[-1]
            self.rank = jnp.zeros(n, jnp.int32).at[self.perm].set(jnp.arange(n, dtype=jnp.int32))
        else:
            raise ValueError(f"unknown order method {method!r}; allowed: ['pairwise', 'sort']")

    def prefix_sum(self, x: chex.Array, inclusive: bool = False) -> chex.Array:
        """Sum of `x` over the rows before each row (plus the row itself if `inclusive`)."""
        if self.method == "pairwise":
            return prefix_sum(self.before, x, inclusive)
        c = jnp.cumsum(x[self.perm])[self.rank]
        return c if inclusive else c - x

    def any_before(self, flag: chex.Array) -> chex.Array:
        """True where some earlier row has `flag` set: a count of them in the order (for the
        pairwise form the product with the float before-matrix the prefix sums already use;
        an [n, n] `any` reduction of the bool matrix ran slower on XLA's CPU backend)."""
        return self.prefix_sum(flag.astype(jnp.int32)) > 0


def order(keys: Sequence[chex.Array], valid: chex.Array, method: str | None = None) -> Order:
    return Order(keys, valid, method)


def first_of_equal(keys: chex.Array, valid: chex.Array, method: str | None = None) -> chex.Array:
    """bool [n]: valid rows with no valid lower row holding the same key (one row per distinct
    key: the lowest). "pairwise" compares all pairs; "sort" sorts by (key, row) and compares
    neighbours; None picks by size (SORT_ABOVE), as `order` does. The pairwise form counts the
    valid lower rows with the same key as a product (an [n, n] `any` ran ~1.05x slower per
    engine iteration on XLA's CPU backend in a same-process A/B)."""
    n = valid.shape[-1]
    method = method or ("sort" if n > SORT_ABOVE else "pairwise")
    if method == "pairwise":
        idx = jnp.arange(n)
        keys, valid = materialize(keys), materialize(valid)
        same_below = (keys[None, :] == keys[:, None]) & (idx[None, :] < idx[:, None])
        return valid & (prefix_sum(same_below, valid.astype(jnp.int32)) == 0)
    if method != "sort":
        raise ValueError(f"unknown method {method!r}; allowed: ['pairwise', 'sort']")
    inv, k, perm = jax.lax.sort(((~valid).astype(jnp.int32), keys, jnp.arange(n)), num_keys=3)
    new_run = jnp.concatenate([jnp.ones((1,), bool), (k[1:] != k[:-1]) | (inv[:-1] != 0)])
    return jnp.zeros(n, bool).at[perm].set(new_run & (inv == 0))


def _argsort_order(keys: Sequence[chex.Array], valid: chex.Array) -> chex.Array:
    """Plain form: the permutation that lists rows in order (valid first, keys, row index)."""
    n = valid.shape[-1]
    order = jnp.arange(n)
    for k in reversed(((~valid).astype(jnp.int32), *keys)):
        order = order[jnp.argsort(k[order], stable=True)]
    return order


def _argsort_prefix_sum(
    keys: Sequence[chex.Array], valid: chex.Array, x: chex.Array, inclusive: bool = False
) -> chex.Array:
    """Plain form of prefix_sum(before_matrix(keys, valid), x): sort, cumsum, unsort."""
    order = _argsort_order(keys, valid)
    c = jnp.cumsum(x[order])
    excl = c - x[order]
    out = jnp.zeros_like(x).at[order].set(c if inclusive else excl)
    return out
