"""The learned kv-serve-v0 policy's capacity and goodput against the engine default, the best
heuristic and the unlimited-KV reference (docs/serving-training.md, "Capacity and the gap to
the unlimited-KV reference").

    python scripts/measure_serve_learned.py [--checkpoint train/checkpoints/ppo_serve_toy.msgpack]
        [--heuristic priority_by_role] [--scenarios 8] [--grid 0.4 0.6 0.8 1.0 1.2 1.6 2.0]
        [--tol 0.025] [--target 0.9] [--load 0.9] [--seed 1000003] [--out FILE.md]

On the checkpoint's own setting (preset, workload, `--set` overrides, horizon): every policy -
engine_default, the heuristic, the PPO policy (greedy) and the unlimited-KV reference (the
engine default on the same windows with a 2^26-token pool, kvjax.serve.leaderboard.
reference_setting) - runs on the same held-out scenarios at every load (kvjax.serve.sweep.
LoadRunner, common random numbers; seed = train.heldout's EVAL_SEED, never a training seed).
Reports capacity at `target` SLO attainment (sweep.capacity), the paired attainment differences
at the grid loads, and at `--load` the paired goodput differences against the default with the
normalised headroom (leaderboard.headroom: (policy - default) / (reference - default), delta
method). Prints markdown (and writes it to --out).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time

import numpy as np

import kvjax
from kvjax import stats
from kvjax.serve import leaderboard, sweep
from kvjax.serve.policies import make_policy as make_serve_policy
from kvjax.serve.sweep import format_capacity as fmt_cap
from train.heldout import EVAL_SEED
from train.ppo import load_policy
from train.ppo import make_policy as make_ppo_policy

DEFAULT, REFERENCE, LEARNED = "engine_default", "unlimited-KV reference", "ppo (greedy)"


def pooled_diff(a: dict, b: dict) -> tuple[float, float]:
    """Paired difference of two pooled attainments (sum good / sum decided) on the same
    scenarios and its 95% half-interval (delta method over scenarios)."""
    ga, da = np.asarray(a["good"], np.float64), np.asarray(a["decided"], np.float64)
    gb, db = np.asarray(b["good"], np.float64), np.asarray(b["decided"], np.float64)
    ra, rb = ga.sum() / max(da.sum(), 1), gb.sum() / max(db.sum(), 1)
    n = len(ga)
    resid = (ga - ra * da) / max(da.mean(), 1e-12) - (gb - rb * db) / max(db.mean(), 1e-12)
    se = math.sqrt((resid**2).sum() / (n * (n - 1))) if n > 1 else 0.0
    return float(ra - rb), float(stats.Z95 * se)


def pm(mc, fmt: str = "{:+.3f} ± {:.3f}") -> str:
    return "n/a" if mc is None else fmt.format(*mc)


def run(a) -> tuple[dict, dict, object]:
    config, net = load_policy(a.checkpoint)
    if config.env != "kv-serve-v0":
        raise ValueError(f"{a.checkpoint} is a {config.env} checkpoint; need kv-serve-v0")
    env, unit = kvjax.make(
        "kv-serve-v0",
        preset=config.preset,
        workload=config.workload,
        load=1.0,
        **config.serve_params,
    )
    ref_env, ref_unit = leaderboard.reference_setting(env, unit)
    default = make_serve_policy(DEFAULT, env)
    runs = {
        DEFAULT: (default, env, unit),
        a.heuristic: (make_serve_policy(a.heuristic, env), env, unit),
        LEARNED: (make_ppo_policy(net, config, greedy=True, env=env), env, unit),
        REFERENCE: (default, ref_env, ref_unit),
    }
    top = max(max(a.grid), a.load)
    runners, caps = {}, {}
    for name, (pol, e, p) in runs.items():
        r = sweep.LoadRunner(
            pol, e, p, num_scenarios=a.scenarios, seed=a.seed, max_load=top, progress=True
        )
        t0 = time.time()
        caps[name] = sweep.capacity(r, a.grid, target=a.target, tol=a.tol)
        r(a.load)
        print(f"[{name}] {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        runners[name] = r
    return runners, caps, config


def markdown(a, runners: dict, caps: dict, config, wall: float) -> str:
    names = list(runners)
    heur = a.heuristic
    # the command without --out (a local path)
    argv = sys.argv[1:]
    if "--out" in argv:
        i = argv.index("--out")
        argv = argv[:i] + argv[i + 2 :]
    cmd = " ".join(["python scripts/measure_serve_learned.py", *map(shlex.quote, argv)])
    unit = runners[DEFAULT].unit
    L = []
    L.append(
        f"Setting: preset `{config.preset}`, workload `{config.workload}`, "
        f"overrides {config.serve_params}, {float(unit.horizon):g} simulated s per window; "
        f"{a.scenarios} held-out scenarios (seed {a.seed}, train.evaluate's: scenario i = "
        f"`fold_in(PRNGKey({a.seed}), i)`, the first {a.scenarios} of its windows), the same "
        f"windows for every policy and load. Capacity: target {a.target} attainment, grid "
        f"{list(a.grid)}, bisection to {a.tol:g}. Command: `{cmd}`."
    )
    la = os.getloadavg()
    L.append("")
    L.append(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, "
        f"Python {platform.python_version()}; {wall / 60:.1f} min wall, load average "
        f"(1 / 5 / 15 min) at the end {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f}."
    )
    L += ["", f"#### Capacity at {a.target:g} SLO attainment", ""]
    L.append(
        "| policy | capacity (load) | first failing load | attainment at capacity | "
        "attainment at first failing | monotone |"
    )
    L.append("|---|---:|---:|---:|---:|---|")
    for n in names:
        c = caps[n]
        up = "-" if not math.isfinite(c["upper"]) else f"{c['upper']:.3f}"
        L.append(
            f"| {n} | {fmt_cap(c)} | {up} | {c['attainment_at_capacity']:.3f} | "
            f"{c['attainment_at_upper']:.3f} | {'yes' if c['monotone'] else 'no'} |"
        )
    cd, ch, cp, cr = (caps[n] for n in (DEFAULT, heur, LEARNED, REFERENCE))
    L.append("")
    if all(c["status"] == "bracketed" for c in (cd, cp, cr)) and cr["capacity"] > cd["capacity"]:
        gap = cr["capacity"] - cd["capacity"]
        share = f"{(cp['capacity'] - cd['capacity']) / gap:.2f}"
    else:
        share = "n/a (a capacity is not bracketed, or the reference's is not above the default's)"
    L.append(
        f"- Capacity: ppo {fmt_cap(cp)}, {DEFAULT} {fmt_cap(cd)}, {heur} {fmt_cap(ch)}, "
        f"reference {fmt_cap(cr)}; share of the default -> reference capacity gap closed by "
        f"ppo: {share} (point estimates at the bisection's resolution {a.tol:g}; the paired "
        "attainment differences below carry the intervals)."
    )
    # loads every runner evaluated (the grid and --load): no new runs here
    loads = sorted(set.intersection(*(set(runners[n].evaluated) for n in names)))
    L += ["", "#### Paired attainment differences (pooled, 95% delta-method intervals)", ""]
    L.append(
        f"| load | {DEFAULT} | {heur} | ppo | reference | ppo − default | ppo − {heur} | "
        f"{heur} − default |"
    )
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for x in loads:
        r = {n: runners[n](x) for n in names}
        att = {n: sweep.ratio_ci(r[n]["good"], r[n]["decided"]) for n in names}
        L.append(
            f"| {x:g} | "
            + " | ".join(pm(att[n], "{:.3f} ± {:.3f}") for n in names)
            + f" | {pm(pooled_diff(r[LEARNED], r[DEFAULT]))} | "
            f"{pm(pooled_diff(r[LEARNED], r[heur]))} | {pm(pooled_diff(r[heur], r[DEFAULT]))} |"
        )
    # goodput at the training load, paired against the default, and the normalised headroom
    x = a.load
    r = {n: runners[n](x) for n in names}
    g = {n: np.asarray(r[n]["goodput"], np.float64) for n in names}
    d = {n: g[n] - g[DEFAULT] for n in names}
    L += ["", f"#### Goodput at load {x:g} (paired against {DEFAULT})", ""]
    L.append(
        "| policy | goodput req/s | Δ goodput vs default (paired) | normalised headroom | "
        "attainment | p99 TTFT s | preemptions/s | hit rate |"
    )
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in names:
        hr = leaderboard.headroom(d[n], d[REFERENCE]) if n not in (DEFAULT, REFERENCE) else None
        hr_s = {DEFAULT: "0", REFERENCE: "1"}.get(n, pm(hr, "{:.2f} ± {:.2f}"))
        L.append(
            f"| {n} | {pm(stats.mean_ci(g[n]), '{:.3f} ± {:.3f}')} | "
            f"{'-' if n == DEFAULT else pm(stats.mean_ci(d[n]))} | {hr_s} | "
            f"{pm(sweep.ratio_ci(r[n]['good'], r[n]['decided']), '{:.3f} ± {:.3f}')} | "
            f"{np.mean(r[n]['p99_ttft']):.2f} | {np.mean(r[n]['preemptions_per_s']):.2f} | "
            f"{np.mean(r[n]['hit_rate']):.3f} |"
        )
    hp = leaderboard.headroom(d[LEARNED], d[REFERENCE])
    hh = leaderboard.headroom(d[heur], d[REFERENCE])
    diff = stats.mean_ci(g[LEARNED] - g[heur])
    win = float(np.mean(g[LEARNED] > g[heur]))
    L.append("")
    L.append(
        f"- ppo − {heur}: goodput {pm(diff)} req/s (paired 95%), ppo higher on "
        f"{100 * win:.0f}% of windows."
    )
    L.append(
        f"- Share of the default -> unlimited-KV goodput gap closed at load {x:g}: ppo "
        f"{pm(hp, '{:.2f} ± {:.2f}')}, {heur} {pm(hh, '{:.2f} ± {:.2f}')} "
        f"(reference − default {pm(stats.mean_ci(d[REFERENCE]))} req/s)."
    )
    return "\n".join(L) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="train/checkpoints/ppo_serve_toy.msgpack")
    ap.add_argument("--heuristic", default="priority_by_role")
    ap.add_argument("--scenarios", type=int, default=8)
    ap.add_argument("--grid", type=float, nargs="+", default=[0.4, 0.6, 0.8, 1.0, 1.2, 1.6, 2.0])
    ap.add_argument("--tol", type=float, default=0.025)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--load", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    try:
        a.grid = list(sweep.check_loads(a.grid, "--grid"))
        if a.scenarios < 2:
            raise ValueError(f"--scenarios must be >= 2 (intervals need two), got {a.scenarios}")
        if a.heuristic in (DEFAULT, "random"):
            raise ValueError(f"--heuristic must be a heuristic baseline, got {a.heuristic!r}")
        t0 = time.time()
        runners, caps, config = run(a)
    except (ValueError, OSError, KeyError) as e:
        print(f"measure_serve_learned.py: error: {e}", file=sys.stderr)
        return 2
    md = markdown(a, runners, caps, config, time.time() - t0)
    print(md)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
