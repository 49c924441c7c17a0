"""Evaluate baselines per difficulty tier and render the leaderboard (docs/leaderboard.md).

`evaluate(...)` runs each policy on the same scenarios of each tier (same key: common random
numbers, so differences between policies are not scenario noise). Each policy compiles once:
the tier is a traced parameter. Intervals are mean +- 1.96 standard errors (normal
approximation; 4,096 scenarios per tier by default).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

import kvjax
from kvjax.cache.policies import POLICY_NAMES, UPPER_BOUNDS, make_policy
from kvjax.cache.rewards import COMPONENTS
from kvjax.rollout import rollout, summarize_results

TIERS = ("easy", "medium", "hard")
COLUMNS = ("total", *COMPONENTS)
SHORT = {
    "total": "total",
    "failure_penalty": "failure",
    "throughput_reward": "throughput",
    "headroom_bonus": "headroom",
    "memory_efficiency": "mem. eff.",
    "eviction_quality": "evict. quality",
    "latency_penalty": "latency",
    "risky_eviction_penalty": "risky evict.",
}


def label(name: str) -> str:
    """Policy name for tables: policies that read the future are marked as such."""
    return f"{name} (reads the future)" if name in UPPER_BOUNDS else name


def evaluate(
    policies: Sequence[str] = POLICY_NAMES,
    tiers: Sequence[str] = TIERS,
    num_scenarios: int = 4096,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, dict[str, dict[str, np.ndarray]]], dict[str, float]]:
    """Run every policy on every tier. Returns ({policy: {tier: per-scenario results}},
    {policy: env-steps/s after its first (compiling) tier})."""
    for t in tiers:
        kvjax.difficulty_index(t)  # ValueError naming the allowed tiers
    env, params = kvjax.make("kv-cache-v0")
    key = jax.random.PRNGKey(seed)
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    speed: dict[str, float] = {}
    bar = tqdm(total=len(policies) * len(tiers), desc="evaluate", disable=not progress)
    for name in policies:
        policy = make_policy(name, env)
        out[name] = {}
        steps, secs = 0, 0.0
        for i, tier in enumerate(tiers):
            bar.set_postfix_str(f"{name}/{tier}")
            p = params.replace(difficulty=kvjax.difficulty_index(tier))
            t0 = time.perf_counter()
            out[name][tier] = rollout(policy, key, num_scenarios, p, env, progress=False)
            bar.update()
            if i > 0 or len(tiers) == 1:  # the first tier pays the compile
                secs += time.perf_counter() - t0
                steps += num_scenarios * env.config.episode_len
        speed[name] = steps / secs if secs > 0 else float("nan")
    bar.close()
    return out, speed


def table_rows(results: dict[str, dict[str, dict[str, np.ndarray]]], tier: str,
               columns: Sequence[str] = COLUMNS) -> list[dict[str, Any]]:
    """Rows {policy, <column>: (mean, ci95)} for one tier, best mean total first."""
    rows = []
    for name, per_tier in results.items():
        s = summarize_results(per_tier[tier])
        rows.append({"policy": name, **{c: (s[c]["mean"], s[c]["ci95"]) for c in columns}})
    return sorted(rows, key=lambda r: -r["total"][0])


def markdown(results: dict[str, dict[str, dict[str, np.ndarray]]],
             columns: Sequence[str] = COLUMNS) -> str:
    """One markdown table per tier: mean +- 95% half-interval of every rubric component."""
    parts = []
    for tier in next(iter(results.values())):
        parts.append(f"### {tier}\n")
        parts.append("| policy | " + " | ".join(SHORT.get(c, c) for c in columns) + " |")
        parts.append("|---|" + "---:|" * len(columns))
        for r in table_rows(results, tier, columns):
            cells = " | ".join(f"{r[c][0]:+.3f} ± {r[c][1]:.3f}" for c in columns)
            parts.append(f"| {label(r['policy'])} | {cells} |")
        parts.append("")
    return "\n".join(parts)


def console_table(results: dict[str, dict[str, dict[str, np.ndarray]]]) -> str:
    """A compact plain-text leaderboard: total (95% interval) per tier, plus failures."""
    tiers = list(next(iter(results.values())))
    head = f"{'policy':<26}" + "".join(f"{t:>24}" for t in tiers)
    lines = [head, "-" * len(head)]
    order = sorted(results, key=lambda n: -np.mean(results[n][tiers[-1]]["total"]))
    for name in order:
        cells = ""
        for t in tiers:
            s = summarize_results(results[name][t])
            cells += f"{s['total']['mean']:>+11.3f} ± {s['total']['ci95']:.3f}  f={s['total_failures_metric']['mean']:4.2f}"  # noqa: E501
        lines.append(f"{label(name):<26}{cells}")
    lines.append("(mean rubric total ± 95% half-interval; f = mean failures per episode)")
    return "\n".join(lines)


def document(results, num_scenarios: int, seed: int, speed: dict[str, float] | None = None,
             note: str = "") -> str:
    """The full docs/leaderboard.md text."""
    head = [
        "# Leaderboard",
        "",
        "Regenerate with `kvjax leaderboard` (writes this file). Every baseline of "
        "`kvjax.cache.policies` on the same "
        f"{num_scenarios:,} scenarios per tier (seed {seed}); each cell is the mean over "
        "scenarios ± the half-width of its 95% interval (1.96 standard errors). `total` is the "
        "weighted rubric total (the episode return); the other columns are the unweighted "
        "rubric components (weights: failure 0.40, throughput 0.25, headroom 0.18, memory "
        "efficiency 0.07, eviction quality 0.05, latency 0.03, risky eviction 0.02). Rows are "
        "sorted by mean total. The oracle reads the scenario's future arrivals: not a "
        "deployable policy, and an upper bound on the heuristics it improves only (a learned "
        "policy beats it, docs/training.md).",
        "",
    ]
    if note:
        head += [note, ""]
    body = markdown(results)
    tail = []
    if speed:
        tail = ["", "Rollout speed during this run (env-steps/s incl. reset, after compile; "
                "machine shared, so indicative only): "
                + ", ".join(f"{k} {v:,.0f}" for k, v in speed.items()), ""]
    return "\n".join(head) + "\n" + body + "\n".join(tail)


__all__ = ["TIERS", "console_table", "document", "evaluate", "label", "markdown", "table_rows"]
