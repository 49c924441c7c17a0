"""kv-serve-v0 pytrees: the request table, the prefix-segment table, the engine's scalars, the
episode's metrics, the static `ServeConfig` and the traced `ServeParams`.

Units: time in seconds (float32, per scenario); KV memory in 16-token blocks (int32) of the
scenario's KV dtype; lengths in tokens. Every table is fixed-capacity struct-of-arrays with a
`status` / `valid` field saying which rows hold something.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
from flax import struct

BLOCK_TOKENS = 16  # vLLM's default block size (serving.md section 2)

# Request status (one row of the request table).
# TOOL: an agentic session's next call, waiting for its tool to return (serve/workload.py).
EMPTY, WAITING, RUNNING, OFFLOADING, SWAPPED, LOADING, TOOL = 0, 1, 2, 3, 4, 5, 6
STATUSES = ("empty", "waiting", "running", "offloading", "swapped", "loading", "tool")
# Engines (scheduling / preemption rule sets).
VLLM, SGLANG, TRT = 0, 1, 2
ENGINES = ("vllm", "sglang", "trt")
KV_DTYPES = ("bf16", "fp8")
# Discrete commands; a command id is 0 (noop) or encodes (kind, target), see serve/actions.py.
COMMAND_KINDS = ("noop", "offload", "preempt", "pin", "drop", "reserve")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Static, shape-fixing configuration (hashable, never traced)."""

    max_requests: int = 64  # S: rows of the request table (waiting + running + swapped)
    max_segments: int = 8  # G: rows of the prefix-segment table
    max_commands: int = 2  # A: discrete commands per env step
    iterations_per_step: int = 16  # k: engine iterations per env step (the control period)
    max_arrivals_per_iter: int = 4  # K: requests moved from the stream into the table per iteration
    max_steps: int = 2000  # env steps before truncation if the horizon is not reached first
    finished_log: int = 2048  # R: ring buffer of finished requests' TTFT / TPOT (percentiles)
    priority_levels: int = 4  # L: retention priority levels 0 (evict first) .. L-1 (keep)
    reserve_levels: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)  # admission reserve fractions
    # A trace to replay (serve/replay.ReplayTrace, hashed by content); None: the synthetic
    # workload `params.workload`.
    trace: Any = None
    # The agentic closed-loop workload (sessions of calls separated by tool gaps).
    agentic: bool = False
    # The engine's rules traced: one of ENGINES - only that engine's rules (params.engine must
    # name the same engine; validate_params checks), what kvjax.make(engine=...) builds; None -
    # the engine is `params.engine`, traced: every iteration evaluates the vLLM, SGLang and TRT
    # rules and selects (slower, one compile for every engine, e.g. vmapped over engines).
    engine: str | None = None

    @property
    def default_priority(self) -> int:
        """The retention priority a new request or prefix segment starts at: the middle level
        (rounded down), so the agent can raise or lower it."""
        return (self.priority_levels - 1) // 2

    @property
    def num_command_ids(self) -> int:
        """noop + offload/preempt per request + pin/drop per segment + reserve levels."""
        return 1 + 2 * self.max_requests + 2 * self.max_segments + len(self.reserve_levels)


