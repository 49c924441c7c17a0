"""Capacity at an SLO and load sweeps of the kv-serve-v0 baselines (docs/serving-capacity.md).

    python scripts/measure_serve_capacity.py [--preset toy] [--workloads synthetic agentic]
        [--policies engine_default ...] [--horizon 60] [--scenarios 6]
        [--agentic-scenarios 4] [--grid 0.5 1 1.5 2 3 4] [--tol 0.0625]
        [--target 0.9] [--set NAME=NUMBER ...]
        [--write docs/serving-capacity.md] [--plot docs/serving_capacity.png] [--json out.json]
        [--title TEXT] [--append]

For each workload and policy: a load sweep over the grid (goodput and SLO attainment with 95%
intervals over scenarios) and the capacity - the largest load at which >= target of the
requests meet both SLOs (kvjax.serve.sweep: attainment over decided requests, grid bracket then
bisection). Every policy and load plays the same scenarios (common random numbers). Prints
markdown, writes it to --write and plots goodput and attainment against load, one line per
policy, to --plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import kvjax  # noqa: E402
from kvjax.serve import sweep  # noqa: E402
from kvjax.serve.env import parse_overrides  # noqa: E402
from kvjax.serve.policies import SERVE_POLICY_NAMES, make_policy  # noqa: E402
from kvjax.serve.sweep import format_capacity as fmt_cap  # noqa: E402

BASELINES = tuple(n for n in SERVE_POLICY_NAMES if n != "random")
GRID = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def run(args) -> dict:
    over = parse_overrides(args.set)
    results = {}
    pairs = [(w, p) for w in args.workloads for p in args.policies]
    bar = tqdm(pairs, desc="capacity")
    for w, name in bar:
        bar.set_postfix_str(f"{w} {name}")
        env, unit = kvjax.make(
            "kv-serve-v0", preset=args.preset, workload=w, load=1.0, horizon=args.horizon, **over
        )
        t0 = time.perf_counter()
        runner = sweep.LoadRunner(
            make_policy(name, env),
            env,
            unit,
            num_scenarios=(args.agentic_scenarios or args.scenarios)
            if w == "agentic"
            else args.scenarios,
            seed=args.seed,
            max_load=max(args.grid),
        )
        rows = sweep.load_sweep(runner, args.grid)
        cap = sweep.capacity(runner, args.grid, target=args.target, tol=args.tol)
        results[(w, name)] = dict(
            rows=rows,
            capacity=cap,
            # every load evaluated (grid and bisection) for the plot
            points=[sweep.summarize(x, runner) for x in runner.evaluated],
            seconds=time.perf_counter() - t0,
        )
    return results


def markdown(args, results: dict, wall: float, load_avg: tuple) -> str:
    cmd = "python scripts/measure_serve_capacity.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    overrides = f", overrides {parse_overrides(args.set)}" if args.set else ""
    fewer = (
        f"; agentic: {args.agentic_scenarios} scenarios"
        if args.agentic_scenarios and "agentic" in args.workloads
        else ""
    )
    lines = [
        f"# {args.title}",
        "",
        f"Regenerate: `{cmd}` (rewrites these tables and the plot; notes are written by hand).",
        "",
        f"Preset `{args.preset}`, vLLM rules, {args.horizon:g} simulated s per episode, "
        f"{args.scenarios} paired scenarios per load (seed {args.seed}; every policy and load "
        f"plays the same scenarios), load grid {list(args.grid)}, bisection to "
        f"{args.tol:g}, target {args.target:g} of requests within both SLOs "
        f"(TTFT <= 2 s, TPOT <= 100 ms){overrides}{fewer}. "
        "Load is the offered load as a fraction of the preset's roofline capacity for the "
        "workload (kvjax/serve/capacity.py). Attainment = good / decided requests, pooled over "
        "scenarios (kvjax/serve/sweep.py: a request not finished by the end of the window "
        "counts as missed once it is past an SLO, including requests still queued behind the "
        "stream pointer; requests in flight within both SLOs are left out); intervals are 95% "
        "over scenarios (delta method for the pooled ratio).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, "
        f"Python {platform.python_version()}; {wall / 60:.1f} min wall for the whole run, "
        f"load average (1 / 5 / 15 min) at the end {load_avg[0]:.2f} / {load_avg[1]:.2f} / "
        f"{load_avg[2]:.2f}.",
        "",
        f"![goodput and attainment against load]({os.path.basename(args.plot or '')})"
        if args.plot
        else "",
        "",
        "## Capacity (largest load with attainment >= target)",
        "",
        "| workload | " + " | ".join(args.policies) + " |",
        "|---|" + "---:|" * len(args.policies),
    ]
    for w in args.workloads:
        cells = []
        for p in args.policies:
            c = results[(w, p)]["capacity"]
            cells.append(fmt_cap(c) + ("" if c["monotone"] else " (non-monotone)"))
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Capacity is the highest load of the bisection that met the target; the next load "
        "evaluated above it (at most the tolerance away) did not. `< x`: even the grid's "
        "lowest load failed; `>= x`: its highest load passed. (non-monotone): attainment rose "
        "with load somewhere among the loads evaluated.",
        "",
    ]
    for w in args.workloads:
        lines += [
            f"## {w}: sweep",
            "",
            "| policy | load | offered req/s | goodput req/s | attainment | "
            "good / finished | p99 TTFT s | p99 TPOT ms | hit rate | preemptions/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in args.policies:
            for r in results[(w, p)]["rows"]:
                lines.append(
                    f"| {p} | {r['load']:g} | {r['offered_rps']:.2f} | "
                    f"{r['goodput']:.2f} ± {r['goodput_ci']:.2f} | "
                    f"{r['attainment']:.3f} ± {r['attainment_ci']:.3f} | "
                    f"{r['slo_attainment']:.3f} | {r['p99_ttft']:.2f} | "
                    f"{1000 * r['p99_tpot']:.0f} | {r['hit_rate']:.3f} | "
                    f"{r['preemptions_per_s']:.2f} |"
                )
        lines.append("")
        base = results.get((w, "engine_default"))
        if base is not None:
            lines += [
                f"Paired goodput difference against engine_default ({w}, mean over the same "
                "scenarios):",
                "",
                "| policy | " + " | ".join(f"load {x:g}" for x in args.grid) + " |",
                "|---|" + "---:|" * len(args.grid),
            ]
            for p in args.policies:
                if p == "engine_default":
                    continue
                cells = [
                    f"{r['goodput'] - b['goodput']:+.3f}"
                    for r, b in zip(results[(w, p)]["rows"], base["rows"], strict=True)
                ]
                lines.append(f"| {p} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(args, results: dict, path: str) -> None:
    n = len(args.workloads)
    fig, axes = plt.subplots(n, 2, figsize=(11, 3.3 * n), squeeze=False)
    for i, w in enumerate(args.workloads):
        ax_g, ax_a = axes[i]
        for j, p in enumerate(args.policies):
            res = results[(w, p)]
            rows = res["points"]
            x = [r["load"] for r in rows]
            # distinct dashes and markers: policies that tie draw on top of each other
            style = dict(
                color=f"C{j}",
                marker="osD^v<>"[j % 7],
                ms=3,
                lw=1.4,
                ls=("-", "--", ":", "-.")[j % 4],
                alpha=0.85,
                label=p,
            )
            ax_g.errorbar(
                x, [r["goodput"] for r in rows], yerr=[r["goodput_ci"] for r in rows], **style
            )
            ax_a.errorbar(
                x,
                [r["attainment"] for r in rows],
                yerr=[r["attainment_ci"] for r in rows],
                **style,
            )
            c = res["capacity"]
            if c["status"] == "bracketed":
                ax_a.plot([c["capacity"]], [c["attainment_at_capacity"]], "v", color=f"C{j}")
        ax_a.axhline(args.target, color="k", ls="--", lw=0.8)
        ax_a.text(x[0], args.target + 0.01, f"{args.target:.0%} target", fontsize=8)
        ax_g.set_ylabel(f"{w}\ngoodput req/s")
        ax_a.set_ylabel("SLO attainment")
        ax_a.set_ylim(0, 1.05)
        for ax in (ax_g, ax_a):
            ax.set_xlabel("offered load (x roofline capacity)")
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=8, loc="lower left")
    axes[0][0].set_title(f"goodput ({args.preset}, {args.horizon:g} s, {args.scenarios} scen.)")
    axes[0][1].set_title("attainment (good / decided); ▼ capacity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--workloads", nargs="+", default=["synthetic", "agentic", "azure-conv"])
    ap.add_argument("--policies", nargs="+", default=list(BASELINES))
    ap.add_argument("--horizon", type=float, default=60.0)
    ap.add_argument("--scenarios", type=int, default=6)
    ap.add_argument("--agentic-scenarios", type=int, default=None, help="default: --scenarios")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", type=float, nargs="+", default=list(GRID))
    ap.add_argument("--tol", type=float, default=0.0625)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--set", nargs="*", default=[], help="ServeParams overrides NAME=NUMBER")
    ap.add_argument("--write", default=None, help="markdown output (e.g. docs/serving-capacity.md)")
    ap.add_argument("--plot", default=None, help="figure (e.g. docs/serving_capacity.png)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--title", default="kv-serve-v0: capacity at an SLO")
    ap.add_argument("--append", action="store_true", help="append to --write as a section")
    args = ap.parse_args()
    unknown = [p for p in args.policies if p not in SERVE_POLICY_NAMES]
    if unknown:
        ap.exit(2, f"unknown policy {unknown[0]!r}; allowed: {list(SERVE_POLICY_NAMES)}\n")
    try:  # inputs checked before any work
        args.grid = list(sweep.check_loads(args.grid, "--grid"))
        for w in args.workloads:
            kvjax.make("kv-serve-v0", preset=args.preset, workload=w, horizon=args.horizon)
    except ValueError as e:
        ap.exit(2, f"{e}\n")
    t0 = time.perf_counter()
    try:
        results = run(args)
    except ValueError as e:
        ap.exit(2, f"{e}\n")
    text = markdown(args, results, time.perf_counter() - t0, os.getloadavg())
    if args.append:  # a section of the file: every heading one level down
        text = "\n" + "\n".join("#" + ln if ln.startswith("#") else ln for ln in text.split("\n"))
    print(text)
    if args.write:
        with open(args.write, "a" if args.append else "w") as f:
            f.write(text)
    if args.plot:
        plot(args, results, args.plot)
    if args.json:
        out = [
            dict(workload=w, policy=p, **{k: v for k, v in r.items() if k != "capacity"},
                 capacity={k: (v if not (isinstance(v, float) and math.isinf(v)) else None)
                           for k, v in r["capacity"].items()})
            for (w, p), r in results.items()
        ]  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=float)


if __name__ == "__main__":
    main()
