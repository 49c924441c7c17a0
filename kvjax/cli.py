"""`kvjax` command line: demo, eval, bench, leaderboard over any registered environment, plus
the commands an environment adds (kv-cache-v0: eval-llm; kv-serve-v0: workload).

    kvjax demo [--env kv-cache-v0] [--num-scenarios N] [--seed 0] [--out-dir runs]
    kvjax eval --policy NAME [--env ID] [--num-scenarios N] [--seed S] [--json] [env options]
    kvjax bench [--env ID] [--json] [--batch-sizes ...] [--repeats R] [--write PATH] [env options]
    kvjax leaderboard [--env ID] [--num-scenarios N] [--seed 0] [--output PATH] [env options]
    kvjax eval-llm -m MODEL --base-url URL [--difficulty T] [-n N]    (docs/llm-eval.md)
    kvjax workload stats NAME_OR_FILE [--plot PATH] [--json]          (a kv-serve-v0 trace)

Env options: kv-cache-v0 `--difficulty`, `--policies`, `--standard`; kv-serve-v0 `--preset`,
`--engine`, `--load`, `--workload`, `--horizon`, ... (`kvjax COMMAND --help` lists them by env).
Each env's options, defaults and documents come from its package's Harness (kvjax.registry); an
option of another env, an unknown name or a bad number exits with code 2 and one line naming
the allowed values, before any work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from kvjax import registry
from kvjax.validation import ArgumentParser, check_writable_dir, check_writable_file, fail
from kvjax.validation import positive_int as _positive
from kvjax.validation import seed_arg as _seed

GENERIC_COMMANDS = ("demo", "eval", "bench", "leaderboard")


def _env_argument(p: argparse.ArgumentParser) -> None:
    ids = registry.env_ids()
    p.add_argument("--env", choices=ids, default=registry.DEFAULT_ENV_ID,
                   help="the environment: " + "; ".join(
                       f"{i}: {registry.harness(i).summary}" for i in ids)
                   + f" (default: {registry.DEFAULT_ENV_ID})")


def _add_env_options(p: argparse.ArgumentParser, command: str) -> None:
    """Every registered env's options of `command`; which env owns which dest is kept on the
    parser (`_env_dests`) to refuse an option given for another env."""
    p.set_defaults(_env_dests={i: registry.harness(i).add_options(p, command)
                               for i in registry.env_ids()})


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(  # one-line errors, exit code 2
        prog="kvjax", description="Batched KV-cache pressure simulator: baselines and benchmark."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    all_policies = sorted({n for i in registry.env_ids() for n in registry.policy_names(i)})

    demo = sub.add_parser("demo", help="the env's main job on a built-in default: every "
                                       "baseline, a table, a plot and the speed")
    _env_argument(demo)
    demo.add_argument("--num-scenarios", type=_positive, default=None,
                      help="scenarios per setting (default: the env's; 4,096 per tier)")
    demo.add_argument("--seed", type=_seed, default=0, help="root seed of the scenarios")
    demo.add_argument("--out-dir", default="runs", help="where the plot is saved")
    _add_env_options(demo, "demo")

    ev = sub.add_parser("eval", help="one policy on one scenario setting: means and 95%% "
                                     "intervals of every result")
    _env_argument(ev)
    ev.add_argument("--policy", required=True, choices=all_policies, metavar="POLICY",
                    help="a policy of the env: " + "; ".join(
                        f"{i}: {', '.join(registry.policy_names(i))}" for i in registry.env_ids()))
    ev.add_argument("--num-scenarios", type=_positive, default=1024,
                    help="scenarios (episodes) to run (default: 1,024)")
    ev.add_argument("--seed", type=_seed, default=0, help="root seed of the scenarios")
    ev.add_argument("--json", action="store_true", help="print one JSON record")
    _add_env_options(ev, "eval")

    be = sub.add_parser("bench", help="the env's speed: whole batched episodes per wall "
                                      "second per batch size, beside its reference")
    _env_argument(be)
    be.add_argument("--json", action="store_true", help="print one JSON record")
    be.add_argument("--batch-sizes", type=_positive, nargs="+", default=None,
                    help="scenarios per call (default: the env's, larger on accelerators)")
    be.add_argument("--repeats", type=_positive, default=5,
                    help="timed calls per row; the median is reported (default: 5)")
    be.add_argument("--write", default=None, metavar="PATH",
                    help="also write the markdown report (e.g. docs/benchmarks.md), keeping "
                         "its hand-written notes")
    _add_env_options(be, "bench")

    lb = sub.add_parser("leaderboard", help="regenerate the env's leaderboard document "
                                            "(docs/leaderboard.md, docs/serving-leaderboard.md)")
    _env_argument(lb)
    lb.add_argument("--num-scenarios", type=_positive, default=None,
                    help="scenarios per setting (default: the env's: 4,096 per tier, or 8 "
                         "windows per kv-serve-v0 setting)")
    lb.add_argument("--seed", type=_seed, default=0, help="root seed of the scenarios")
    lb.add_argument("--output", default=None,
                    help="the document to write (default: the env's)")
    lb.add_argument("--note", default="", help="a line added under the header (e.g. load)")
    _add_env_options(lb, "leaderboard")

    for i in registry.env_ids():  # subcommands only one env has
        for add_parser, _ in registry.harness(i).commands().values():
            add_parser(sub)
    return parser


def env_commands() -> dict:
    """Subcommand -> run(args) of the commands the registered envs add."""
    return {name: run for i in registry.env_ids()
            for name, (_, run) in registry.harness(i).commands().items()}


def check_env_options(args: argparse.Namespace) -> None:
    """ValueError for an option of another env or a policy the env does not have; then the
    env fills its defaults and checks its own options (Harness.check_args)."""
    if args.command not in GENERIC_COMMANDS:
        return
    if args.command != "eval":  # demo, bench, leaderboard: the env's own documents
        has = [i for i in registry.env_ids() if registry.harness(i).provides(args.command)]
        if args.env not in has:
            raise ValueError(f"{args.env} has no {args.command}; envs with one: {has}")
    dests = args._env_dests
    mine = set(dests[args.env])
    for other, names in dests.items():
        for name in names:
            if name not in mine and getattr(args, name, None) is not None:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} applies to --env {other} only")
    allowed = registry.policy_names(args.env)
    if getattr(args, "policy", None) is not None and args.policy not in allowed:
        raise ValueError(f"unknown {args.env} policy {args.policy!r}; allowed: {list(allowed)}")
    registry.harness(args.env).check_args(args)


def _cmd_eval(args: argparse.Namespace) -> int:
    import jax

    from kvjax.rollout import rollout, summarize_results

    harness = registry.harness(args.env)
    scenario = harness.scenario(args)
    try:
        env, params = harness.make(**scenario)
    except ValueError as e:
        return fail("kvjax eval", str(e))
    t0 = time.perf_counter()
    res = rollout(harness.make_policy(args.policy, env), jax.random.PRNGKey(args.seed),
                  args.num_scenarios, params, env, progress=not args.json)
    summary = summarize_results(res)
    seconds = round(time.perf_counter() - t0, 3)
    record = {"env": args.env, "policy": args.policy, **harness.record(scenario, params),
              "num_scenarios": args.num_scenarios, "seed": args.seed, "seconds": seconds,
              "results": summary}
    if args.json:
        print(json.dumps(record))
        return 0
    print(harness.eval_header(args.policy, scenario, params, args.num_scenarios, args.seed,
                              seconds))
    for k, v in summary.items():
        print(harness.format_result(k, v["mean"], v["ci95"]))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    return registry.harness(args.env).demo(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    return registry.harness(args.env).bench(args)


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    return registry.harness(args.env).leaderboard(args)


COMMANDS = {"demo": _cmd_demo, "eval": _cmd_eval, "bench": _cmd_bench,
            "leaderboard": _cmd_leaderboard}


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


# Output paths each generic command writes, checked before any work: (attribute, kind). An env's
# own commands check theirs.
OUTPUTS = {"demo": [("out_dir", "dir")], "bench": [("write", "file")],
           "leaderboard": [("output", "file")]}


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
        check_env_options(args)
        check_outputs(args)
    except ValueError as e:
        return fail(f"kvjax {args.command}", str(e))
    use_all_cpu_cores()
    return {**COMMANDS, **env_commands()}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
