"""kv-cache-v0: the seed environment "kv-cache-rl" as a batched JAX environment (docs/dynamics.md).

    env, params = kvjax.make("kv-cache-v0", difficulty="hard")

Modules, one job each: types (pytrees, config, params), scenarios (workload schedules), layout
(the batch-trailing [slot, batch] idioms), dynamics (one step's engine rules), rewards (the
seven weighted rubric components), observations, env (the gymnax-style API), policies (the
baselines), reference (the pure-Python oracle), rollout (its episodes for the rollout engine),
bench, leaderboard, viz (plots), gymnax_env and gymnax_hook (gymnax.make registration), harness
(what the generic harness needs: kvjax.registry), llm/ (the one-scenario session and the
verifiers tool-calling adapter).
Submodules are attributes of the package, imported on first access.
"""

import importlib as _importlib

SUBMODULES = (
    "bench", "dynamics", "env", "gymnax_env", "gymnax_hook", "harness", "layout", "leaderboard",
    "llm", "observations", "policies", "reference", "rewards", "rollout", "scenarios", "types",
    "viz",
)


def __getattr__(name: str):
    if name in SUBMODULES:
        return _importlib.import_module(f"kvjax.cache.{name}")
    raise AttributeError(f"module 'kvjax.cache' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(SUBMODULES))
