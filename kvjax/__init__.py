"""kvjax: a JAX-accelerated, batched simulator of GPU KV-cache pressure in LLM serving."""

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
