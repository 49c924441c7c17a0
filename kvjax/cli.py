"""`kvjax` command line: demo, eval, bench, leaderboard.

    kvjax demo [--num-scenarios 4096] [--seed 0] [--out-dir runs]
    kvjax eval --policy NAME --difficulty TIER [--num-scenarios N] [--seed S] [--json]
    kvjax eval --env kv-serve-v0 --policy engine_default [--preset toy] [--engine vllm]
               [--load 0.8] [--workload synthetic] [--horizon 60]
    kvjax bench [--json] [--batch-sizes 1 1024 4096] [--repeats R] [--write PATH] [--no-standard]
    kvjax bench --env kv-serve-v0 [--presets toy h100-llama3-8b] [--write PATH]
    kvjax leaderboard [--num-scenarios 4096] [--seed 0] [--output docs/leaderboard.md]
    kvjax leaderboard --env kv-serve-v0 [--preset h100-llama3-8b] [--workloads ...] [--loads ...]
                      [--horizon 60] [--num-scenarios 8] [--set NAME=NUMBER] [--no-extra]
    kvjax eval-llm -m MODEL --base-url URL [--api-key-var VAR] [--difficulty T] [-n N]
    kvjax eval-llm --policy NAME [--difficulty T] [-n N]      (docs/llm-eval.md)
    kvjax workload stats NAME_OR_FILE [--plot PATH] [--json]  (a bundled trace or a trace file)

Unknown policy / tier names exit with code 2 and list the allowed values (argparse choices).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kvjax.cache.env import ENV_IDS
from kvjax.cache.llm import add_eval_llm_parser, cmd_eval_llm
from kvjax.cache.policies import POLICY_NAMES
from kvjax.cache.types import DIFFICULTIES
from kvjax.validation import ArgumentParser, check_writable_dir, check_writable_file, fail, real_arg
from kvjax.validation import positive_int as _positive
from kvjax.validation import seed_arg as _seed

SERVE_OPTIONS = ("preset", "engine", "load", "workload", "horizon")


def _serve_names():
    from kvjax.serve import ENGINES, PRESETS, WORKLOADS
    from kvjax.serve.policies import SERVE_POLICY_NAMES
    from kvjax.serve.traces import TRACE_NAMES
    from kvjax.serve.workload import ALIASES

    return dict(presets=list(PRESETS), engines=list(ENGINES),
                workloads=sorted(WORKLOADS + tuple(ALIASES)), traces=list(TRACE_NAMES),
                policies=list(SERVE_POLICY_NAMES))


def _add_serve_options(p: argparse.ArgumentParser, presets_plural: bool = False) -> None:
    """kv-serve-v0's scenario options (errors when given for kv-cache-v0)."""
    names = _serve_names()
    if presets_plural:
        p.add_argument("--presets", nargs="+", choices=names["presets"], default=None)
    else:
        p.add_argument("--preset", choices=names["presets"], default=None)
    p.add_argument("--engine", choices=names["engines"], default=None)
    p.add_argument("--load", type=real_arg(0.0, None, lo_open=True), default=None,
                   help="offered load, a fraction of the preset's roofline capacity")
    if not presets_plural:
        p.add_argument("--workload", default=None,
                       help=f"{', '.join(names['workloads'])}, a bundled trace "
                       f"({', '.join(names['traces'])}) or a trace file")
        p.add_argument("--horizon", type=real_arg(0.0, None, lo_open=True), default=None,
                       help="simulated seconds per episode")