@struct.dataclass
class ServeParams:
    """Traced, per-scenario parameters (vmappable). Defaults: `toy`; presets in serve/presets.py."""

    # engine rules
    # index into ENGINES; read only when ServeConfig.engine is None (a traced engine). With a
    # static engine (what make(engine=...) builds) its rules run whatever this holds: a concrete
    # mismatch is rejected by validate_params, a traced one cannot be checked.
    engine: chex.Array = VLLM
    max_num_seqs: chex.Array = 64  # running requests at most
    max_batched_tokens: chex.Array = 2048  # scheduled tokens per iteration at most
    max_partial_prefills: chex.Array = 1  # requests with an unfinished prefill at once
    sglang_ratio_init: chex.Array = 0.7  # SGLang new_token_ratio after a retraction
    sglang_ratio_min: chex.Array = 0.1
    sglang_ratio_decay: chex.Array = 0.001  # per iteration ((0.7 - 0.1) / 600)
    sglang_retract_tokens: chex.Array = 20  # retract until num_reqs x this many tokens are free
    sglang_reserve_cap: chex.Array = 4096  # min(max_new - generated, cap) in the reserve
    # memory
    kv_dtype: chex.Array = 0  # index into KV_DTYPES; fp8 halves bytes per token
    kv_bytes_per_token: chex.Array = 131072.0  # bf16 bytes per token (Llama-3-8B: 128 KiB)
    gpu_pool_tokens: chex.Array = 131072  # KV pool in bf16 tokens (fp8 fits twice as many)
    cpu_pool_tokens: chex.Array = 262144  # CPU tier capacity in bf16 tokens
    pcie_bytes_per_s: chex.Array = 50e9  # one direction
    # iteration latency (serve/latency.py)
    t_cpu: chex.Array = 1e-3
    t_weights: chex.Array = 5.6e-3
    lin_a: chex.Array = 1.4e-3
    lin_b: chex.Array = 23.9e-6  # per scheduled token
    attn_decode: chex.Array = 56e-9  # per bf16 context token read by a decode
    attn_prefill: chex.Array = 1.06e-9  # per (query, key) pair of a prefill chunk
    # workload (serve/workload.py)
    workload: chex.Array = 0  # index into workload.WORKLOADS
    arrival_rate: chex.Array = 4.0  # requests per second
    gap_sigma: chex.Array = 1.0  # lognormal sigma of inter-arrival gaps (burstiness)
    max_model_len: chex.Array = 32768
    max_tokens: chex.Array = 2048  # the client's max_tokens (observable); outputs are clipped
    num_prefixes: chex.Array = 4  # distinct shared system prompts (<= max_segments)
    prefix_tokens: chex.Array = 1024  # length of each shared system prompt
    prefix_share: chex.Array = 0.5  # fraction of requests that start with one
    # agentic sessions (workload.py; used when ServeConfig.agentic)
    subagent_share: chex.Array = 0.3  # sessions that are subagents (1-3 calls)
    agent_turns: chex.Array = 12.0  # mean calls of a main agent session
    agent_task_tokens: chex.Array = 4000.0  # median task tokens after the system prompt
    agent_output_tokens: chex.Array = 300.0  # median output tokens of a call
    tool_gap_median: chex.Array = 5.2  # s, median tool gap between calls
    tool_gap_sigma: chex.Array = 1.18  # lognormal sigma (p99 81.4 s)
    agent_turn_tokens: chex.Array = 2000.0  # median new tokens per call (tool results)
    calls_per_arrival: chex.Array = 1.0  # expected calls per stream arrival (score denominator)
    # client and scoring
    client_timeout: chex.Array = 60.0  # a waiting request is dropped after this long
    ttft_slo: chex.Array = 2.0
    tpot_slo: chex.Array = 0.1
    horizon: chex.Array = 60.0  # simulated seconds per episode
    pin_ttl: chex.Array = 5.0  # seconds a pin command holds a segment


@struct.dataclass
class RequestTable:
    """Requests in the system [S]: waiting, running, offloading, swapped to CPU or loading."""

    status: chex.Array  # int32, STATUSES
    index: chex.Array  # int32, request index in the workload stream (-1 when empty)
    turn: chex.Array  # int32, the call's number within its agentic session (0 otherwise)
    arrival: chex.Array  # float32 s
    prompt: chex.Array  # int32 prompt tokens
    output_len: chex.Array  # int32 tokens it will generate (hidden from the agent)
    max_tokens: chex.Array  # int32 the client's cap (observable)
    segment: chex.Array  # int32 key of the prefix segment it reads, -1 for none
    segment_up: chex.Array  # int32 fallback key (an ancestor of `segment`), -1 for none
    prefix_len: chex.Array  # int32 tokens of `segment` (a block multiple)
    publish: chex.Array  # int32 key of a deeper segment its prompt makes reusable, -1 for none
    publish_len: chex.Array  # int32 tokens of `publish` (a block multiple)
    attached: chex.Array  # int32 segment row holding its first tokens[row] tokens, -1 for none
    computed: chex.Array  # int32 tokens whose KV is computed (prompt progress + decoded)
    target: chex.Array  # int32 tokens to prefill before the next token (prompt + generated)
    generated: chex.Array  # int32 output tokens so far
    queue_key: chex.Array  # int32 waiting order (smaller first; preempted requests negative)
    run_key: chex.Array  # int32 running order (order of admission)
    priority: chex.Array  # int32 retention priority 0..L-1 (agent-set)
    first_token: chex.Array  # float32 s, -1 before the first token
    last_token: chex.Array  # float32 s
    preemptions: chex.Array  # int32 times preempted (recompute or offload)
    recomputed: chex.Array  # int32 tokens prefilled again after preemptions
    hit_tokens: chex.Array  # int32 prompt tokens served from the prefix cache
    xfer_done: chex.Array  # float32 s when an offload or load completes
    cpu_blocks: chex.Array  # int32 blocks it holds in the CPU tier


