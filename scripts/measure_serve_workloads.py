"""The engine default on every kv-serve-v0 workload at several loads (docs/serving.md section 10).

    python scripts/measure_serve_workloads.py [--preset h100-llama3-8b] [--horizon 120]
        [--scenarios 8] [--loads 0.6 0.9 1.1] [--json out.json]

Prints a markdown table: offered rate, goodput, SLO attainment, prefix hit rate, p99 TTFT and
TPOT, preemptions/s (means over scenarios, 95% intervals on goodput and hit rate).
"""

from __future__ import annotations

import argparse
import json
import time

import jax

import kvjax
from kvjax.rollout import rollout, summarize_results
from kvjax.serve.policies import make_policy

WORKLOADS = (
    "synthetic",
    "azure-conv",
    "azure-code",
    "mooncake-conv",
    "mooncake-synthetic",
    "agentic",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="h100-llama3-8b")
    ap.add_argument("--horizon", type=float, default=120.0)
    ap.add_argument("--scenarios", type=int, default=8)
    ap.add_argument("--loads", type=float, nargs="+", default=[0.6, 0.9, 1.1])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    print(
        f"{args.preset}, vLLM rules, engine default, {args.horizon:g} s, "
        f"{args.scenarios} scenarios\n"
    )
    print(
        "| workload | load | offered req/s | goodput req/s | SLO attainment | hit rate | "
        "p99 TTFT s | p99 TPOT ms | preemptions/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.workloads:
        for load in args.loads:
            t0 = time.perf_counter()
            env, p = kvjax.make(
                "kv-serve-v0", preset=args.preset, workload=name, load=load, horizon=args.horizon
            )
            res = rollout(
                make_policy("engine_default", env),
                jax.random.PRNGKey(0),
                args.scenarios,
                p,
                env,
                progress=False,
            )
            s = summarize_results(res)
            offered = float(p.arrival_rate) * float(p.calls_per_arrival)
            row = dict(
                workload=name,
                load=load,
                offered=offered,
                seconds=time.perf_counter() - t0,
                **{k: s[k] for k in s},
            )
            rows.append(row)
            print(
                f"| {name} | {load:g} | {offered:.2f} | {s['goodput']['mean']:.2f} ± "
                f"{s['goodput']['ci95']:.2f} | {s['slo_attainment']['mean']:.3f} | "
                f"{s['hit_rate']['mean']:.3f} ± {s['hit_rate']['ci95']:.3f} | "
                f"{s['p99_ttft']['mean']:.2f} | {1e3 * s['p99_tpot']['mean']:.0f} | "
                f"{s['preemptions_per_s']['mean']:.2f} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
