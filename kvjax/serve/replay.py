"""Trace replay for kv-serve-v0: a trace's requests, and their prefix segments, as the stream an
episode plays (docs/serving.md section 7).

    rt = replay_trace(load_trace("mooncake-conv"))    # NumPy, once per process
    cfg = ServeConfig(..., trace=rt)                   # static: one compile per trace

A `ReplayTrace` holds the trace as device-ready columns. They enter jitted code as constants of
the compiled step, so a process holds one copy whatever the batch: a scenario holds only a
pointer (`ServeState.stream_start`, the window's first request, drawn from its seed at reset)
and the count of requests it has taken (`next_index`). State size does not depend on the trace.

- Window: request `stream_start + j` is the window's j-th request; it arrives at
  (arrival[start + j] - arrival[start - 1]) x time scale (the gaps' float32 running sum, as the
  synthetic stream). The start is uniform over the requests from which the trace still covers
  the horizon; past the trace's end nothing arrives.
- Load: time is scaled so the trace's mean rate (requests / duration) becomes
  `params.arrival_rate`: time scale = native rate / arrival_rate. `make(..., load=x)` sets
  arrival_rate = x times the preset's capacity for the trace's lengths.
- Lengths: prompts clipped to max_model_len - max_tokens, outputs to [1, max_tokens] (the
  synthetic workloads' rule).
- Prefixes (hash-id traces): the forest of traces.py, turned into the engine's segment keys
  (a key is a forest segment id; its tokens = its depth in blocks x block size):
  `segment` is the deepest segment on the path of `prefix_node` shorter than the prompt;
  `segment_up` the nearest proper ancestor of `segment` that some request reads; `publish` the
  deepest segment of the request's own path that some request reads, deeper than `segment`
  and no longer than the prompt. A request whose clipped prompt is not longer than its
  `prefix_len` reads nothing; one shorter than `publish_len` publishes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib

import chex
import jax.numpy as jnp
import numpy as np

from kvjax import rng
from kvjax.serve.traces import Trace
from kvjax.serve.types import BLOCK_TOKENS

# Counter of the window-start draw: beyond every request's counters (8 i + j, i < 2^29).
START_COUNTER = 0xFFFFFFFF
COLUMNS = (
    "gap",
    "input_len",
    "output_len",
    "segment",
    "segment_up",
    "prefix_len",
    "publish",
    "publish_len",
)


@dataclasses.dataclass(frozen=True, eq=False)
class ReplayTrace:
    """A trace as replay columns ([n] each, NumPy; hashed by content so a ServeConfig holding it
    stays a static, hashable jit argument).

    gap: float32 trace seconds since the previous request (0 for the first); input_len,
    output_len: int32 tokens; segment, segment_up, publish: int32 keys (-1 none); prefix_len,
    publish_len: int32 tokens (block multiples); origin: float64 arrival of the request before
    each one (the first's own), for window starts."""

    name: str
    columns: dict
    origin: np.ndarray
    duration: float
    has_prefixes: bool
    digest: str

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other) -> bool:
        return isinstance(other, ReplayTrace) and other.digest == self.digest

    def __repr__(self) -> str:
        return f"ReplayTrace({self.name!r}, {len(self)} requests, {self.duration:.0f} s)"

    def __len__(self) -> int:
        return int(self.origin.shape[0])

    @property
    def native_rate(self) -> float:
        """Requests per trace second (requests / duration)."""
        return len(self) / max(self.duration, 1e-9)


def segment_keys(trace: Trace) -> dict[str, np.ndarray]:
    """segment, segment_up, prefix_len, publish, publish_len ([n] int32) of a hash-id trace's
    requests (module docstring); all -1 / 0 for a trace without prefixes."""
    n = trace.num_requests
    none = np.full(n, -1, np.int32)
    if not trace.has_prefixes or trace.num_nodes == 0:
        return dict(
            segment=none,
            segment_up=none.copy(),
            prefix_len=np.zeros(n, np.int32),
            publish=none.copy(),
            publish_len=np.zeros(n, np.int32),
        )
    parent = trace.node_parent.astype(np.int64)
    tokens = trace.node_depth() * trace.block_size
    inp = trace.input_len.astype(np.int64)
    up = lambda k: np.where(k >= 0, parent[np.maximum(k, 0)], -1)  # noqa: E731
    tok = lambda k: np.where(k >= 0, tokens[np.maximum(k, 0)], 0)  # noqa: E731
    # segment: walk up from prefix_node while it is not shorter than the prompt.
    read = trace.prefix_node.astype(np.int64)
    while np.any(step := (read >= 0) & (tok(read) >= inp)):
        read = np.where(step, up(read), read)
    is_read = np.zeros(trace.num_nodes, bool)
    is_read[read[read >= 0]] = True
    reads = lambda k: (k >= 0) & is_read[np.maximum(k, 0)]  # noqa: E731
    # segment_up: the nearest proper ancestor that some request reads.
    fallback = up(read)
    while np.any(step := (fallback >= 0) & ~reads(fallback)):
        fallback = np.where(step, up(fallback), fallback)
    # publish: the deepest read segment of its own path that fits in the prompt.
    pub = trace.node.astype(np.int64)
    while np.any(step := (pub >= 0) & ~(reads(pub) & (tok(pub) <= inp))):
        pub = np.where(step, up(pub), pub)
    pub = np.where(tok(pub) > tok(read), pub, -1)
    return dict(
        segment=read.astype(np.int32),
        segment_up=fallback.astype(np.int32),
        prefix_len=tok(read).astype(np.int32),
        publish=pub.astype(np.int32),
        publish_len=tok(pub).astype(np.int32),
    )


