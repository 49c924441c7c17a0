"""Adapters that put kvjax behind other frameworks' interfaces (each an optional extra).

- `kvjax.cache.llm.verifiers`: the LLM tool-calling evaluation on verifiers v1
  (`pip install -e ".[verifiers]"`; needs `verifiers>=0.4.0,<0.5`).

Importing this package never imports an optional dependency (nor JAX): the `kvjax eval-llm`
subcommand below imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys

from kvjax.validation import check_writable_dir, positive_int, seed_arg

DIFFICULTY_CHOICES = ("easy", "medium", "hard", "all")


def add_eval_llm_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `kvjax eval-llm` on a subparsers object (see `cmd_eval_llm`)."""
    p = sub.add_parser(
        "eval-llm",
        help="the LLM tool-calling evaluation: a model at an OpenAI-compatible endpoint "
        "(verifiers v1), or --policy NAME through the same tools",
        description="Run the LLM tool-calling evaluation on the kv_cache_eviction taskset: "
        "--model/--base-url drive a model through verifiers' run_eval (needs the "
        "[verifiers] extra); --policy plays a kvjax policy through the same tool interface "
        "on the same scenarios (no endpoint). See docs/llm-eval.md.",
    )
    p.add_argument("--model", "-m", help="model id at the endpoint")
    p.add_argument("--base-url", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    p.add_argument("--api-key-var", default="OPENAI_API_KEY",
                   help="environment variable holding the endpoint's API key")
    p.add_argument("--policy", help="a kvjax policy name instead of a model")
    p.add_argument("--difficulty", default="all", choices=DIFFICULTY_CHOICES,
                   help="the tier of the scenarios (default: all)")
    p.add_argument("--num-examples", "-n", type=positive_int, default=5,
                   help="scenarios 0..n-1")
    p.add_argument("--seed", type=seed_arg, default=42,
                   help="scenario stream seed (taskset seed), in [0, 2**32)")
    p.add_argument("--output-dir", default="outputs", help="vf-eval results directory")
    return p


def _fail(message: str) -> int:
    print(f"kvjax eval-llm: error: {message}", file=sys.stderr)
    return 2


def cmd_eval_llm(args: argparse.Namespace) -> int:
    """Run `kvjax eval-llm`; bad input prints the allowed values and returns 2."""
    if args.num_examples < 1:
        return _fail(f"--num-examples must be >= 1, got {args.num_examples}")
    if args.policy is not None:
        if args.model or args.base_url:
            return _fail("give either --policy or --model/--base-url, not both")
        from kvjax.cache.llm.session import main as policy_main

        return policy_main(["--policy", args.policy, "--difficulty", args.difficulty,
                            "--num-examples", str(args.num_examples), "--seed", str(args.seed)])
    if not args.model or not args.base_url:
        return _fail("--model and --base-url are required (or --policy NAME)")
    try:
        check_writable_dir(args.output_dir, "--output-dir")
    except ValueError as e:
        return _fail(str(e))
    try:
        from kvjax.cache.llm import verifiers as adapter
    except ImportError as e:
        return _fail(f"{e}; install the extra: pip install -e \".[verifiers]\"")
    return adapter.main([
        "--model", args.model, "--base-url", args.base_url, "--api-key-var", args.api_key_var,
        "--difficulty", args.difficulty, "--num-examples", str(args.num_examples),
        "--seed", str(args.seed), "--output-dir", args.output_dir,
    ])


__all__ = ["add_eval_llm_parser", "cmd_eval_llm"]
