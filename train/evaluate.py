"""Evaluate a trained PPO checkpoint next to every baseline on held-out scenarios.

    python -m train.evaluate train/checkpoints/ppo_medium_hard.msgpack \
        --difficulty hard medium --num-scenarios 1024 --out docs/ppo_eval.md

Scenarios come from the rollout engine (`kvjax.rollout.rollout`): scenario i of a tier uses
`fold_in(PRNGKey(eval_seed), i)`. Training draws its scenarios from `PRNGKey(seed)` split chains
(seeds 0, 1, ...), so with the default `eval_seed` the evaluation scenarios are ones training
never used. Every policy sees the same scenarios, so differences are paired: the table gives
each policy's mean rubric total with a 95% interval, and the PPO policy's paired difference to
the best non-oracle baseline with its own 95% interval.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import jax
import numpy as np

import kvjax
from kvjax.env import KVCacheEnv
from kvjax.validation import (
    ArgumentParser,
    check_writable_file,
    fail,
    positive_int,
    seed_arg,
)

EVAL_SEED = 1_000_003  # never a training seed
Z95 = 1.959964


def mean_ci(x: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% interval."""
    x = np.asarray(x, np.float64)
    if x.size < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(Z95 * x.std(ddof=1) / math.sqrt(x.size))


def baseline_policies(include_oracle: bool = True) -> dict[str, Any]:
    """name -> policy from kvjax.policies (oracle last, when included)."""
    from kvjax import policies

    names = [n for n in policies.POLICY_NAMES if include_oracle or n != "oracle"]
    return {n: policies.POLICIES[n] for n in names}


def evaluate(
    policies: dict[str, Any], difficulties: list[str], num_scenarios: int,
    eval_seed: int = EVAL_SEED, env: KVCacheEnv | None = None, progress: bool = True,
) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """-> results[difficulty][policy] = rollout dict of per-scenario arrays."""
    from kvjax.rollout import rollout

    env = env or KVCacheEnv()
    key = jax.random.PRNGKey(eval_seed)
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for diff in difficulties:
        params = env.default_params.replace(difficulty=kvjax.difficulty_index(diff))
        out[diff] = {}
        for name, pol in policies.items():
            if progress:
                print(f"[evaluate] {diff:6s} {name}", file=sys.stderr, flush=True)
            out[diff][name] = rollout(pol, key, num_scenarios, params, env, progress=progress)
    return out


def table(results: dict[str, dict[str, dict[str, np.ndarray]]], learned: str = "ppo") -> str:
    """Markdown comparison: mean total +- 95% CI, failures, and the learned policy's paired
    difference to the best non-oracle baseline (and to the oracle)."""
    lines = []
    for diff, res in results.items():
        n = len(next(iter(res.values()))["total"])
        baselines = [p for p in res if p not in (learned, "oracle")]
        best = max(baselines, key=lambda p: res[p]["total"].mean()) if baselines else None
        lines += [f"### {diff} ({n} held-out scenarios)", "",
                  "| policy | rubric total (mean ± 95% CI) | failures / episode | invalid |",
                  "|---|---|---|---|"]
        order = sorted(res, key=lambda p: -res[p]["total"].mean())
        for p in order:
            m, h = mean_ci(res[p]["total"])
            f, _ = mean_ci(res[p]["total_failures_metric"])
            tag = " (learned)" if p == learned else (" (reads the future)" if p == "oracle" else "")
            tag += " (best baseline)" if p == best else ""
            inv = int(np.sum(res[p].get("invalid_actions", 0)))
            lines.append(f"| {p}{tag} | {m:.4f} ± {h:.4f} | {f:.3f} | {inv} |")
        lines.append("")
        if learned in res:
            for ref in [best, "oracle"]:
                if ref is None or ref not in res:
                    continue
                d, h = mean_ci(res[learned]["total"] - res[ref]["total"])
                win = float(np.mean(res[learned]["total"] > res[ref]["total"]))
                lines.append(f"- {learned} − {ref}: {d:+.4f} ± {h:.4f} (paired 95% CI); "
                             f"{learned} better on {100 * win:.1f}% of scenarios")
            lines.append("")
    return "\n".join(lines)


def summary(results: dict[str, dict[str, dict[str, np.ndarray]]]) -> dict[str, Any]:
    """JSON-ready means and intervals of every rubric field."""
    out: dict[str, Any] = {}
    for diff, res in results.items():
        out[diff] = {}
        for p, r in res.items():
            out[diff][p] = {k: dict(zip(("mean", "ci95"), mean_ci(v), strict=True))
                            for k, v in r.items() if np.ndim(v) == 1}
    return out


def main(argv: list[str] | None = None) -> int:
    from train.ppo import load_policy, make_policy

    ap = ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="policy.msgpack or checkpoint.msgpack of a train.ppo run")
    ap.add_argument("--seed-index", type=int, default=None,
                    help="which seed of a seed-batched training checkpoint (needed when it "
                    "holds several)")
    ap.add_argument("--difficulty", nargs="+", default=["hard", "medium"],
                    choices=list(kvjax.DIFFICULTIES))
    ap.add_argument("--num-scenarios", type=positive_int, default=1024)
    ap.add_argument("--eval-seed", type=seed_arg, default=EVAL_SEED)
    ap.add_argument("--sample", action="store_true", help="sample actions instead of greedy")
    ap.add_argument("--no-oracle", action="store_true", help="skip the (slow) oracle")
    ap.add_argument("--out", default=None, help="write the markdown table here (and .json)")
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    prog = "python -m train.evaluate"
    if a.num_scenarios < 2:
        return fail(prog, "--num-scenarios must be >= 2 (the intervals need two)")
    try:
        if a.out:  # before any work
            check_writable_file(a.out, "--out")
            check_writable_file(os.path.splitext(a.out)[0] + ".json", "--out (its .json)")
        config, net_params = load_policy(a.checkpoint, a.seed_index)
    except (ValueError, OSError, KeyError) as e:
        return fail(prog, str(e))
    env = KVCacheEnv()
    pols = {"ppo": make_policy(net_params, config, greedy=not a.sample, env=env)}
    pols.update(baseline_policies(include_oracle=not a.no_oracle))
    res = evaluate(pols, a.difficulty, a.num_scenarios, a.eval_seed, env)
    md = table(res)
    print(md)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(md + "\n")
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump(summary(res), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
