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

This module is the generic half (the held-out scenarios, the command line, the output files);
each env's evaluation - its baselines, tables and options - is in its agent module
(train/agents/cache.py, train/agents/serve.py: `evaluate_checkpoint`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from kvjax import registry
from kvjax.validation import ArgumentParser, check_writable_file, fail, positive_int, seed_arg
from train.heldout import EVAL_SEED


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
