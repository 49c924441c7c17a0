"""Shared test helpers and fixtures.

Helpers (import them: `from conftest import assert_trees_equal, trees_equal`):
- `tree_mismatches(a, b, rtol=0, atol=0, check_dtype=False)`: the leaves (by path) where two
  pytrees differ - integer and bool leaves exactly, float leaves within rtol/atol (exactly when
  both are 0); `trees_equal` (bool) and `assert_trees_equal` (raises naming the leaves).

Every test module ends with `jax.clear_caches()` (`_release_compiled_programs`): see there why.
Compiled programs persist on disk in build/jax-cache (`JAX_CACHE_DIR` below): a program that
another module, another xdist worker or an earlier `make test` compiled is loaded, not compiled
again. `KVJAX_TEST_JAX_CACHE=0` turns it off.

Markers: `slow` (pyproject) - notebooks, training runs and multi-device subprocesses;
`pytest -m "not slow"` (make test-fast) skips them, `make test` runs everything.
"""

from __future__ import annotations

import os
from pathlib import Path

# Before JAX is imported, so subprocesses the tests start (the CLI, notebooks) inherit it too.
JAX_CACHE_DIR = Path(__file__).resolve().parents[1] / "build" / "jax-cache"
if os.environ.get("KVJAX_TEST_JAX_CACHE", "1") != "0":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(JAX_CACHE_DIR))
    # Only programs worth keeping: most of the suite's compile time is in a few hundred large
    # ones (an env's rollout, a PPO update), not the thousands of small helpers.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.25")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


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


@pytest.fixture(scope="session")
def hard_env():
    """(env, params) of kv-cache-v0 on the hard tier (default config)."""
    import kvjax

    return kvjax.make("kv-cache-v0", difficulty="hard")


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop every compiled XLA program after each test module.

    Each executable XLA's CPU backend loads holds ~6 memory mappings until its jit cache entry
    goes, and the whole suite compiles thousands of programs in one process: kept, they pass
    Linux's default `vm.max_map_count` (65,530) about 40 minutes in, and the next compile dies
    inside XLA (a segfault or an abort, not a Python error). Clearing per module keeps the count
    to what one module compiles; a module that needs a program again recompiles it.
    """
    yield
    jax.clear_caches()
