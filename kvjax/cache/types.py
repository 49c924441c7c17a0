"""Pytrees that hold a scenario: per-slot sequences, the pending queue, the arrival schedule,
episode counters and the traced, per-scenario parameters.

All arrays are fixed-capacity struct-of-arrays so that every scenario in a batch has the same
shapes; an `active` / `valid` mask says which rows hold something. Memory is counted in
*fp16-token equivalents* (KV tokens x precision factor) so that the arithmetic is exact in
float32; bytes are that times `EnvParams.kv_bytes_per_token`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import serialization, struct

from kvjax import validation

# Block types (Dynamo's value table, highest value first).
SYSTEM, CONTEXT, GENERATION, REASONING, EPHEMERAL = 0, 1, 2, 3, 4
BLOCK_TYPES = ("system", "context", "generation", "reasoning", "ephemeral")
# KV precision tiers; memory factor is 0.5 ** tier.
PRECISIONS = ("fp16", "int8", "int4")
# Where a sequence's KV lives.
GPU, CPU = 0, 1
LOCATIONS = ("gpu", "cpu")
# Action kinds; an action id is 0 (keep) or 1 + kind * max_seqs + slot.
KEEP, EVICT, COMPRESS, SWAP = 0, 1, 2, 3
ACTION_KINDS = ("keep", "evict", "compress", "swap_to_cpu")
DIFFICULTIES = ("easy", "medium", "hard", "all")
# Arrival regimes; each tier draws one of two per scenario (see scenarios.py).
REGIMES = ("low", "medium", "high", "bursty")


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """Static, shape-fixing configuration (hashable; lives on the env object, never traced)."""

    max_seqs: int = 32  # S: cache slots
    max_pending: int = 16  # P: pending-queue capacity
    max_actions: int = 3  # A: actions the agent takes per step
    episode_len: int = 15  # T: steps per episode (then truncation)
    max_arrivals: int = 4  # K: most requests that can arrive in one step

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 2**20:
                raise ValueError(f"EnvConfig.{f.name} must be an int in [1, 2**20], got {v!r}")
        if self.max_arrivals > self.max_pending:
            raise ValueError(f"EnvConfig.max_arrivals ({self.max_arrivals}) must be <= "
                             f"max_pending ({self.max_pending})")

    @property
    def num_action_ids(self) -> int:
        """keep + (evict, compress, swap) x slots."""
        return 1 + 3 * self.max_seqs


@struct.dataclass
class Requests:
    """A table of requests that are not (yet) in a cache slot: the pending queue [P] or the
    arrival schedule [T, K]. Row order is arrival order (FIFO)."""

    valid: chex.Array  # bool, row holds a request
    seq_id: chex.Array  # int32, stable id, -1 where invalid
    block_type: chex.Array  # int32 in [0, 5)
    tokens: chex.Array  # int32, prompt KV tokens needed on admission
    output_len: chex.Array  # int32, tokens to generate before completion (0 for system)
    priority: chex.Array  # int32 in [0, 100] (TensorRT-LLM retention priority)
    tool_period: chex.Array  # int32, decode steps between tool calls (0 = not agentic)
    tool_wait_len: chex.Array  # int32, steps a tool call pauses the sequence
    tool_tokens: chex.Array  # int32, KV tokens a tool result appends when it returns
    arrival_step: chex.Array  # int32, episode step it arrived (negative = before the episode)


@struct.dataclass
class Slots:
    """The GPU/CPU KV cache: `max_seqs` sequence slots, each one sequence or empty."""

    active: chex.Array  # bool [S]
    seq_id: chex.Array  # int32 [S], -1 where empty
    block_type: chex.Array  # int32 [S]
    tokens: chex.Array  # int32 [S], KV tokens held (prompt + generated + tool results)
    precision: chex.Array  # int32 [S], 0 fp16, 1 int8, 2 int4
    location: chex.Array  # int32 [S], 0 GPU, 1 CPU
    priority: chex.Array  # int32 [S], 0..100
    eviction_value: chex.Array  # float32 [S], 1 - priority/100: 0 worst to evict, 1 safest
    output_len: chex.Array  # int32 [S], total tokens this request generates
    remaining: chex.Array  # int32 [S], tokens still to generate
    last_access: chex.Array  # int32 [S], last step the sequence decoded or was touched
    tool_period: chex.Array  # int32 [S], decode steps between tool calls (0 = none)
    tool_wait_len: chex.Array  # int32 [S]
    tool_tokens: chex.Array  # int32 [S]
    tool_countdown: chex.Array  # int32 [S], decode steps until the next tool call
    tool_wait: chex.Array  # int32 [S], steps left in the current tool call (paused if > 0)
    arrival_step: chex.Array  # int32 [S]


@struct.dataclass
class Counters:
    """Episode accumulators the rubric reads. All float32 scalars unless noted."""

    tokens: chex.Array  # quality-weighted generated tokens
    raw_tokens: chex.Array  # generated tokens, unweighted
    failures: chex.Array  # int32: forced preemptions + queue overflows + queue timeouts
    preemptions: chex.Array  # int32: engine-forced preemptions
    queue_overflows: chex.Array  # int32: arrivals dropped because the queue was full
    queue_timeouts: chex.Array  # int32: pending requests dropped after max_wait_steps
    completed: chex.Array  # int32: requests that finished generating
    latency: chex.Array  # seconds: swap transfers + stalls of ready sequences on CPU
    headroom: chex.Array  # sum over steps of the per-step headroom score
    evictions: chex.Array  # int32: agent evictions
    eviction_value_sum: chex.Array  # sum of eviction_value over agent evictions
    high_value_lost: chex.Array  # int32: system/context sequences evicted or preempted
    risky_evictions: chex.Array  # int32: agent evictions of system/high-priority/high-progress
    compressions: chex.Array  # int32
    swaps: chex.Array  # int32: agent swap-outs
    swap_ins: chex.Array  # int32: engine swap-ins
    invalid_actions: chex.Array  # int32: no-op actions that named nothing valid


@struct.dataclass
class EnvState:
    """One scenario's full state, including its future (the seed its arrivals are drawn from)."""

    slots: Slots
    pending: Requests  # [P]
    # Arrivals of step t are appended at the end of step t. A generated scenario draws them from
    # `seed` when they arrive and holds an empty [T, 0] table here; a hand-built one holds the
    # [T, K] table (scenarios.build), which the step reads.
    arrivals: Requests
    counters: Counters
    time: chex.Array  # int32, steps played so far
    usage_peak: chex.Array  # float32, usage before engine preemption in the last step
    time_above_0_95: chex.Array  # int32, steps whose peak usage exceeded 0.95
    pending_queue_growth: chex.Array  # int32, change in pending count over the last step
    tier: chex.Array  # int32, difficulty tier this scenario was drawn from (0..2)
    regime: chex.Array  # int32, arrival regime (index into REGIMES)
    memory_budget: chex.Array  # float32, fraction of kv_cache_bytes this scenario may use
    seed: chex.Array  # uint32 [2], the scenario's hash seed: its future arrivals


