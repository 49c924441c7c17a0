"""kvjax: a JAX-accelerated, batched simulator of GPU KV-cache pressure in LLM serving.

Two peer environment packages over one generic floor:
- `kvjax.cache`: kv-cache-v0, the seed environment (evict / compress / swap_to_cpu / keep);
- `kvjax.serve`: kv-serve-v0, the same kind of agent inside a serving engine's rules and clock;
- the floor: `registry` (env id -> package: the one place the harness learns which envs
  exist), `base`, `spaces`, `rng`, `validation`, `stats`, and the harness (`rollout`, `bench`,
  `cli`) that takes any registered environment.
Submodules are attributes of the package (imported on first access, so `import kvjax` stays
light). kv-cache-v0's public names (`kvjax.rubric`, `kvjax.KVCacheEnv`, ...) stay here.
"""

import importlib as _importlib

from kvjax.cache.env import KVCacheEnv, decode_action, difficulty_index, encode_action
from kvjax.cache.observations import Observation, action_mask, observe, summarize
from kvjax.cache.rewards import COMPONENTS, METRICS, rubric
from kvjax.cache.types import (
    ACTION_KINDS,
    BLOCK_TYPES,
    DIFFICULTIES,
    EnvConfig,
    EnvParams,
    EnvState,
)
from kvjax.registry import make, make_policy

# Submodules reachable as `kvjax.<name>` after a plain `import kvjax` (lazily imported).
SUBMODULES = (
    "base", "bench", "cache", "cli", "registry", "rollout", "rng", "serve", "spaces", "stats",
    "validation",
)

# gymnax.make("kv-cache-v0" / "kv-cache-flat-v0") once gymnax (the optional extra) is imported.
_importlib.import_module("kvjax.cache.gymnax_hook").install()


def __getattr__(name: str):
    if name in SUBMODULES:
        return _importlib.import_module(f"kvjax.{name}")
    raise AttributeError(f"module 'kvjax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(SUBMODULES))


__all__ = [
    "ACTION_KINDS",
    "BLOCK_TYPES",
    "COMPONENTS",
    "DIFFICULTIES",
    "METRICS",
    "EnvConfig",
    "EnvParams",
    "EnvState",
    "KVCacheEnv",
    "Observation",
    "action_mask",
    "decode_action",
    "difficulty_index",
    "encode_action",
    "make",
    "make_policy",
    "observe",
    "rubric",
    "summarize",
]