@struct.dataclass
class SegmentTable:
    """Cached prefix segments [G] as a tree of rows (a system prompt, a conversation's history,
    a trace's prefix-forest node); the rules are serve/engine/blocks.py's segment helpers."""

    valid: chex.Array  # bool: the row holds a key
    key: chex.Array  # int32 content id (distinct over valid rows), -1 for a row never used
    parent: chex.Array  # int32 row it extends, -1 when it starts at token 0
    tokens: chex.Array  # int32 its end from the prompt's first token, a multiple of BLOCK_TOKENS
    on_gpu: chex.Array  # bool, its blocks are cached on the GPU
    last_access: chex.Array  # float32 s (LRU)
    priority: chex.Array  # int32 retention priority 0..L-1
    pinned_until: chex.Array  # float32 s; not evictable before


@struct.dataclass
class Metrics:
    """Episode accumulators (per scenario)."""

    arrived: chex.Array  # int32 requests that entered the table (offered; see engine.arrivals)
    finished: chex.Array  # int32
    good: chex.Array  # int32 finished within both SLOs
    timed_out: chex.Array  # int32 dropped by the client timeout
    preemptions: chex.Array  # int32 engine preemptions (recompute)
    agent_preemptions: chex.Array  # int32 preempt commands carried out
    offloads: chex.Array  # int32 offload commands carried out
    invalid_commands: chex.Array  # int32 commands that named nothing valid
    output_tokens: chex.Array  # int32 tokens generated
    prompt_tokens: chex.Array  # int32 tokens looked up in the prefix cache at fresh admissions
    hit_tokens: chex.Array  # int32 prompt tokens served from the prefix cache
    recomputed_tokens: chex.Array  # int32 tokens prefilled again after preemptions
    prefill_tokens: chex.Array  # int32 tokens prefilled in all
    ttft_sum: chex.Array  # float32 s over finished requests
    tpot_sum: chex.Array  # float32 s over finished requests
    e2e_sum: chex.Array  # float32 s over finished requests (last token - arrival)
    log_ttft: chex.Array  # float32 [R] ring buffer of finished requests' TTFT
    log_tpot: chex.Array  # float32 [R]
    log_count: chex.Array  # int32 entries written (ring position = log_count % R)


@struct.dataclass
class ServeState:
    """One scenario of kv-serve-v0."""

    requests: RequestTable
    segments: SegmentTable
    metrics: Metrics
    seed: chex.Array  # uint32 [2]: the workload stream's seed (serve/workload.py)
    stream_start: chex.Array  # int32 the stream's first request (a replayed trace's window)
    clock: chex.Array  # float32 s
    next_index: chex.Array  # int32 next request of the stream to enter the table
    next_arrival: chex.Array  # float32 s its arrival time
    run_counter: chex.Array  # int32 admissions so far (the next run_key)
    preempt_counter: chex.Array  # int32 preemptions so far (queue_key of the next: -1 - it)
    new_token_ratio: chex.Array  # float32 SGLang admission reserve ratio
    reserve_level: chex.Array  # int32 index into ServeConfig.reserve_levels
    link_free: chex.Array  # float32 [2] s when the GPU->CPU / CPU->GPU link is next free
    last_iter_time: chex.Array  # float32 s of the last engine iteration
    recent_ttft: chex.Array  # float32 s, exponential average over finished requests
    recent_tpot: chex.Array  # float32 s
    iterations: chex.Array  # int32 engine iterations run
    steps: chex.Array  # int32 env steps taken
