"""Shared test helpers and fixtures.

Folders mirror the package: cache/ (kvjax/cache), serve/ (kvjax/serve), harness/ (the floor,
the CLI, the trainer, docs); harness/conftest.py holds tiny shared envs. Pytree comparisons:
`from trees import assert_trees_equal, trees_equal` (tests/trees.py).

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
    # Every program (~4,600, ~110 MB): a clean clone's run took 12:57 caching all of them
    # against 14:43 caching only those compiling in 0.25 s or more (2 cores, idle machine).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402


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
