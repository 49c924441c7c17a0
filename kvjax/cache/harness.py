"""What the generic harness (kvjax.registry: rollout, CLI, trainer) needs from kv-cache-v0: how
to make it, its policies, its CLI options and its demo, benchmark and leaderboard documents."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from kvjax.cache import env as cache_env
from kvjax.cache.policies import POLICY_NAMES
from kvjax.cache.types import DIFFICULTIES
from kvjax.registry import Harness


class KVCacheHarness(Harness):
    env_id = "kv-cache-v0"
    summary = "the seed environment: evict / compress / swap_to_cpu / keep over tiers"
    policy_names = POLICY_NAMES
    default_policy = "value_aware"
    ppo_agent = "train.agents.cache:KVCacheAgent"

    def make(self, **kwargs: Any):
        return cache_env.make(**kwargs)

    def make_policy(self, name: str, env: Any):
        from kvjax.cache.policies import make_policy

        return make_policy(name, env)

    # -- the CLI -------------------------------------------------------------------------------
    def add_options(self, parser: argparse.ArgumentParser, command: str) -> list[str]:
        g = parser.add_argument_group(f"{self.env_id} (--env {self.env_id})")
        if command == "eval":
            g.add_argument("--difficulty", choices=DIFFICULTIES, default=None,
                           help="the tier (default: medium)")
            return ["difficulty"]
        if command in ("bench", "demo"):
            g.add_argument("--policies", nargs="+", choices=POLICY_NAMES, default=None,
                           help="baselines to run (default: keep random value_aware for bench, "
                                "all for demo)")
            if command == "demo":
                return ["policies"]
            g.add_argument("--standard", action=argparse.BooleanOptionalAction, default=None,
                           help="also time the standard path (vmap(env.step), auto-reset, "
                                "observation consumed) and, with gymnax installed, "
                                "Asterix-MinAtar beside it (default: on)")
            return ["policies", "standard"]
        return []

    def scenario(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"difficulty": getattr(args, "difficulty", None) or "medium"}

    def check_args(self, args: argparse.Namespace) -> None:
        if args.command == "leaderboard":
            args.output = args.output or "docs/leaderboard.md"
            args.num_scenarios = args.num_scenarios or 4096
        elif args.command == "demo":
            args.num_scenarios = args.num_scenarios or 4096
            args.policies = args.policies or list(POLICY_NAMES)
        elif args.command == "bench":
            args.policies = args.policies or ["keep", "random", "value_aware"]
            args.standard = True if args.standard is None else args.standard

    def eval_header(self, policy: str, scenario: dict, params: Any, num_scenarios: int,
                    seed: int, seconds: float) -> str:
        from kvjax.cache.leaderboard import label

        return (f"{label(policy)} on {scenario['difficulty']}, {num_scenarios:,} scenarios "
                f"(seed {seed}, {seconds:.1f} s incl. compile)")

    def demo(self, args: argparse.Namespace) -> int:
        """Every baseline on every tier: the leaderboard table, a plot, the throughput."""
        import numpy as np

        from kvjax.cache import leaderboard
        from kvjax.cache.viz import plot_policy_comparison

        t0 = time.perf_counter()
        results, speed = leaderboard.evaluate(args.policies, leaderboard.TIERS,
                                              args.num_scenarios, args.seed)
        print(leaderboard.console_table(results))
        flat = {
            leaderboard.label(name): {k: np.concatenate([per_tier[t][k] for t in per_tier])
                                      for k in ("total", "tier")}
            for name, per_tier in results.items()
        }
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        fig = plot_policy_comparison(
            flat, "total", by="tier",
            title=f"kvjax baselines, {args.num_scenarios:,} scenarios/tier")
        path = out / "demo_leaderboard.png"
        fig.savefig(path, dpi=110)
        print(f"plot: {path}")
        episodes = len(results) * len(leaderboard.TIERS) * args.num_scenarios
        fast = "value_aware" if "value_aware" in speed else next(iter(speed))
        print(f"throughput: {fast} {speed[fast]:,.0f} env-steps/s (batched rollout, after "
              f"compile); {episodes:,} episodes in {time.perf_counter() - t0:.1f} s total incl. "
              "compiles")
        return 0

    def bench(self, args: argparse.Namespace) -> int:
        import json

        from kvjax import bench
        from kvjax.cache import bench as cache_bench

        record = cache_bench.run_benchmark(args.batch_sizes, args.policies, args.repeats,
                                           progress=not args.json, standard=args.standard)
        table = cache_bench.markdown_table(record)
        if args.write:
            bench.write_keeping_notes(Path(args.write),
                                      cache_bench.benchmarks_document(record, table))
        if args.json:
            print(json.dumps(record))
        else:
            print(table)
            print(cache_bench.summary_line(record))
        return 0

    def leaderboard(self, args: argparse.Namespace) -> int:
        from kvjax.cache import leaderboard

        results, speed = leaderboard.evaluate(POLICY_NAMES, leaderboard.TIERS,
                                              args.num_scenarios, args.seed)
        text = leaderboard.document(results, args.num_scenarios, args.seed, speed, args.note)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
        print(leaderboard.console_table(results))
        print(f"wrote {args.output}")
        return 0

    def commands(self) -> dict[str, tuple[Any, Any]]:
        from kvjax.cache.llm import add_eval_llm_parser, cmd_eval_llm

        return {"eval-llm": (add_eval_llm_parser, cmd_eval_llm)}


HARNESS = KVCacheHarness()

__all__ = ["HARNESS", "KVCacheHarness"]