@dataclasses.dataclass(frozen=True)
class EnvParams:
    """Traced, per-scenario parameters (vmappable). Defaults follow the seed environment and
    ../docs/dynamics.md; units are in the comments.

    A pytree (like a flax struct). Construction and `replace` check every concrete value
    against `PARAM_SPECS` (finite; positive where physical; integers for counts; `difficulty`
    one of the tiers 0..3) and raise a ValueError naming the field and the allowed range;
    traced values (inside jit / vmap / grad) and pytree unflattening are not checked."""

    difficulty: int | chex.Array = 3  # 0 easy, 1 medium, 2 hard, 3 all (mixed per scenario)
    kv_cache_bytes: float | chex.Array = 8.0 * 2**30  # bytes of GPU memory at budget 1.0
    kv_bytes_per_token: float | chex.Array = 131072.0  # Llama-3-8B fp16: 128 KiB/token
    swap_bandwidth: float | chex.Array = 50e9  # bytes/s one-way over PCIe Gen5 (measured H100)
    step_seconds: float | chex.Array = 0.1  # wall time one step stands for (stall latency)
    decode_tokens_per_step: int | chex.Array = 3  # tokens a running sequence generates a step
    arrival_scale: float | chex.Array = 1.0  # multiplies every arrival rate
    admit_watermark: float | chex.Array = 0.9  # schedule (admit/swap-in) only up to this usage
    max_wait_steps: int | chex.Array = 4  # a pending request waiting longer fails
    # Rubric weights (seed).
    w_failure: float | chex.Array = 0.40
    w_throughput: float | chex.Array = 0.25
    w_headroom: float | chex.Array = 0.18
    w_memory_efficiency: float | chex.Array = 0.07
    w_eviction_quality: float | chex.Array = 0.05
    w_latency: float | chex.Array = 0.03
    w_risky_eviction: float | chex.Array = 0.02
    # Rubric constants (seed).
    throughput_target_tokens: float | chex.Array = 500.0
    latency_scale: float | chex.Array = 0.2  # penalty per second of latency
    latency_cap: float | chex.Array = 0.3

    def __post_init__(self):
        validation.check_fields("EnvParams", self, PARAM_SPECS)

    def replace(self, **updates: Any) -> EnvParams:
        """A copy with `updates` applied (checked like construction)."""
        return dataclasses.replace(self, **updates)


