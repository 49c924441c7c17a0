"""Held-out evaluation scenarios: every policy on the same scenarios, none of which training
used (scenario i: `fold_in(PRNGKey(EVAL_SEED), i)`; training draws from PRNGKey(seed) split
chains with small seeds)."""

from __future__ import annotations

import sys
from typing import Any

import jax
import numpy as np

EVAL_SEED = 1_000_003  # never a training seed


def run_policies(policies: dict[str, Any], env, params, num_scenarios: int,
                 eval_seed: int = EVAL_SEED, progress: bool = True,
                 label: str = "") -> dict[str, dict[str, np.ndarray]]:
    """-> results[policy] = the rollout engine's per-scenario results (numpy [num_scenarios]);
    every policy plays the same held-out scenarios (scenario i: fold_in(PRNGKey(eval_seed), i))."""
    from kvjax.rollout import rollout

    key = jax.random.PRNGKey(eval_seed)
    out = {}
    for name, pol in policies.items():
        if progress:
            print(f"[evaluate] {label}{name}", file=sys.stderr, flush=True)
        out[name] = rollout(pol, key, num_scenarios, params, env, progress=progress)
    return out


__all__ = ["EVAL_SEED", "run_policies"]
