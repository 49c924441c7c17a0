"""What the generic harness (kvjax.registry: rollout, CLI, trainer) needs from kv-serve-v0: how
to make it, its policies, its CLI options and its benchmark, leaderboard and trace commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kvjax.registry import Harness
from kvjax.serve import ENGINES, PRESETS, WORKLOADS
from kvjax.serve import env as serve_env
from kvjax.serve.policies import SERVE_POLICY_NAMES
from kvjax.serve.traces import TRACE_NAMES
from kvjax.serve.workload import ALIASES
from kvjax.validation import fail, real_arg

WORKLOAD_NAMES = sorted(WORKLOADS + tuple(ALIASES))
_POSITIVE = real_arg(0.0, None, lo_open=True)
# kv-serve-v0's CLI options: name -> (argparse keywords, what it sets); every default is None, the
# command fills it in (the defaults named in COMMAND_OPTIONS).
OPTIONS = {
    "preset": (dict(choices=list(PRESETS)), "deployment: model, GPU, pool"),
    "presets": (dict(nargs="+", choices=list(PRESETS)), "presets to time"),
    "engine": (dict(choices=list(ENGINES)), "the engine's scheduling rules"),
    "load": (dict(type=_POSITIVE), "offered load, a fraction of the preset's roofline capacity"),
    "loads": (dict(type=_POSITIVE, nargs="+"), "offered loads of the settings"),
    "workload": (
        {},
        f"{', '.join(WORKLOAD_NAMES)}, a bundled trace ({', '.join(TRACE_NAMES)}) or a trace file",
    ),
    "workloads": (dict(nargs="+"), "workloads of the settings"),
    "horizon": (dict(type=_POSITIVE), "simulated seconds per episode"),
    "policies": (dict(nargs="+"), "policies to rank"),
    "set": (
        dict(nargs="+", metavar="NAME=NUMBER"),
        "ServeParams overrides, e.g. gpu_pool_tokens=40000",
    ),
    "extra": (
        dict(action=argparse.BooleanOptionalAction),
        "also the settings where the pool binds",
    ),
}
# command -> its options and the default each stands for.
COMMAND_OPTIONS = {
    "eval": {
        "preset": "toy",
        "engine": "vllm",
        "load": 0.8,
        "workload": "synthetic",
        "horizon": "the preset's",
    },
    "bench": {"presets": "toy h100-llama3-8b", "engine": "vllm", "load": 0.8},
    "leaderboard": {
        "preset": "h100-llama3-8b",
        "horizon": 60,
        "workloads": "every workload",
        "loads": "the standard set",
        "policies": "every policy but random",
        "set": "none",
        "extra": "on",
    },
}
# `kvjax eval`'s scenario when an option is not given.
EVAL_DEFAULTS = {"preset": "toy", "engine": "vllm", "workload": "synthetic", "load": 0.8}


class KVServeHarness(Harness):
    env_id = "kv-serve-v0"
    summary = "a serving engine's rules, clock and score (vLLM / SGLang / TensorRT-LLM)"
    policy_names = SERVE_POLICY_NAMES
    default_policy = "engine_default"
    ppo_agent = "train.agents.serve:ServeAgent"

    def make(self, **kwargs: Any):
        if "difficulty" in kwargs:
            raise ValueError(
                "kv-serve-v0 has no difficulty tiers; set preset, engine, workload and load instead"
            )
        return serve_env.make(**kwargs)

    def make_policy(self, name: str, env: Any):
        from kvjax.serve.policies import make_policy

        if name not in SERVE_POLICY_NAMES:
            raise ValueError(
                f"unknown {self.env_id} policy {name!r}; allowed: {list(SERVE_POLICY_NAMES)}"
            )
        return make_policy(name, env)

    # -- the CLI -------------------------------------------------------------------------------
    def add_options(self, parser: argparse.ArgumentParser, command: str) -> list[str]:
        g = parser.add_argument_group(f"{self.env_id} (--env {self.env_id})")
        for name, default in COMMAND_OPTIONS.get(command, {}).items():
            kwargs, what = OPTIONS[name]
            g.add_argument(f"--{name}", default=None, help=f"{what} (default: {default})", **kwargs)
        return list(COMMAND_OPTIONS.get(command, {}))

    def scenario(self, args: argparse.Namespace) -> dict[str, Any]:
        out = {k: getattr(args, k, None) or v for k, v in EVAL_DEFAULTS.items()}
        if getattr(args, "horizon", None) is not None:
            out["horizon"] = args.horizon
        return out

    def check_args(self, args: argparse.Namespace) -> None:
        if args.command == "eval" and getattr(args, "workload", None) is not None:
            serve_env.workload_source(args.workload)
        if args.command == "leaderboard":
            from kvjax.serve import leaderboard as slb

            args.output = args.output or "docs/serving-leaderboard.md"
            args.num_scenarios = args.num_scenarios or 8
            args.setting = slb.setting_from_args(args.preset, args.workloads, args.loads, args.set)
            args.policies = args.policies or list(slb.POLICIES)
            args.horizon = args.horizon or 60.0
            slb.check_args(args.setting, args.policies, args.horizon, args.num_scenarios)

    def eval_header(
        self,
        policy: str,
        scenario: dict,
        params: Any,
        num_scenarios: int,
        seed: int,
        seconds: float,
    ) -> str:
        return (
            f"{policy} on kv-serve-v0 {scenario['preset']} / {scenario['engine']} / "
            f"{scenario['workload']} at load {scenario['load']:g} "
            f"({float(params.arrival_rate):.2f} req/s, {float(params.horizon):g} s), "
            f"{num_scenarios:,} scenarios (seed {seed}, {seconds:.1f} s)"
        )

    def record(self, scenario: dict[str, Any], params: Any) -> dict[str, Any]:
        out = {k: v for k, v in scenario.items() if k != "horizon"}
        return {
            **out,
            "horizon_s": float(params.horizon),
            "arrival_rate": float(params.arrival_rate),
        }

    def format_result(self, name: str, mean: float, ci95: float) -> str:
        return f"  {name:<22} {mean:>12.4f} ± {ci95:.4f}"

    def bench(self, args: argparse.Namespace) -> int:
        from kvjax.bench import write_keeping_notes
        from kvjax.serve import bench as serve_bench

        record = serve_bench.run_serve_benchmark(
            args.presets or serve_bench.SERVE_PRESETS,
            args.batch_sizes,
            args.repeats,
            engine=args.engine or "vllm",
            load=args.load or 0.8,
            progress=not args.json,
        )
        table = serve_bench.serve_markdown_table(record)
        if args.write:
            write_keeping_notes(
                Path(args.write), serve_bench.serve_benchmarks_document(record, table)
            )
        print(
            json.dumps(record)
            if args.json
            else table + "\n" + serve_bench.serve_summary_line(record)
        )
        return 0

    def leaderboard(self, args: argparse.Namespace) -> int:
        from kvjax.serve import leaderboard as slb

        return slb.main(args)

    def commands(self) -> dict[str, tuple[Any, Any]]:
        return {"workload": (add_workload_parser, cmd_workload)}


def add_workload_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`kvjax workload stats NAME_OR_FILE [--plot PATH] [--json]`."""
    wl = sub.add_parser("workload", help="request traces for kv-serve-v0 (docs/serving.md)")
    wl_sub = wl.add_subparsers(dest="action", required=True)
    ws = wl_sub.add_parser(
        "stats", help="arrival rate, burstiness, length percentiles, prefix reuse of a trace"
    )
    ws.add_argument(
        "trace",
        metavar="NAME_OR_FILE",
        help=f"a bundled trace ({', '.join(TRACE_NAMES)}) or an Azure / BurstGPT "
        "CSV, Mooncake / Qwen-Bailian JSONL or saved .npz file",
    )
    ws.add_argument(
        "--plot",
        default=None,
        metavar="PATH",
        help="also draw arrivals per second and length histograms to a PNG",
    )
    ws.add_argument("--json", action="store_true", help="print one JSON record")
    return wl


def cmd_workload(args: argparse.Namespace) -> int:
    from kvjax.serve import traces
    from kvjax.validation import check_writable_file

    try:
        if args.plot:
            check_writable_file(args.plot, "--plot")
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


HARNESS = KVServeHarness()

__all__ = ["HARNESS", "KVServeHarness", "add_workload_parser", "cmd_workload"]
