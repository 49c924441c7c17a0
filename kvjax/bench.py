"""Throughput benchmark: env-steps/s of whole batched episodes, per policy and batch size.

One measurement = one jitted call that resets `batch` scenarios and plays their `episode_len`
steps with the policy (the rollout engine's program, `kvjax.rollout`), timed after
`block_until_ready`; the median of `repeats` calls is reported, compile time apart. In the same
run the pure-Python reference (`kvjax.reference.run_episode`, one scenario at a time) is timed on
the same kind of scenarios, and the speedup is JAX steps/s over reference steps/s.

`run_benchmark(...) -> dict` returns one JSON-ready record; `markdown_table(record)` renders it.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import kvjax
from kvjax.policies import make_policy
from kvjax.rollout import _compiled, _place, default_mesh, default_micro_batch, normalize_params

BENCH_POLICIES = ("keep", "random", "value_aware")
CPU_BATCHES = (1, 64, 1024, 4096, 16384)
ACCEL_BATCHES = (1, 1024, 16384, 65536, 262144, 1048576)
TARGET_BATCH = 4096  # the acceptance batch size (value_aware, 3 actions, 32 slots)


def default_batch_sizes() -> tuple[int, ...]:
    """1..16,384 on CPU; up to 2^20 when an accelerator is present."""
    return CPU_BATCHES if jax.default_backend() == "cpu" else ACCEL_BATCHES


def time_policy(
    name: str, batch: int, repeats: int, env: kvjax.KVCacheEnv, params: Any, seed: int = 0
) -> dict[str, float]:
    """Compile seconds, median / min seconds per call, and env-steps/s for one (policy, batch).

    The batch is split evenly over every device (the rollout engine's 1-D mesh) when it
    divides, into the rollout engine's micro-batches (`default_micro_batch`, at most one
    device's share); `kvjax bench` exposes one XLA CPU device per core
    (`cli.use_all_cpu_cores`)."""
    policy = make_policy(name, env)
    mesh = default_mesh()
    n_dev = mesh.devices.size if batch % mesh.devices.size == 0 else 1
    micro = min(default_micro_batch(batch, policy), batch // n_dev)
    if batch % (micro * n_dev):
        micro = batch // n_dev
    fn = _compiled(policy, env.config, False, mesh if n_dev > 1 else None)
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
    times = []
    for r in range(repeats):
        idx_r = indices((r + 1) * batch)  # fresh scenarios each repeat
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(key, idx_r, params))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    steps = batch * env.config.episode_len
    return {"compile_s": compile_s, "median_s": med, "min_s": min(times),
            "steps_per_s": steps / med, "micro_batch": micro, "devices": n_dev,
            "path": "batch-trailing" if getattr(policy, "batch_polymorphic", False) else "vmap"}


def reference_steps_per_s(
    num_episodes: int = 32, params: Any = None, seed: int = 0, policy: str = "keep"
) -> float | None:
    """Env-steps/s of the pure-Python reference (`kvjax.reference`), or None without it."""
    try:
        from kvjax import reference
    except ImportError:
        return None
    env, default = kvjax.make("kv-cache-v0")
    params = default if params is None else params
    keys = jax.random.split(jax.random.PRNGKey(seed), num_episodes)
    _, states = jax.jit(jax.vmap(env.reset_env, in_axes=(0, None)))(keys, params)
    starts = reference.from_jax_batch(states, params)
    A = env.config.max_actions
    steps, elapsed = 0, 0.0
    for i, (state, ref_params) in enumerate(starts):
        fn = (reference.keep_policy(A) if policy == "keep"
              else reference.random_valid_policy(seed + i, A))
        t0 = time.perf_counter()
        out = reference.run_episode(state, ref_params, fn)
        elapsed += time.perf_counter() - t0
        steps += out["steps"]
    return steps / elapsed


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


def run_benchmark(
    batch_sizes: Sequence[int] | None = None,
    policies: Sequence[str] = BENCH_POLICIES,
    repeats: int = 5,
    difficulty: str = "all",
    reference_episodes: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Time every (policy, batch size); return one JSON-ready record."""
    batch_sizes = tuple(int(b) for b in (batch_sizes or default_batch_sizes()))
    if any(b < 1 for b in batch_sizes) or repeats < 1:
        raise ValueError(f"batch sizes and repeats must be >= 1, got {batch_sizes}, {repeats}")
    env, params = kvjax.make("kv-cache-v0", difficulty=difficulty)
    rows = []
    jobs = [(p, b) for p in policies for b in batch_sizes]
    for name, batch in tqdm(jobs, desc="bench", disable=not progress):
        rows.append({"policy": name, "batch": batch, **time_policy(name, batch, repeats, env,
                                                                    params)})
    ref = {p: reference_steps_per_s(reference_episodes, params, policy=p)
           for p in ("keep", "random")}
    ref_keep = ref["keep"]
    for r in rows:
        base = ref.get(r["policy"]) or ref_keep
        r["speedup_vs_reference"] = (r["steps_per_s"] / base) if base else None
    cfg = env.config
    return {
        "machine": machine_info(),
        "config": {"max_seqs": cfg.max_seqs, "max_actions": cfg.max_actions,
                   "episode_len": cfg.episode_len, "difficulty": difficulty,
                   "repeats": repeats},
        "reference_steps_per_s": ref,
        "results": rows,
    }


def _fmt_rate(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x / 1e6:.2f}M" if x >= 1e5 else f"{x:,.0f}"


def markdown_table(record: dict[str, Any]) -> str:
    """The record as a markdown table (policy x batch), compile time apart, plus the reference."""
    lines = [
        "| policy | batch | env-steps/s (median) | s per call | compile s | x reference | path |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in record["results"]:
        sp = r.get("speedup_vs_reference")
        lines.append(
            f"| {r['policy']} | {r['batch']:,} | {_fmt_rate(r['steps_per_s'])} | "
            f"{r['median_s']:.4f} | {r['compile_s']:.1f} | "
            f"{'-' if sp is None else f'{sp:,.0f}x'} | {r.get('path', '-')} |"
        )
    ref = record["reference_steps_per_s"]
    lines.append("")
    lines.append(
        "Pure-Python reference (`kvjax.reference.run_episode`, one scenario at a time): "
        + ", ".join(f"{k} {_fmt_rate(v)} env-steps/s" for k, v in ref.items())
        + " (speedups compare like policies; value_aware is compared with reference keep)."
    )
    return "\n".join(lines)


def summary_line(record: dict[str, Any]) -> str:
    """One line: the acceptance number (value_aware at batch 4,096) and its speedup."""
    rows = [r for r in record["results"] if r["policy"] == "value_aware"]
    if not rows:
        rows = record["results"]
    best = min(rows, key=lambda r: abs(r["batch"] - TARGET_BATCH))
    sp = best.get("speedup_vs_reference")
    return (f"{best['policy']} @ batch {best['batch']:,}: {best['steps_per_s']:,.0f} env-steps/s"
            + ("" if sp is None else f" ({sp:,.0f}x the pure-Python reference)"))


__all__ = ["BENCH_POLICIES", "default_batch_sizes", "markdown_table", "reference_steps_per_s",
           "run_benchmark", "summary_line", "time_policy", "machine_info"]