def replay_trace(trace: Trace) -> ReplayTrace:
    """Columns for replay (NumPy, outside jit; O(n x forest height))."""
    if trace.block_size % BLOCK_TOKENS if trace.has_prefixes else False:
        raise ValueError(
            f"trace {trace.name!r}: block size {trace.block_size} is not a multiple of "
            f"{BLOCK_TOKENS} tokens"
        )
    arrival = np.asarray(trace.arrival, np.float64)
    gap = np.diff(arrival, prepend=arrival[0]).astype(np.float32)
    cols = dict(
        gap=gap,
        input_len=trace.input_len.astype(np.int32),
        output_len=trace.output_len.astype(np.int32),
        **segment_keys(trace),
    )
    h = hashlib.sha1()
    for k in COLUMNS:
        h.update(np.ascontiguousarray(cols[k]).tobytes())
    for a in (trace.node_parent, trace.node_blocks):
        h.update(np.ascontiguousarray(a).tobytes())
    return ReplayTrace(
        name=trace.name,
        columns=cols,
        origin=np.concatenate([arrival[:1], arrival[:-1]]),
        duration=float(arrival[-1] - arrival[0]),
        has_prefixes=trace.has_prefixes,
        digest=h.hexdigest(),
    )


def time_scale(rt: ReplayTrace, params) -> chex.Array:
    """Simulated seconds per trace second: the trace's rate becomes params.arrival_rate."""
    return jnp.float32(rt.native_rate) / jnp.asarray(params.arrival_rate, jnp.float32)


def window_start(rt: ReplayTrace, seed: chex.Array, params) -> chex.Array:
    """The window's first request: uniform over the starts from which the trace covers the
    horizon (0 when none does; make() rejects that case)."""
    need = jnp.asarray(params.horizon, jnp.float32) / time_scale(rt, params)
    last = jnp.float32(rt.origin[-1] + rt.columns["gap"][-1])  # the last arrival
    origin = jnp.asarray(rt.origin - rt.origin[0], jnp.float32)
    starts = jnp.searchsorted(origin, last - jnp.float32(rt.origin[0]) - need, side="right")
    u = rng.uniform(rng.hash_words(seed, jnp.uint32(START_COUNTER)))
    pick = jnp.floor(u * starts.astype(jnp.float32)).astype(jnp.int32)
    return jnp.where(starts > 0, jnp.minimum(pick, starts - 1), 0)


def draw(rt: ReplayTrace, index: chex.Array, params) -> dict:
    """Requests at trace rows `index` (any shape) in draw_request's format; rows past the end
    never arrive (an infinite gap)."""
    n = len(rt)
    i = jnp.clip(index, 0, n - 1)
    col = lambda k: jnp.asarray(rt.columns[k])[i]  # noqa: E731
    past = index >= n
    max_tokens = jnp.asarray(params.max_tokens, jnp.int32)
    prompt = jnp.clip(
        col("input_len"), 1, jnp.asarray(params.max_model_len, jnp.int32) - max_tokens
    )
    reads = col("prefix_len") < prompt
    publishes = col("publish_len") <= prompt
    return dict(
        gap=jnp.where(past, jnp.inf, col("gap") * time_scale(rt, params)),
        prompt=prompt,
        output_len=jnp.clip(col("output_len"), 1, max_tokens),
        max_tokens=jnp.broadcast_to(max_tokens, prompt.shape),
        segment=jnp.where(reads, col("segment"), -1),
        segment_up=col("segment_up"),
        prefix_len=jnp.where(reads, col("prefix_len"), 0),
        publish=jnp.where(publishes, col("publish"), -1),
        publish_len=jnp.where(publishes, col("publish_len"), 0),
    )


def length_moments(rt: ReplayTrace, max_tokens: int, max_model_len: int) -> dict:
    """capacity.capacity_rps's moments after clipping (prefixes not counted: windows start
    cold)."""
    prompt = np.clip(rt.columns["input_len"].astype(np.float64), 1, max_model_len - max_tokens)
    out = np.clip(rt.columns["output_len"].astype(np.float64), 1, max_tokens)
    return moments(prompt, out)


def moments(prompt: np.ndarray, output: np.ndarray, cached: np.ndarray | None = None) -> dict:
    """capacity.capacity_rps's moments of requests with these lengths (and cached tokens)."""
    cached = np.zeros_like(prompt) if cached is None else cached
    new = prompt - cached
    return dict(
        prompt=float(prompt.mean()),
        output=float(output.mean()),
        prefill=float(new.mean()),
        prefill_pairs=float((new * (cached + new / 2)).mean()),
    )
