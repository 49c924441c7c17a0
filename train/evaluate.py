"""Evaluate a trained PPO checkpoint next to every baseline on held-out scenarios.

    python -m train.evaluate train/checkpoints/ppo_medium_hard.msgpack \
        --difficulty hard medium --num-scenarios 1024 --out docs/ppo_eval.md

Scenarios come from the rollout engine (`kvjax.rollout.rollout`): scenario i of a tier uses
`fold_in(PRNGKey(eval_seed), i)`. Training draws its scenarios from `PRNGKey(seed)` split chains
(seeds 0, 1, ...), so with the default `eval_seed` the evaluation scenarios are ones training
never used. Every policy sees the same scenarios, so differences are paired: the table gives
each policy's mean rubric total with a 95% interval, and the PPO policy's paired difference to
the best non-oracle baseline with its own 95% interval.

A kv-serve-v0 checkpoint (trained with `--env kv-serve-v0`) is evaluated on its training env
(preset, workload, load and overrides from the checkpoint's config; `--load` evaluates at other
loads) next to every policy of `kvjax.serve.policies.SERVE_POLICY_NAMES`, on the same held-out
windows (scenario i: `fold_in(PRNGKey(eval_seed), i)`), with paired 95% intervals of score and
goodput against `engine_default` (`serve_table`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import numpy as np

import kvjax
from kvjax import registry
from kvjax.cache.env import KVCacheEnv
from kvjax.stats import mean_ci
from kvjax.validation import ArgumentParser, check_writable_file, fail, positive_int, seed_arg

EVAL_SEED = 1_000_003  # never a training seed


def baseline_policies(include_oracle: bool = True) -> dict[str, Any]:
    """name -> policy from kvjax.cache.policies (oracle last, when included)."""
    from kvjax.cache import policies

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


# kv-serve-v0 -----------------------------------------------------------------------------------
SERVE_REFERENCE = "engine_default"
SERVE_FUTURE_AWARE = ("belady_offline",)  # reads true output lengths / next uses: labelled


def serve_baselines(env, include_offline: bool = True) -> dict[str, Any]:
    """name -> policy for every kv-serve-v0 policy of SERVE_POLICY_NAMES."""
    from kvjax.serve.policies import SERVE_POLICY_NAMES, make_policy

    names = [n for n in SERVE_POLICY_NAMES if include_offline or n not in SERVE_FUTURE_AWARE]
    return {n: make_policy(n, env) for n in names}


def evaluate_serve(policies: dict[str, Any], env, params, num_scenarios: int,
                   eval_seed: int = EVAL_SEED, progress: bool = True) -> dict[str, Any]:
    """-> results[policy] = kvjax.serve.episode_metrics per scenario (numpy [num_scenarios]);
    every policy plays the same windows."""
    from kvjax.rollout import rollout

    key = jax.random.PRNGKey(eval_seed)
    out = {}
    for name, pol in policies.items():
        if progress:
            print(f"[evaluate] {name}", file=sys.stderr, flush=True)
        out[name] = rollout(pol, key, num_scenarios, params, env, progress=progress)
    return out


def serve_table(res: dict[str, Any], learned: str = "ppo", title: str = "") -> str:
    """Markdown: per policy the mean (± 95% CI) score, goodput, SLO attainment, hit rate,
    p99 TTFT, preemptions/s and invalid commands, and the paired differences of score and
    goodput against engine_default; then the learned policy against the best heuristic."""
    n = len(next(iter(res.values()))["score"])
    ref = res.get(SERVE_REFERENCE)
    lines = [f"### {title}({n} held-out windows)", "",
             "| policy | score | Δ score vs default (paired) | goodput req/s | Δ goodput vs "
             "default (paired) | SLO attainment | hit rate | p99 TTFT s | preemptions/s | "
             "invalid |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in sorted(res, key=lambda p: -res[p]["score"].mean()):
        r = res[p]
        tag = (" (learned)" if p == learned else
               " (reads the future)" if p in SERVE_FUTURE_AWARE else "")
        cells = [f"{p}{tag}", "{:.4f} ± {:.4f}".format(*mean_ci(r["score"]))]
        cells.append("{:+.4f} ± {:.4f}".format(*mean_ci(r["score"] - ref["score"]))
                     if ref is not None and p != SERVE_REFERENCE else "-")
        cells.append("{:.3f} ± {:.3f}".format(*mean_ci(r["goodput"])))
        cells.append("{:+.3f} ± {:.3f}".format(*mean_ci(r["goodput"] - ref["goodput"]))
                     if ref is not None and p != SERVE_REFERENCE else "-")
        cells += [f"{r['slo_attainment'].mean():.3f}", f"{r['hit_rate'].mean():.3f}",
                  f"{r['p99_ttft'].mean():.2f}", f"{r['preemptions_per_s'].mean():.2f}",
                  f"{int(np.sum(r['invalid_commands']))}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    heur = [p for p in res if p not in (learned, SERVE_REFERENCE, "random",
                                        *SERVE_FUTURE_AWARE)]
    best = max(heur, key=lambda p: res[p]["score"].mean()) if heur else None
    if learned in res:
        for other in [p for p in (SERVE_REFERENCE, best) if p in res]:
            d, h = mean_ci(res[learned]["score"] - res[other]["score"])
            win = float(np.mean(res[learned]["score"] > res[other]["score"]))
            lines.append(f"- {learned} − {other}{' (best heuristic)' if other == best else ''}"
                         f": score {d:+.4f} ± {h:.4f} (paired 95% CI); {learned} better on "
                         f"{100 * win:.1f}% of windows")
        lines.append("")
    return "\n".join(lines)


def serve_summary(res: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready means and intervals of every episode metric, per policy."""
    return {p: {k: dict(zip(("mean", "ci95"), mean_ci(v), strict=True))
                for k, v in r.items() if np.ndim(v) == 1} for p, r in res.items()}


def build_parser() -> ArgumentParser:
    """`python -m train.evaluate`'s arguments: the evaluation's, then each env's."""
    from train.agents import agent_class

    ap = ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="policy.msgpack or checkpoint.msgpack of a train.ppo run")
    ap.add_argument("--seed-index", type=int, default=None,
                    help="which seed of a seed-batched training checkpoint (needed when it "
                    "holds several)")
    ap.add_argument("--num-scenarios", type=positive_int, default=1024,
                    help="held-out scenarios per setting (default: 1,024)")
    ap.add_argument("--eval-seed", type=seed_arg, default=EVAL_SEED,
                    help="root seed of the held-out scenarios (default: never a training seed)")
    ap.add_argument("--sample", action="store_true", help="sample actions instead of greedy")
    ap.add_argument("--no-oracle", action="store_true",
                    help="skip the (slow) policies that read the future")
    ap.add_argument("--out", default=None, help="write the markdown table here (and .json)")
    for env_id in registry.env_ids():  # each env's options, for its checkpoints
        agent_class(env_id).add_eval_options(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    from train.agents import agent_class
    from train.ppo import load_policy

    ap = build_parser()
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
        agent = agent_class(config.env)
        envs = agent.eval_envs(a, config)
    except (ValueError, OSError, KeyError) as e:
        return fail(prog, str(e))
    return _write(a.out, *agent.evaluate_checkpoint(a, config, net_params, envs))


def _write(out: str | None, md: str, js: dict[str, Any]) -> int:
    """Print the markdown; with --out also write it and its .json."""
    print(md)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(md + "\n")
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump(js, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
