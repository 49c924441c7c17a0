"""The benchmark floor every env's `kvjax bench` uses: time the rollout engine's program for a
batch of whole episodes (compile time apart, median of repeated calls after a warm-up), a
same-process A/B of several programs, what machine the numbers came from, and benchmark
documents whose hand-written notes survive regeneration.

Each env's benchmark (its rows, baselines, targets and document) is in its package:
kvjax/cache/bench.py, kvjax/serve/bench.py; `kvjax bench --env ID` runs it (kvjax.registry).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from kvjax.base import normalize_params
from kvjax.rollout import _compiled, _place, default_mesh, default_micro_batch


def time_rollout(
    policy, env: Any, params: Any, batch: int, repeats: int, seed: int = 0
) -> tuple[dict[str, float], list[dict[str, np.ndarray]]]:
    """Time the rollout engine's program for `batch` whole episodes of any kvjax env: compile
    seconds apart, then a warm-up and `repeats` calls on fresh scenarios. Returns the timing
    row and each timed call's per-scenario results."""
    mesh = default_mesh()
    n_dev = mesh.devices.size if batch % mesh.devices.size == 0 else 1
    micro = min(default_micro_batch(batch, policy, env), batch // n_dev)
    if batch % (micro * n_dev):
        micro = batch // n_dev
    fn = _compiled(policy, type(env), env.config, False, mesh if n_dev > 1 else None)
    params = normalize_params(params)
    key = jax.random.PRNGKey(seed)

    def indices(offset: int) -> jax.Array:
        idx = np.arange(offset, offset + batch, dtype=np.int32).reshape(batch // micro, micro)
        return _place(idx, mesh) if n_dev > 1 else jnp.asarray(idx)

    idx = indices(0)
    t0 = time.perf_counter()
    compiled = fn.lower(key, idx, params).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(key, idx, params))  # warm-up
    times, outs = [], []
    for r in range(repeats):
        idx_r = indices((r + 1) * batch)  # fresh scenarios each repeat
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(key, idx_r, params))
        times.append(time.perf_counter() - t0)
        outs.append(jax.tree_util.tree_map(np.asarray, out))
    row = {"compile_s": compile_s, "median_s": statistics.median(times), "min_s": min(times),
           "micro_batch": micro, "devices": n_dev}
    return row, outs


def ab_medians(
    fns: dict[str, Any], repeats: int = 15, progress: bool = False
) -> dict[str, dict[str, float]]:
    """Same-process A/B: each of `fns` (name -> zero-argument callable returning jax arrays)
    is called once to compile and warm up, then the calls alternate (A, B, C, A, B, C, ...)
    `repeats` times so that every candidate sees the same machine load; returns per name the
    median and min seconds per call and its ratio to the first candidate's median."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in tqdm(range(repeats), desc="A/B", disable=not progress):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(next(iter(times.values())))
    return {
        name: {"median_s": statistics.median(ts), "min_s": min(ts),
               "x_first": statistics.median(ts) / base}
        for name, ts in times.items()
    }


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    dev = jax.devices()[0]
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return {
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "load_avg_1m": round(load, 2),
    }


def fmt_rate(x: float | None) -> str:
    """A rate for a table (1.23M, or 4,567 below 100K); a dash when it was not measured."""
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x / 1e6:.2f}M" if x >= 1e5 else f"{x:,.0f}"


# In a benchmark document, everything from this line on is hand-written (measurements, profiles,
# designs tried) and survives `kvjax bench --write`, which regenerates only what is above it.
NOTES_MARKER = "<!-- hand-written notes below: kept by `kvjax bench --write` -->"


def write_keeping_notes(path: Path, generated: str) -> None:
    """Write `generated` to `path`, followed by the hand-written notes of the file already
    there (from NOTES_MARKER on; none when the file or the marker is absent)."""
    old = path.read_text() if path.is_file() else ""
    notes = old[old.index(NOTES_MARKER):] if NOTES_MARKER in old else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(generated.rstrip("\n") + "\n\n" + notes if notes else generated)


__all__ = [
    "NOTES_MARKER",
    "ab_medians",
    "fmt_rate",
    "machine_info",
    "time_rollout",
    "write_keeping_notes",
]