def check_env_options(args: argparse.Namespace) -> None:
    """ValueError when options of one environment are given for the other."""
    env = getattr(args, "env", None)
    if env is None:
        return
    given = [o for o in SERVE_OPTIONS + ("presets",) if getattr(args, o, None) is not None]
    if env == "kv-cache-v0" and given:
        raise ValueError(f"--{given[0]} applies to --env kv-serve-v0 only")
    policies = [args.policy] if getattr(args, "policy", None) else []
    if env == "kv-serve-v0":
        allowed = _serve_names()["policies"]
        if getattr(args, "difficulty", None) not in (None, "medium"):
            raise ValueError("--difficulty applies to kv-cache-v0 only (kv-serve-v0 has presets)")
    else:
        allowed = list(POLICY_NAMES)
    for name in policies:
        if name not in allowed:
            raise ValueError(f"unknown {env} policy {name!r}; allowed: {allowed}")
    if env == "kv-serve-v0" and getattr(args, "workload", None) is not None:
        from kvjax.serve.env import workload_source

        workload_source(args.workload)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(  # one-line errors, exit code 2
        prog="kvjax", description="Batched KV-cache pressure simulator: baselines and benchmark."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="every baseline on every tier: leaderboard, plot, speed")
    demo.add_argument("--num-scenarios", type=_positive, default=4096)
    demo.add_argument("--seed", type=_seed, default=0)
    demo.add_argument("--out-dir", default="runs", help="where the plot is saved")
    demo.add_argument("--policies", nargs="+", choices=POLICY_NAMES, default=list(POLICY_NAMES))

    ev = sub.add_parser("eval", help="one policy on one tier: rubric means and 95%% intervals")
    ev.add_argument("--env", choices=ENV_IDS, default="kv-cache-v0")
    ev.add_argument("--policy", required=True,
                    choices=list(POLICY_NAMES) + _serve_names()["policies"])
    ev.add_argument("--difficulty", default="medium", choices=DIFFICULTIES)
    ev.add_argument("--num-scenarios", type=_positive, default=1024)
    ev.add_argument("--seed", type=_seed, default=0)
    ev.add_argument("--json", action="store_true", help="print one JSON record")
    _add_serve_options(ev)

    be = sub.add_parser("bench", help="env-steps/s per policy and batch size vs the reference")
    be.add_argument("--env", choices=ENV_IDS, default="kv-cache-v0")
    be.add_argument("--json", action="store_true", help="print one JSON record")
    be.add_argument("--batch-sizes", type=_positive, nargs="+", default=None)
    be.add_argument("--repeats", type=_positive, default=5)
    be.add_argument("--policies", nargs="+", choices=POLICY_NAMES,
                    default=["keep", "random", "value_aware"])
    be.add_argument("--write", default=None, metavar="PATH",
                    help="also write the markdown report (e.g. docs/benchmarks.md)")
    be.add_argument("--standard", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the standard path (vmap(env.step), auto-reset, observation "
                         "consumed) and, with gymnax installed, Asterix-MinAtar beside it")
    _add_serve_options(be, presets_plural=True)

    lb = sub.add_parser("leaderboard", help="regenerate docs/leaderboard.md "
                                            "(--env kv-serve-v0: docs/serving-leaderboard.md)")
    lb.add_argument("--env", choices=ENV_IDS, default="kv-cache-v0")
    lb.add_argument("--num-scenarios", type=_positive, default=None,
                    help="scenarios per tier (4096) or per kv-serve-v0 setting (8)")
    lb.add_argument("--seed", type=_seed, default=0)
    lb.add_argument("--output", default=None, help="default: docs/leaderboard.md, or "
                    "docs/serving-leaderboard.md for kv-serve-v0")
    lb.add_argument("--note", default="", help="a line added under the header (e.g. load)")
    lb.add_argument("--preset", choices=_serve_names()["presets"], default=None)
    lb.add_argument("--horizon", type=real_arg(0.0, None, lo_open=True), default=None)
    lb.add_argument("--workloads", nargs="+", default=None, help="kv-serve-v0 workloads")
    lb.add_argument("--loads", type=real_arg(0.0, None, lo_open=True), nargs="+", default=None)
    lb.add_argument("--policies", nargs="+", default=None, help="kv-serve-v0 policies")
    lb.add_argument("--set", nargs="+", default=None, metavar="NAME=NUMBER",
                    help="kv-serve-v0 ServeParams overrides, e.g. gpu_pool_tokens=40000")
    lb.add_argument("--extra", action=argparse.BooleanOptionalAction, default=None,
                    help="kv-serve-v0: also the settings where the pool binds (default: on)")
    add_eval_llm_parser(sub)  # the LLM tool-calling evaluation (kvjax.cache.llm)

    wl = sub.add_parser("workload", help="request traces for kv-serve-v0 (docs/serving.md)")
    wl_sub = wl.add_subparsers(dest="action", required=True)
    ws = wl_sub.add_parser("stats", help="arrival rate, burstiness, length percentiles, "
                                         "prefix reuse of a trace")
    ws.add_argument("trace", metavar="NAME_OR_FILE",
                    help="a bundled trace (azure-conv, azure-code, mooncake-conv, "
                         "mooncake-synthetic) or an Azure / BurstGPT CSV, Mooncake / "
                         "Qwen-Bailian JSONL or saved .npz file")
    ws.add_argument("--plot", default=None, metavar="PATH",
                    help="also draw arrivals per second and length histograms to a PNG")
    ws.add_argument("--json", action="store_true", help="print one JSON record")
    return parser


def _cmd_eval(args: argparse.Namespace) -> int:
    import jax

    import kvjax
    from kvjax.cache.leaderboard import label
    from kvjax.cache.policies import make_policy
    from kvjax.rollout import rollout, summarize_results

    if args.env == "kv-serve-v0":
        return _cmd_eval_serve(args)
    env, params = kvjax.make("kv-cache-v0", difficulty=args.difficulty)
    t0 = time.perf_counter()
    res = rollout(make_policy(args.policy, env), jax.random.PRNGKey(args.seed),
                  args.num_scenarios, params, env, progress=not args.json)
    summary = summarize_results(res)
    record = {"policy": args.policy, "difficulty": args.difficulty,
              "num_scenarios": args.num_scenarios, "seed": args.seed,
              "seconds": round(time.perf_counter() - t0, 3), "results": summary}
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"{label(args.policy)} on {args.difficulty}, {args.num_scenarios:,} scenarios "
          f"(seed {args.seed}, {record['seconds']:.1f} s incl. compile)")
    for k, v in summary.items():
        print(f"  {k:<26} {v['mean']:+.4f} ± {v['ci95']:.4f}")
    return 0


