"""kvjax: a JAX-accelerated, batched simulator of GPU KV-cache pressure in LLM serving.

Submodules the README uses are attributes of the package: `kvjax.rollout`, `kvjax.policies`,
`kvjax.session`, `kvjax.viz`, ... (imported on first access, so `import kvjax` stays light).
"""

import importlib as _importlib

from kvjax.env import KVCacheEnv, decode_action, difficulty_index, encode_action, make
from kvjax.observations import Observation, action_mask, observe, summarize
from kvjax.rewards import COMPONENTS, METRICS, rubric
from kvjax.types import (
    ACTION_KINDS,
    BLOCK_TYPES,
    DIFFICULTIES,
    EnvConfig,
    EnvParams,
    EnvState,
)

# Submodules reachable as `kvjax.<name>` after a plain `import kvjax` (lazily imported).
SUBMODULES = (
    "adapters", "base", "bench", "dynamics", "env", "layout", "leaderboard", "observations",
    "policies",
    "reference", "rewards", "rollout", "scenarios", "serve", "session", "spaces", "types",
    "validation", "viz",
)

# gymnax.make("kv-cache-v0" / "kv-cache-flat-v0") once gymnax (the optional extra) is imported.
_importlib.import_module("kvjax.gymnax_hook").install()


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
    "observe",
    "rubric",
    "summarize",
]
