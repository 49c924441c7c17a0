"""kv-serve-v0's speed benchmark (`kvjax bench --env kv-serve-v0`): simulated engine
iterations per wall second and simulated seconds per wall second of whole batched episodes
(the engine default's rollout program), per preset and batch size, beside the pure-Python
reference; `serve_benchmarks_document` writes docs/serving-benchmarks.md."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from kvjax.bench import fmt_rate, machine_info, time_rollout
from kvjax.serve.env import make

TARGET_BATCH = 4096  # the batch the speed target is stated at

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

    env, params = make(preset=preset, load=0.8, horizon=SERVE_HORIZON)
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
        env, params = make(preset=preset, engine=engine, load=load, horizon=SERVE_HORIZON)
        policy = make_serve_policy("engine_default", env)
        row, outs = time_rollout(policy, env, params, batch, repeats)
        per_call = [
            (float(o["iterations"].sum()), float(np.minimum(o["clock"], SERVE_HORIZON).sum()))
            for o in outs
        ]
        its = statistics.median(i for i, _ in per_call)
        sim = statistics.median(c for _, c in per_call)
        rows.append(
            {
                "preset": preset,
                "batch": batch,
                **row,
                "iterations_per_s": its / row["median_s"],
                "sim_s_per_wall_s": sim / row["median_s"],
                "iterations_per_episode": its / batch,
            }
        )
    ref = {p: serve_reference_iterations_per_s(p) for p in presets}
    for r in rows:
        r["speedup_vs_reference"] = r["iterations_per_s"] / ref[r["preset"]]
    return {
        "machine": machine_info(),
        "env": "kv-serve-v0",
        "config": {
            "engine": engine,
            "load": load,
            "horizon_s": SERVE_HORIZON,
            "repeats": repeats,
            "policy": "engine_default",
        },
        "reference_iterations_per_s": ref,
        "results": rows,
    }


def serve_markdown_table(record: dict[str, Any]) -> str:
    """The kv-serve-v0 record as a markdown table (preset x batch)."""
    lines = [
        "| preset | batch | engine iterations/s | simulated s / wall s | x reference | "
        "s per call | compile s | iterations / episode |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["results"]:
        lines.append(
            f"| {r['preset']} | {r['batch']:,} | {fmt_rate(r['iterations_per_s'])} | "
            f"{r['sim_s_per_wall_s']:,.0f} | {r['speedup_vs_reference']:,.1f}x | "
            f"{r['median_s']:.3f} | {r['compile_s']:.1f} | {r['iterations_per_episode']:,.0f} |"
        )
    lines.append("")
    lines.append(
        "Pure-Python reference (`kvjax.serve.reference`, one scenario): "
        + ", ".join(
            f"{k} {v:,.0f} iterations/s" for k, v in record["reference_iterations_per_s"].items()
        )
    )
    return "\n".join(lines)


def serve_summary_line(record: dict[str, Any]) -> str:
    """The acceptance number: toy at batch 4,096 (target 0.5M iterations/s, 10,000x real
    time on the 2-core machine)."""
    rows = [r for r in record["results"] if r["preset"] == "toy"] or record["results"]
    best = min(rows, key=lambda r: abs(r["batch"] - TARGET_BATCH))
    return (
        f"{best['preset']} @ batch {best['batch']:,}: {best['iterations_per_s']:,.0f} "
        f"engine iterations/s, {best['sim_s_per_wall_s']:,.0f}x real time "
        f"({best['speedup_vs_reference']:,.0f}x the pure-Python reference)"
    )


def serve_benchmarks_document(record: dict, table: str) -> str:
    """The docs/serving-benchmarks.md text for one kv-serve-v0 benchmark record."""
    m, cfg = record["machine"], record["config"]
    return "\n".join(
        [
            "# kv-serve-v0 benchmarks",
            "",
            "Regenerate with `kvjax bench --env kv-serve-v0 --write docs/serving-benchmarks.md`. "
            "One jitted call resets `batch` scenarios and plays whole episodes of "
            f"{cfg['horizon_s']:g} simulated seconds with the engine default "
            f"({cfg['engine']} rules, load {cfg['load']:g}, the synthetic conversation "
            f"workload); median of {cfg['repeats']} calls after a warm-up, compile time "
            "apart. Engine iterations/s counts the simulated engine iterations of all "
            "scenarios per wall second; simulated s / wall s is the simulated time of all "
            "scenarios per wall second.",
            "",
            f"Machine: {m['backend']} / {m['device']} x{m['device_count']}, {m['cpu_count']} CPU "
            f"cores ({m['processor']}), Python {m['python']}, jax {m['jax']}; 1-minute load "
            f"average at the end of the run {m['load_avg_1m']}.",
            "",
            table,
            "",
            f"Headline: {serve_summary_line(record)}.",
            "",
            "Target (kv-serve-v0 issue): `toy` at 0.5M engine iterations/s at batch 4,096 on the "
            "2-core machine (10,000x real time).",
            "",
        ]
    )
