"""Throughput benchmark: env-steps/s of whole batched episodes, per policy and batch size.

One measurement = one jitted call that resets `batch` scenarios and plays their `episode_len`
steps with the policy (the rollout engine's program, `kvjax.rollout`), timed after
`block_until_ready`; the median of `repeats` calls is reported, compile time apart. In the same
run the pure-Python reference (`kvjax.cache.reference.run_episode`, one scenario at a time)
is timed on the same kind of scenarios, and the speedup is JAX steps/s over reference steps/s.

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
from kvjax.cache.policies import make_policy
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
    row, _ = time_rollout(policy, env, params, batch, repeats, seed)
    row["steps_per_s"] = batch * env.config.episode_len / row["median_s"]
    row["path"] = "batch-trailing" if getattr(policy, "batch_polymorphic", False) else "vmap"
    return row


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


STANDARD_STEPS = 90  # steps per standard-path call: 6 kv-cache-v0 episodes, auto-resets included
GYMNAX_BASELINE = "Asterix-MinAtar"


def standard_path_program(env: Any, params: Any, batch: int, steps: int = STANDARD_STEPS):
    """What a gymnax / PureJaxRL user writes: `batch` scenarios reset once, then `steps` steps
    of `jax.vmap(env.step)` (auto-reset inside) in a `lax.scan`, with random actions from
    `env.action_space(params).sample` and the observation consumed (summed into the carry with
    the reward, so it cannot be skipped). Works for any gymnax-style env; returns a jitted
    `key -> [batch]` function."""
    space = env.action_space(params)

    def consume(tree: Any) -> jax.Array:
        leaves = jax.tree_util.tree_leaves(tree)
        return sum(jnp.sum(x.reshape(batch, -1).astype(jnp.float32), axis=1) for x in leaves)

    def run(key: jax.Array) -> jax.Array:
        k_reset, key = jax.random.split(key)
        keys = jax.random.split(k_reset, batch)
        _, state = jax.vmap(env.reset, in_axes=(0, None))(keys, params)

        def body(carry, _):
            state, acc, key = carry
            key, k_act, k_step = jax.random.split(key, 3)
            action = jax.vmap(space.sample)(jax.random.split(k_act, batch))
            out = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                jax.random.split(k_step, batch), state, action, params
            )
            obs, state, reward = out[0], out[1], out[2]
            return (state, acc + reward + consume(obs), key), None

        init = (state, jnp.zeros((batch,), jnp.float32), key)
        (_, acc, _), _ = jax.lax.scan(body, init, None, length=steps)
        return acc

    return jax.jit(run)


def gymnax_baseline() -> tuple[Any, Any] | None:
    """gymnax's Asterix-MinAtar (env, params), or None when gymnax is not installed."""
    try:
        import gymnax
    except ImportError:
        return None
    return gymnax.make(GYMNAX_BASELINE)