def _cmd_eval_serve(args: argparse.Namespace) -> int:
    import jax

    import kvjax
    from kvjax.rollout import rollout, summarize_results
    from kvjax.serve.policies import make_policy

    scenario = dict(preset=args.preset or "toy", engine=args.engine or "vllm",
                    workload=args.workload or "synthetic", load=args.load or 0.8)
    extra = {} if args.horizon is None else {"horizon": args.horizon}
    try:
        env, params = kvjax.make("kv-serve-v0", **scenario, **extra)
    except ValueError as e:
        return fail("kvjax eval", str(e))
    t0 = time.perf_counter()
    res = rollout(make_policy(args.policy, env), jax.random.PRNGKey(args.seed),
                  args.num_scenarios, params, env, progress=not args.json)
    summary = summarize_results(res)
    record = {"env": args.env, "policy": args.policy, **scenario,
              "horizon_s": float(params.horizon), "arrival_rate": float(params.arrival_rate),
              "num_scenarios": args.num_scenarios, "seed": args.seed,
              "seconds": round(time.perf_counter() - t0, 3), "results": summary}
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"{args.policy} on kv-serve-v0 {scenario['preset']} / {scenario['engine']} / "
          f"{scenario['workload']} at load {scenario['load']:g} "
          f"({float(params.arrival_rate):.2f} req/s, {float(params.horizon):g} s), "
          f"{args.num_scenarios:,} scenarios (seed {args.seed}, {record['seconds']:.1f} s)")
    for k, v in summary.items():
        print(f"  {k:<22} {v['mean']:>12.4f} ± {v['ci95']:.4f}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from kvjax.cache import leaderboard
    from kvjax.cache.viz import plot_policy_comparison

    t0 = time.perf_counter()
    results, speed = leaderboard.evaluate(args.policies, leaderboard.TIERS, args.num_scenarios,
                                          args.seed)
    print(leaderboard.console_table(results))
    flat = {
        leaderboard.label(name): {k: np.concatenate([per_tier[t][k] for t in per_tier])
                                  for k in ("total", "tier")}
        for name, per_tier in results.items()
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig = plot_policy_comparison(flat, "total", by="tier",
                                 title=f"kvjax baselines, {args.num_scenarios:,} scenarios/tier")
    path = out / "demo_leaderboard.png"
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")
    episodes = len(results) * len(leaderboard.TIERS) * args.num_scenarios
    fast = "value_aware" if "value_aware" in speed else next(iter(speed))
    print(f"throughput: {fast} {speed[fast]:,.0f} env-steps/s (batched rollout, after compile); "
          f"{episodes:,} episodes in {time.perf_counter() - t0:.1f} s total incl. compiles")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from kvjax import bench

    if args.env == "kv-serve-v0":
        record = bench.run_serve_benchmark(
            args.presets or bench.SERVE_PRESETS, args.batch_sizes, args.repeats,
            engine=args.engine or "vllm", load=args.load or 0.8, progress=not args.json)
        table = bench.serve_markdown_table(record)
        if args.write:
            write_keeping_notes(Path(args.write), serve_benchmarks_document(record, table))
        print(json.dumps(record) if args.json else table + "\n" + bench.serve_summary_line(
            record))
        return 0

    record = bench.run_benchmark(args.batch_sizes, args.policies, args.repeats,
                                 progress=not args.json, standard=args.standard)
    table = bench.markdown_table(record)
    if args.write:
        write_keeping_notes(Path(args.write), benchmarks_document(record, table))
    if args.json:
        print(json.dumps(record))
    else:
        print(table)
        print(bench.summary_line(record))
    return 0


# In a benchmark document, everything from this line on is hand-written (measurements, profiles,
# designs tried) and survives `kvjax bench --write`, which regenerates only what is above it.
NOTES_MARKER = "<!-- hand-written notes below: kept by `kvjax bench --write` -->"


def write_keeping_notes(path: Path, generated: str) -> None:
    """Write `generated` to `path`, followed by the hand-written notes of the file already
    there (from NOTES_MARKER on; none when the file or the marker is absent)."""
    old = path.read_text() if path.is_file() else ""
    notes = old[old.index(NOTES_MARKER):] if NOTES_MARKER in old else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(generated.rstrip("\n") + "\n\n" + notes if notes else generated)


def benchmarks_document(record: dict, table: str) -> str:
    """The docs/benchmarks.md text for one benchmark record."""
    from kvjax import bench

    m = record["machine"]
    cfg = record["config"]
    return "\n".join([
        "# Benchmarks",
        "",
        "Regenerate with `kvjax bench --write docs/benchmarks.md` (GPU: "
        "`scripts/gpu_bench.sh`). Env-steps/s of whole batched episodes: one jitted call resets "
        f"`batch` scenarios and plays their {cfg['episode_len']} steps with the policy "
        f"({cfg['max_seqs']} slots, {cfg['max_actions']} actions per step, difficulty "
        f"{cfg['difficulty']}); median of {cfg['repeats']} calls after a warm-up, compile time "
        "reported apart. `path`: batch-trailing policies (`@batch_polymorphic`) step the whole "
        "micro-batch in the [slot, batch] layout without vmap; the others run under vmap "
        "(docs/dynamics.md, section 8).",
        "",
        f"Machine: {m['backend']} / {m['device']} x{m['device_count']}, {m['cpu_count']} CPU "
        f"cores ({m['processor']}), Python {m['python']}, jax {m['jax']}; 1-minute load "
        f"average at the end of the run {m['load_avg_1m']} (a shared machine: other jobs ran "
        "at the same time, so these are lower bounds).",
        "",
        table,
        "",
        f"Headline: {bench.summary_line(record)}.",
        "",
        f"Target (issue 3): at least 1,000,000 env-steps/s and 100x the reference for value_aware "
        f"at batch 4,096 on the 2-core CI machine: {_target_status(record)}.",
        "",
        "Target (issue 14): the standard path at batch 4,096 at least 800,000 env-steps/s and "
        "at least 1.0x gymnax Asterix-MinAtar's standard path in the same run (aim 1.3x); the "
        f"rollout engine's value_aware at least 2x Asterix's: {_standard_status(record)}.",
        "",
    ])


def _standard_status(record: dict) -> str:
    std = {r["env"]: r for r in record.get("standard_path") or [] if r["batch"] == 4096}
    va = [r for r in record["results"] if r["policy"] == "value_aware" and r["batch"] == 4096]
    kv = std.get("kv-cache-v0")
    if kv is None:
        return "not measured in this run"
    x, rate = kv.get("x_gymnax"), kv["steps_per_s"]
    va_x = va[0].get("x_gymnax") if va else None
    parts = [f"standard path {rate:,.0f} env-steps/s ({'met' if rate >= 8e5 else 'not met'})"]
    if x is None:
        parts.append("Asterix not measured (gymnax not installed)")
    else:
        parts.append(f"{x:.2f}x Asterix ({'met' if x >= 1.0 else 'not met'})")
    if va_x is not None:
        parts.append(f"value_aware {va_x:.2f}x Asterix ({'met' if va_x >= 2.0 else 'not met'})")
    return "; ".join(parts)


def serve_benchmarks_document(record: dict, table: str) -> str:
    """The docs/serving-benchmarks.md text for one kv-serve-v0 benchmark record."""
    from kvjax import bench

    m, cfg = record["machine"], record["config"]
    return "\n".join([
        "# kv-serve-v0 benchmarks",
        "",
        "Regenerate with `kvjax bench --env kv-serve-v0 --write docs/serving-benchmarks.md`. "
        "One jitted call resets `batch` scenarios and plays whole episodes of "
        f"{cfg['horizon_s']:g} simulated seconds with the engine default ({cfg['engine']} rules, "
        f"load {cfg['load']:g}, the synthetic conversation workload); median of "
        f"{cfg['repeats']} calls after a warm-up, compile time apart. Engine iterations/s "
        "counts the simulated engine iterations of all scenarios per wall second; simulated "
        "s / wall s is the simulated time of all scenarios per wall second.",
        "",
        f"Machine: {m['backend']} / {m['device']} x{m['device_count']}, {m['cpu_count']} CPU "
        f"cores ({m['processor']}), Python {m['python']}, jax {m['jax']}; 1-minute load "
        f"average at the end of the run {m['load_avg_1m']}.",
        "",
        table,
        "",
        f"Headline: {bench.serve_summary_line(record)}.",
        "",
        "Target (kv-serve-v0 issue): `toy` at 0.5M engine iterations/s at batch 4,096 on the "
        "2-core machine (10,000x real time).",
        "",
    ])


def _target_status(record: dict) -> str:
    rows = [r for r in record["results"]
            if r["policy"] == "value_aware" and r["batch"] == 4096]
    if not rows:
        return "not measured in this run"
    r = rows[0]
    ok = r["steps_per_s"] >= 1e6 and (r.get("speedup_vs_reference") or 0) >= 100
    return "met" if ok else (f"not met in this run ({r['steps_per_s']:,.0f} env-steps/s, "
                             f"{r.get('speedup_vs_reference') or 0:,.0f}x)")


SERVE_LEADERBOARD = ("workloads", "loads", "policies", "set", "extra")


def leaderboard_defaults(args: argparse.Namespace) -> None:
    """Per-env defaults of `kvjax leaderboard`; kv-serve-v0's arguments checked (ValueError)."""
    if args.command != "leaderboard":
        return
    serve = args.env == "kv-serve-v0"
    if args.output is None:
        args.output = "docs/serving-leaderboard.md" if serve else "docs/leaderboard.md"
    if args.num_scenarios is None:
        args.num_scenarios = 8 if serve else 4096
    given = [o for o in SERVE_LEADERBOARD if getattr(args, o) is not None]
    if not serve and given:
        raise ValueError(f"--{given[0]} applies to --env kv-serve-v0 only")
    if serve:
        from kvjax.serve import leaderboard as slb

        args.setting = slb.setting_from_args(args.preset, args.workloads, args.loads, args.set)
        args.policies = args.policies or list(slb.POLICIES)
        args.horizon = args.horizon or 60.0
        slb.check_args(args.setting, args.policies, args.horizon, args.num_scenarios)


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from kvjax.cache import leaderboard

    if args.env == "kv-serve-v0":
        from kvjax.serve import leaderboard as slb

        return slb.main(args)
    results, speed = leaderboard.evaluate(POLICY_NAMES, leaderboard.TIERS, args.num_scenarios,
                                          args.seed)
    text = leaderboard.document(results, args.num_scenarios, args.seed, speed, args.note)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(leaderboard.console_table(results))
    print(f"wrote {args.output}")
    return 0


def _cmd_workload(args: argparse.Namespace) -> int:
    from kvjax.serve import traces

    try:
        trace = traces.load_trace(args.trace)
    except (ValueError, OSError) as e:
        return fail(f"kvjax workload {args.action}", str(e))
    stats = traces.trace_stats(trace)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        traces.plot_trace(trace, args.plot)
    if args.json:
        print(json.dumps(stats))
    else:
        print(traces.format_stats(stats))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


COMMANDS = {"demo": _cmd_demo, "eval": _cmd_eval, "bench": _cmd_bench,
            "leaderboard": _cmd_leaderboard, "eval-llm": cmd_eval_llm,
            "workload": _cmd_workload}


def use_all_cpu_cores() -> None:
    """On a CPU-only host, expose one XLA CPU device per core (unless XLA_FLAGS already sets a
    count), so the rollout engine's 1-D mesh runs a device per core: an XLA CPU computation
    mostly runs on one thread. Results do not change (fixed micro-batches); only speed does.
    Must run before JAX initialises its backends; a no-op afterwards or with KVJAX_ONE_DEVICE=1."""
    import os

    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    if (
        os.environ.get("KVJAX_ONE_DEVICE") == "1"
        or "xla_force_host_platform_device_count" in flags
        or xla_bridge.backends_are_initialized()
        or os.environ.get("JAX_PLATFORMS", "cpu") not in ("", "cpu")
    ):
        return
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if n and n > 1:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


# Output paths each command writes, checked before any work: (attribute, kind).
OUTPUTS = {"demo": [("out_dir", "dir")], "bench": [("write", "file")],
           "leaderboard": [("output", "file")],
           "workload": [("plot", "file")]}  # eval-llm checks its own (adapters)


def check_outputs(args: argparse.Namespace) -> None:
    """ValueError unless every output path of the command can be written."""
    for attr, kind in OUTPUTS.get(args.command, []):
        path = getattr(args, attr, None)
        if path:
            flag = "--" + attr.replace("_", "-")
            (check_writable_dir if kind == "dir" else check_writable_file)(path, flag)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kvjax` console script. Bad arguments (names, numbers, seeds,
    unwritable output paths) exit with code 2 and one line on stderr, before any work."""
    args = build_parser().parse_args(argv)
    try:
        leaderboard_defaults(args)
        check_outputs(args)
        check_env_options(args)
    except ValueError as e:
        return fail(f"kvjax {args.command}", str(e))
    use_all_cpu_cores()
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