_POS = validation.Spec(0.0, lo_open=True)
_NONNEG = validation.Spec(0.0)
# The allowed values of every EnvParams field (checked on construction and replace). Physical
# quantities are bounded so that every float32 quantity of an episode stays finite (capacity
# bytes / bytes-per-token, transfer seconds, stall seconds, the weighted total).
PARAM_SPECS: dict[str, validation.Spec] = {
    "difficulty": validation.Spec(integer=True, choices=dict(enumerate(
        ("easy", "medium", "hard", "all")))),
    "kv_cache_bytes": validation.Spec(1.0, 2.0**60),  # 1 B .. 1 EiB
    "kv_bytes_per_token": validation.Spec(1.0, 2.0**30),  # 1 B .. 1 GiB per token
    "swap_bandwidth": validation.Spec(1.0, 1e15),  # 1 B/s .. 1 PB/s
    "step_seconds": validation.Spec(0.0, 86400.0, lo_open=True),  # up to a day per step
    "decode_tokens_per_step": validation.Spec(1, integer=True),
    "arrival_scale": _NONNEG,
    "admit_watermark": validation.Spec(0.0, 1.0),
    "max_wait_steps": validation.Spec(1, integer=True),
    **{f"w_{k}": validation.Spec(0.0, 1e6) for k in (
        "failure", "throughput", "headroom", "memory_efficiency", "eviction_quality", "latency",
        "risky_eviction")},
    "throughput_target_tokens": _POS,
    "latency_scale": _NONNEG,
    "latency_cap": _NONNEG,
}
_PARAM_NAMES = tuple(f.name for f in dataclasses.fields(EnvParams))
assert set(PARAM_SPECS) == set(_PARAM_NAMES)


def _params_flatten_with_keys(p: EnvParams):
    return [(jax.tree_util.GetAttrKey(n), getattr(p, n)) for n in _PARAM_NAMES], None


def _params_unflatten(_aux, children) -> EnvParams:
    # Unflattening (tree_map, vmap in_axes, grad outputs, ...) is not construction: no checks.
    obj = object.__new__(EnvParams)
    for n, v in zip(_PARAM_NAMES, children, strict=True):
        object.__setattr__(obj, n, v)
    return obj


jax.tree_util.register_pytree_with_keys(
    EnvParams, _params_flatten_with_keys, _params_unflatten,
    lambda p: ([getattr(p, n) for n in _PARAM_NAMES], None),
)


def _params_from_state_dict(target: EnvParams, state: dict[str, Any]) -> EnvParams:
    unknown = set(state) - set(_PARAM_NAMES)
    missing = set(_PARAM_NAMES) - set(state)
    if unknown or missing:
        raise ValueError(f"EnvParams state dict: unknown fields {sorted(unknown)}, missing "
                         f"{sorted(missing)}; fields: {list(_PARAM_NAMES)}")
    return target.replace(**{n: serialization.from_state_dict(getattr(target, n), state[n])
                             for n in _PARAM_NAMES})


serialization.register_serialization_state(
    EnvParams, lambda p: {n: serialization.to_state_dict(getattr(p, n)) for n in _PARAM_NAMES},
    _params_from_state_dict,
)


def memory_factor(precision: chex.Array) -> chex.Array:
    """fp16 -> 1.0, int8 -> 0.5, int4 -> 0.25 (float32)."""
    return jnp.where(precision == 0, 1.0, jnp.where(precision == 1, 0.5, 0.25)).astype(jnp.float32)


def eviction_value_of(priority: chex.Array) -> chex.Array:
    """1 - priority / 100 (TensorRT-LLM priority -> seed's eviction_value), written so that
    priority 100 gives exactly 0 under jit too (XLA turns / 100 into * 0.01)."""
    return (100 - priority).astype(jnp.float32) / 100.0
