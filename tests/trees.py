"""Pytree comparisons for tests (`from trees import assert_trees_equal, trees_equal`).

`tree_mismatches(a, b, rtol=0, atol=0, check_dtype=False)`: the leaves (by path) where two
pytrees differ - integer and bool leaves exactly, float leaves within rtol/atol (exactly when
both are 0); `trees_equal` (bool) and `assert_trees_equal` (raises naming the leaves).
"""

from __future__ import annotations

import jax
import numpy as np


def tree_mismatches(
    a, b, rtol: float = 0.0, atol: float = 0.0, check_dtype: bool = False
) -> list[str]:
    """Paths (and why) of the leaves where pytrees `a` and `b` differ; [] if they match."""
    la = jax.tree_util.tree_leaves_with_path(a)
    lb = jax.tree_util.tree_leaves(b)
    if len(la) != len(lb):
        return [f"{len(la)} leaves vs {len(lb)}"]
    out = []
    for (path, x), y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        name = jax.tree_util.keystr(path) or "<root>"
        if x.shape != y.shape:
            out.append(f"{name}: shape {x.shape} vs {y.shape}")
        elif check_dtype and x.dtype != y.dtype:
            out.append(f"{name}: dtype {x.dtype} vs {y.dtype}")
        elif np.issubdtype(x.dtype, np.floating) and (rtol or atol):
            if not np.allclose(y, x, rtol=rtol, atol=atol):
                out.append(f"{name}: max |diff| {np.max(np.abs(x - y)):.3g}")
        elif not np.array_equal(x, y):
            out.append(f"{name}: not equal")
    return out


def trees_equal(a, b, rtol: float = 0.0, atol: float = 0.0, check_dtype: bool = False) -> bool:
    return not tree_mismatches(a, b, rtol, atol, check_dtype)


def assert_trees_equal(
    a, b, rtol: float = 0.0, atol: float = 0.0, check_dtype: bool = False
) -> None:
    bad = tree_mismatches(a, b, rtol, atol, check_dtype)
    assert not bad, f"{len(bad)} leaves differ: " + "; ".join(bad[:8])