def time_standard_path(
    batch_sizes: Sequence[int],
    repeats: int = 5,
    difficulty: str = "hard",
    steps: int = STANDARD_STEPS,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Env-steps/s of the standard path (`standard_path_program`) for kv-cache-v0 and, when
    gymnax is installed, gymnax's Asterix-MinAtar, per batch size. The two programs' calls
    alternate (A, B, A, B, ...) so that both see the same machine load, and each row carries
    `x_gymnax`: its rate over Asterix's at the same batch size, measured in the same run.
    One jit on the default device (what a user's jit gets), compile time apart."""
    env, params = kvjax.make("kv-cache-v0", difficulty=difficulty)
    envs = [("kv-cache-v0", env, params)]
    baseline = gymnax_baseline()
    if baseline is not None:
        envs.append((f"gymnax {GYMNAX_BASELINE}", *baseline))
    rows = []
    for batch in tqdm(batch_sizes, desc="bench standard path", disable=not progress):
        fns, compile_s = [], []
        for _, e, p in envs:
            fn = standard_path_program(e, p, batch, steps)
            t0 = time.perf_counter()
            jax.block_until_ready(fn(jax.random.PRNGKey(0)))  # compile and warm-up
            compile_s.append(time.perf_counter() - t0)
            fns.append(fn)
        times: list[list[float]] = [[] for _ in envs]
        for r in range(repeats):
            for i, fn in enumerate(fns):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(jax.random.PRNGKey(r + 1)))
                times[i].append(time.perf_counter() - t0)
        medians = [statistics.median(t) for t in times]
        for (name, _, _), med, ts, cs in zip(envs, medians, times, compile_s, strict=True):
            rows.append({
                "env": name, "batch": batch, "steps": steps, "median_s": med, "min_s": min(ts),
                "compile_s": cs, "steps_per_s": batch * steps / med,
                "x_gymnax": (medians[-1] / med) if baseline is not None else None,
            })
    return rows


def reference_steps_per_s(
    num_episodes: int = 32, params: Any = None, seed: int = 0, policy: str = "keep"
) -> float | None:
    """Env-steps/s of the pure-Python reference (`kvjax.cache.reference`), or None without it."""
    try:
        from kvjax.cache import reference
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
    standard: bool = True,
) -> dict[str, Any]:
    """Time every (policy, batch size) through the rollout engine, and (`standard`) the
    standard path - `vmap(env.step)` with auto-reset, observation consumed - beside gymnax's
    Asterix-MinAtar when gymnax is installed; return one JSON-ready record."""
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
    std_rows = time_standard_path(batch_sizes, repeats, progress=progress) if standard else []
    asterix = {r["batch"]: r for r in std_rows if r["env"] != "kv-cache-v0"}
    for r in rows:  # the rollout engine against Asterix's standard path, same run
        base = asterix.get(r["batch"])
        r["x_gymnax"] = r["steps_per_s"] / base["steps_per_s"] if base else None
    cfg = env.config
    return {
        "standard_path": std_rows,
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
    std = record.get("standard_path") or []
    if std:
        lines += [
            "",
            f"Standard path (`vmap(env.step)` with auto-reset in a `lax.scan` of "
            f"{std[0]['steps']} steps, random actions from `action_space(params).sample`, "
            "observation and reward summed into the carry; kv-cache-v0 on the hard tier; one "
            "jit on one device; calls of the two envs alternate):",
            "",
            "| env | batch | env-steps/s (median) | s per call | compile s | x Asterix |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in std:
            x = r.get("x_gymnax")
            lines.append(
                f"| {r['env']} | {r['batch']:,} | {_fmt_rate(r['steps_per_s'])} | "
                f"{r['median_s']:.4f} | {r['compile_s']:.1f} | "
                f"{'-' if x is None else f'{x:.2f}x'} |"
            )
    lines.append("")
    lines.append(
        "Pure-Python reference (`kvjax.cache.reference.run_episode`, one scenario at a time): "
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
    line = (f"{best['policy']} @ batch {best['batch']:,}: {best['steps_per_s']:,.0f} env-steps/s"
            + ("" if sp is None else f" ({sp:,.0f}x the pure-Python reference")
            + ("" if best.get("x_gymnax") is None else f", {best['x_gymnax']:.2f}x Asterix's "
               "standard path") + ("" if sp is None else ")"))
    std = [r for r in record.get("standard_path") or [] if r["env"] == "kv-cache-v0"]
    if std:
        s = min(std, key=lambda r: abs(r["batch"] - TARGET_BATCH))
        line += (f"; standard path vmap(env.step) @ batch {s['batch']:,}: "
                 f"{s['steps_per_s']:,.0f} env-steps/s"
                 + ("" if s.get("x_gymnax") is None else f" ({s['x_gymnax']:.2f}x Asterix)"))
    return line


SERVE_PRESETS = ("toy", "h100-llama3-8b")
# Batch sizes per table size on CPU: a large preset's step holds [S, S] order matrices per
# scenario (S = 512 for h100-llama3-8b), so thousands of them do not fit a 2-core machine.
SERVE_CPU_BATCHES = {64: (1, 64, 1024, 4096), 0: (1, 16, 64)}
SERVE_ACCEL_BATCHES = (1, 1024, 16384, 65536)
SERVE_HORIZON = 5.0  # simulated seconds per benchmark episode (a rate, not an outcome)


def serve_reference_iterations_per_s(preset: str, seconds: float = 2.0, seed: int = 0) -> float:
    """Engine iterations/s of kv-serve-v0's pure-Python reference (one scenario, no-op actions)
    on a preset, over at least `seconds` of wall time."""
    from kvjax.serve import reference

    env, params = kvjax.make("kv-serve-v0", preset=preset, load=0.8, horizon=SERVE_HORIZON)
    _, state = jax.jit(env.reset_env)(jax.random.PRNGKey(seed), params)
    ref = reference.ReferenceEngine.from_state(state, params, env.config)
    noop = jax.tree_util.tree_map(np.asarray, env.noop_action())
    iterations, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        before = ref.clock
        ref.step(noop)
        iterations += env.config.iterations_per_step
        if ref.clock >= SERVE_HORIZON or ref.clock == before:
            break
    return iterations / (time.perf_counter() - t0)


def run_serve_benchmark(
    presets: Sequence[str] = SERVE_PRESETS,
    batch_sizes: Sequence[int] | None = None,
    repeats: int = 3,
    engine: str = "vllm",
    load: float = 0.8,
    progress: bool = True,
) -> dict[str, Any]:
    """kv-serve-v0 speed: simulated engine iterations per wall second and simulated seconds per
    wall second, per preset and batch size (the engine default's whole episodes of
    SERVE_HORIZON simulated seconds), with the pure-Python reference's rate in the same run."""
    from kvjax.serve.policies import make_policy as make_serve_policy
    from kvjax.serve.presets import PRESETS

    accel = jax.default_backend() != "cpu"

    def sizes(preset: str) -> tuple[int, ...]:
        if batch_sizes:
            return tuple(int(b) for b in batch_sizes)
        if accel:
            return SERVE_ACCEL_BATCHES
        rows = PRESETS[preset]["config"]["max_requests"]
        return SERVE_CPU_BATCHES.get(rows, SERVE_CPU_BATCHES[0])

    if any(b < 1 for p in presets for b in sizes(p)) or repeats < 1:
        raise ValueError(f"batch sizes and repeats must be >= 1, got {batch_sizes}, {repeats}")
    rows = []
    jobs = [(p, b) for p in presets for b in sizes(p)]
    for preset, batch in tqdm(jobs, desc="bench kv-serve-v0", disable=not progress):
        env, params = kvjax.make("kv-serve-v0", preset=preset, engine=engine, load=load,
                                 horizon=SERVE_HORIZON)
        policy = make_serve_policy("engine_default", env)
        row, outs = time_rollout(policy, env, params, batch, repeats)
        per_call = [(float(o["iterations"].sum()), float(np.minimum(
            o["clock"], SERVE_HORIZON).sum())) for o in outs]
        its = statistics.median(i for i, _ in per_call)
        sim = statistics.median(c for _, c in per_call)
        rows.append({"preset": preset, "batch": batch, **row,
                     "iterations_per_s": its / row["median_s"],
                     "sim_s_per_wall_s": sim / row["median_s"],
                     "iterations_per_episode": its / batch})
    ref = {p: serve_reference_iterations_per_s(p) for p in presets}
    for r in rows:
        r["speedup_vs_reference"] = r["iterations_per_s"] / ref[r["preset"]]
    return {"machine": machine_info(), "env": "kv-serve-v0",
            "config": {"engine": engine, "load": load, "horizon_s": SERVE_HORIZON,
                       "repeats": repeats, "policy": "engine_default"},
            "reference_iterations_per_s": ref, "results": rows}


def serve_markdown_table(record: dict[str, Any]) -> str:
    """The kv-serve-v0 record as a markdown table (preset x batch)."""
    lines = [
        "| preset | batch | engine iterations/s | simulated s / wall s | x reference | "
        "s per call | compile s | iterations / episode |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["results"]:
        lines.append(
            f"| {r['preset']} | {r['batch']:,} | {_fmt_rate(r['iterations_per_s'])} | "
            f"{r['sim_s_per_wall_s']:,.0f} | {r['speedup_vs_reference']:,.1f}x | "
            f"{r['median_s']:.3f} | {r['compile_s']:.1f} | {r['iterations_per_episode']:,.0f} |")
    lines.append("")
    lines.append("Pure-Python reference (`kvjax.serve.reference`, one scenario): " + ", ".join(
        f"{k} {v:,.0f} iterations/s" for k, v in record["reference_iterations_per_s"].items()))
    return "\n".join(lines)


def serve_summary_line(record: dict[str, Any]) -> str:
    """The acceptance number: toy at batch 4,096 (target 0.5M iterations/s, 10,000x real
    time on the 2-core machine)."""
    rows = [r for r in record["results"] if r["preset"] == "toy"] or record["results"]
    best = min(rows, key=lambda r: abs(r["batch"] - TARGET_BATCH))
    return (f"{best['preset']} @ batch {best['batch']:,}: {best['iterations_per_s']:,.0f} "
            f"engine iterations/s, {best['sim_s_per_wall_s']:,.0f}x real time "
            f"({best['speedup_vs_reference']:,.0f}x the pure-Python reference)")


__all__ = ["BENCH_POLICIES", "default_batch_sizes", "standard_path_program",
           "time_standard_path", "gymnax_baseline", "markdown_table", "reference_steps_per_s",
           "run_benchmark", "run_serve_benchmark", "serve_markdown_table", "serve_summary_line",
           "summary_line", "time_policy", "time_rollout", "machine_info"]
