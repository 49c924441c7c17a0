"""The heuristic baselines against the engine default, paired (docs/serving.md section 11).

    python scripts/measure_serve_baselines.py [--preset toy] [--workload agentic]
        [--horizon 60] [--scenarios 8] [--loads 0.9 1.1] [--set gpu_pool_tokens=40000]
        [--json out.json]

Every policy runs the same scenarios (the same key); prints a markdown table per load: goodput,
hit rate, p99 TTFT (means over scenarios) and the paired goodput difference against
engine_default (mean ± 95% interval over scenarios), plus the commands each policy issued.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

import kvjax
from kvjax.rollout import rollout
from kvjax.serve.policies import SERVE_POLICY_NAMES, make_policy

BASELINES = tuple(n for n in SERVE_POLICY_NAMES if n != "random")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--workload", default="agentic")
    ap.add_argument("--horizon", type=float, default=60.0)
    ap.add_argument("--scenarios", type=int, default=8)
    ap.add_argument("--loads", type=float, nargs="+", default=[0.9, 1.1])
    ap.add_argument("--policies", nargs="+", default=list(BASELINES))
    ap.add_argument("--set", nargs="*", default=[], help="ServeParams overrides NAME=NUMBER")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    over = {k: float(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    rows = []
    print(
        f"{args.preset}, {args.workload}, vLLM rules, {args.horizon:g} s, "
        f"{args.scenarios} paired scenarios {over or ''}\n"
    )
    for load in args.loads:
        env, p = kvjax.make(
            "kv-serve-v0",
            preset=args.preset,
            workload=args.workload,
            load=load,
            horizon=args.horizon,
            **over,
        )
        print(f"load {load:g}\n")
        print(
            "| policy | goodput req/s | Δ goodput vs default | hit rate | p99 TTFT s | "
            "preemptions/s | offloads | invalid | s |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        base = None
        for name in args.policies:
            t0 = time.perf_counter()
            res = rollout(
                make_policy(name, env),
                jax.random.PRNGKey(0),
                args.scenarios,
                p,
                env,
                progress=False,
            )
            g = np.asarray(res["goodput"], np.float64)
            base = g if base is None else base
            d = g - base
            ci = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
            row = dict(
                load=load,
                policy=name,
                seconds=time.perf_counter() - t0,
                **{k: float(np.mean(res[k])) for k in res if np.ndim(res[k]) == 1},
                delta_goodput=float(d.mean()),
                delta_ci95=float(ci),
            )
            rows.append(row)
            print(
                f"| {name} | {g.mean():.3f} | {d.mean():+.3f} ± {ci:.3f} | "
                f"{row['hit_rate']:.3f} | {row['p99_ttft']:.2f} | "
                f"{row['preemptions_per_s']:.2f} | {row['offloads']:.1f} | "
                f"{row['invalid_commands']:.0f} | {row['seconds']:.0f} |",
                flush=True,
            )
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
