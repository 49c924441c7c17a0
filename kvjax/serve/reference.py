"""A plain-Python oracle of kv-serve-v0's engine rules (docs/serving.md sections 1-7).

One scenario, written from the specification the way vLLM's scheduler is written - Python
lists of requests, a running list in admission order, a waiting deque, loops that pop
preemption victims from the tail of the running order and stop admitting at the first waiting
request that fails - and independent of serve/engine/'s prefix-sum / order-matrix
formulation. It is the test oracle (tests/serve/test_reference.py) and the speed baseline.

    ref = ReferenceEngine.from_state(state, params, cfg)   # e.g. right after env.reset
    ref = ReferenceEngine(params, cfg, Stream(seed, params, cfg))  # or an idle engine at time 0
    ref.step(action)            # action dict (as env.step), then k engine iterations
    ref.apply(action); ref.iterate()                         # the two halves
    diff(ref.snapshot(), snapshot_of_state(jax_state, cfg))  # [] when they agree

Prefix segments are a keyed tree of rows (section 1): a row has a `key`, a `parent` row and
`tokens` counted from token 0; a resident row holds (tokens - tokens[parent]) / 16 blocks of
its own; only leaves (resident, no resident child) that nobody is attached to and nobody has
pinned are evictable. Requests read `segment` (else the fallback `segment_up`), insert it
when it is not resident, then `publish` their own deeper prefix; `attached` is a row (-1 none).
Rows for inserts come in the allocation order of section 3 phase 5 (`insert_segments`).

The agentic closed-loop workload (section 7, `ServeConfig.agentic`): stream rows are sessions'
first calls; a completed call whose session continues keeps its row as the next call, in status
TOOL (no GPU or CPU blocks) until its tool returns (`continue_session`), then wakes in the
arrivals phase, queued at the stream pointer (`arrivals`, `enqueue`). Call t + 1 reads call t's
history key, falls back to the session's system prompt and publishes its own history.

On the `toy` preset it runs ~4,500 engine iterations per second on one CPU core (vLLM rules,
load 1.0, no-op actions).

The request stream is shared input: request attributes come from
`workload.request_stream(seed, n, params, cfg)` and an agentic call's from
`workload.draw_call(seed, session, turn, params, cfg)` (the reference tests the engine rules,
not the random draws). Times are np.float32 computed in the latency model's operation order,
so the clocks agree with the JAX engine to float32 rounding of sums; integers agree exactly.

Where docs/serving.md leaves a detail open, the reference follows engine/ (each such place
is marked "engine/:"): an offloaded request's place in the queue is fixed when the offload
is commanded; several loads admitted in one iteration finish at link start + their cumulative
bytes / PCIe; the segments touched for LRU and the evictable leaves an insert may take (see
`touch_segments` and `insert_segments`). Readings taken where docs/serving.md could be read
two ways are marked "reading:".
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from types import SimpleNamespace

import numpy as np

from kvjax.serve.types import (
    BLOCK_TOKENS,
    EMPTY,
    LOADING,
    OFFLOADING,
    RUNNING,
    SGLANG,
    SWAPPED,
    TOOL,
    TRT,
    WAITING,
    ServeConfig,
    ServeParams,
    ServeState,
)

f32 = np.float32
NEVER = f32(3.0e38)
ON_GPU = (RUNNING, OFFLOADING, LOADING)

REQUEST_FIELDS = (
    "index",
    "turn",
    "arrival",
    "prompt",
    "output_len",
    "max_tokens",
    "segment",
    "segment_up",
    "prefix_len",
    "publish",
    "publish_len",
    "attached",
    "computed",
    "target",
    "generated",
    "run_key",
    "priority",
    "first_token",
    "last_token",
    "preemptions",
    "recomputed",
    "hit_tokens",
    "xfer_done",
    "cpu_blocks",
)
SEGMENT_FIELDS = (
    "valid",
    "key",
    "parent",
    "tokens",
    "on_gpu",
    "last_access",
    "priority",
    "pinned_until",
)
STREAM_FIELDS = (
    "prompt",
    "output_len",
    "max_tokens",
    "segment",
    "segment_up",
    "prefix_len",
    "publish",
    "publish_len",
)
METRIC_FIELDS = (
    "arrived",
    "finished",
    "good",
    "timed_out",
    "preemptions",
    "agent_preemptions",
    "offloads",
    "invalid_commands",
    "output_tokens",
    "prompt_tokens",
    "hit_tokens",
    "recomputed_tokens",
    "prefill_tokens",
    "ttft_sum",
    "tpot_sum",
    "e2e_sum",
    "log_count",
)
SCALAR_FIELDS = (
    "clock",
    "next_index",
    "next_arrival",
    "run_counter",
    "preempt_counter",
    "new_token_ratio",
    "reserve_level",
    "last_iter_time",
    "recent_ttft",
    "recent_tpot",
    "iterations",
    "steps",
)
FLOAT_FIELDS = frozenset(
    (
        "arrival",
        "first_token",
        "last_token",
        "xfer_done",
        "last_access",
        "pinned_until",
        "clock",
        "next_arrival",
        "new_token_ratio",
        "last_iter_time",
        "recent_ttft",
        "recent_tpot",
        "ttft_sum",
        "tpot_sum",
        "e2e_sum",
        "link_free",
        "log_ttft",
        "log_tpot",
    )
)


def ceil_blocks(tokens: int) -> int:
    return (max(int(tokens), 0) + BLOCK_TOKENS - 1) // BLOCK_TOKENS


def scalar_params(params: ServeParams) -> SimpleNamespace:
    """One scenario's params as Python ints and np.float32 (the dtypes they have under jit)."""
    out = {}
    for f in dataclasses.fields(params):
        a = np.asarray(getattr(params, f.name))
        if a.ndim:
            raise ValueError(f"params.{f.name} must be a scalar (one scenario), got {a.shape}")
        out[f.name] = f32(a) if a.dtype.kind == "f" else int(a)
    return SimpleNamespace(**out)


class Stream:
    """The scenario's request stream (workload.request_stream), extended on demand. In the
    agentic workload a stream row is a session's call 0 (plus `turns`, its number of calls),
    and `call(session, turn)` gives call `turn`'s own draws (workload.draw_call)."""

    def __init__(self, seed, params: ServeParams, cfg: ServeConfig, n: int = 256):
        self.seed = np.asarray(seed, np.uint32)
        self.params = params
        self.cfg = cfg
        self.calls: dict[tuple[int, int], dict] = {}
        self._load(n)

    def _load(self, n: int) -> None:
        from kvjax.serve import workload  # jax only here, to draw the shared input

        n = 1 << max(8, (int(n) - 1).bit_length())  # a power of two: few distinct shapes
        d = workload.request_stream(self.seed, n, self.params, self.cfg)
        self.n = n
        self.arrival = [f32(x) for x in d["arrival"]]
        self.cols = {k: [int(x) for x in d[k]] for k in STREAM_FIELDS}
        self.turns = [int(x) for x in d["turns"]] if self.cfg.agentic else [1] * n

    def ensure(self, i: int) -> None:
        if i >= self.n:
            self._load(max(2 * self.n, i + 1))

    def request(self, i: int) -> dict:
        self.ensure(i)
        return {k: v[i] for k, v in self.cols.items()}

    def arrival_of(self, i: int) -> np.float32:
        self.ensure(i)
        return self.arrival[i]

    def session_turns(self, i: int) -> int:
        """Session i's number of calls (1 outside the agentic workload)."""
        self.ensure(i)
        return self.turns[i]

    def call(self, session: int, turn: int) -> dict:
        """Call `turn` of `session`: output_len, tool_gap (after it) and new_tokens (after it),
        drawn for CALL_BLOCK sessions x MAX_TURNS calls at a time and cached."""
        if (session, turn) not in self.calls:
            base = session - session % CALL_BLOCK
            sessions = np.repeat(np.arange(base, base + CALL_BLOCK, dtype=np.int32), MAX_TURNS)
            turns = np.tile(np.arange(MAX_TURNS, dtype=np.int32), CALL_BLOCK)
            d = _call_drawer(self.cfg)(self.seed, sessions, turns, self.params)
            d = {k: np.asarray(v) for k, v in d.items()}
            for j, (i, t) in enumerate(zip(sessions.tolist(), turns.tolist(), strict=True)):
                self.calls[(i, t)] = dict(
                    output_len=int(d["output_len"][j]),
                    tool_gap=f32(d["tool_gap"][j]),
                    new_tokens=int(d["new_tokens"][j]),
                )
        return self.calls[(session, turn)]


CALL_BLOCK = 64  # sessions per draw of calls
MAX_TURNS = 64  # calls per session at most (docs/serving.md section 7)


@functools.cache
def _call_drawer(cfg: ServeConfig):
    """jit(vmap(workload.draw_call)) over (session, turn) pairs (one compile per config)."""
    import jax

    from kvjax.serve import workload

    def draw(seed, sessions, turns, params):
        one = lambda i, t: workload.draw_call(seed, i, t, params, cfg)  # noqa: E731
        return jax.vmap(one)(sessions, turns)

    return jax.jit(draw)


class Request:
    # qkey: the queue key of an arrival (stream index, or next_index for a woken call) that
    # orders it among arrivals (ties by row); None for a preempted or offloaded request.
    __slots__ = ("row", "status", "qkey", *REQUEST_FIELDS)

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


class Segment:
    __slots__ = SEGMENT_FIELDS

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)

    def resident(self) -> bool:
        return bool(self.valid and self.on_gpu)


class ReferenceEngine:
    """One kv-serve-v0 scenario in plain Python (docs/serving.md sections 1-7)."""

    def __init__(self, params: ServeParams, cfg: ServeConfig, stream: Stream):
        self.params = params
        self.p = p = scalar_params(params)
        self.cfg = cfg
        self.stream = stream
        S, G, L = cfg.max_requests, cfg.max_segments, cfg.priority_levels
        self.rows: list[Request | None] = [None] * S
        self.waiting: list[int] = []  # queue order; OFFLOADING rows hold their place in it
        self.running: list[int] = []  # admission order (RUNNING and LOADING rows)
        # Synthetic workloads: one row per system prompt, keyed by its number, at the root,
        # not resident; the other rows are never used.
        plen = (p.prefix_tokens // BLOCK_TOKENS) * BLOCK_TOKENS
        self.segments = [
            Segment(
                valid=g < p.num_prefixes,
                key=g if g < p.num_prefixes else -1,
                parent=-1,
                tokens=plen if g < p.num_prefixes else 0,
                on_gpu=False,
                last_access=f32(0),
                priority=(L - 1) // 2,
                pinned_until=f32(0),
            )
            for g in range(G)
        ]
        self.clock = f32(0)
        self.next_index = 0
        self.next_arrival = stream.arrival_of(0)
        self.run_counter = 0
        self.preempt_counter = 0
        self.new_token_ratio = f32(p.sglang_ratio_init)
        self.reserve_level = 0
        self.link_free = [f32(0), f32(0)]  # GPU->CPU, CPU->GPU
        self.last_iter_time = f32(0)
        self.recent_ttft = f32(0)
        self.recent_tpot = f32(0)
        self.iterations = 0
        self.steps = 0
        self.metrics = {k: 0 for k in METRIC_FIELDS}
        self.metrics["ttft_sum"] = f32(0)
        self.metrics["tpot_sum"] = f32(0)
        self.metrics["e2e_sum"] = f32(0)
        self.log_ttft = [f32(0)] * cfg.finished_log
        self.log_tpot = [f32(0)] * cfg.finished_log
        # What happened (for tests' coverage checks; not part of the state).
        self.events = dict(
            preempted=0,
            admitted=0,
            loads=0,
            loads_done=0,
            offloads_done=0,
            hits=0,
            fallback_hits=0,  # admissions that hit the `segment_up` row (`segment` not resident)
            evictions=0,
            deep_evictions=0,  # evicted leaves whose parent stays resident
            nonleaf_spared=0,  # evictions while an unreferenced, unpinned non-leaf stayed
            inserts=0,
            publish_inserts=0,  # inserts of a request's `publish` key
            reinserts=0,  # inserts into the non-resident row that already had the key
            fresh_rows=0,  # inserts into a row never used
            stale_rows=0,  # inserts into a non-resident row of another key
            replacements=0,  # inserts that evicted an evictable leaf and took its row
            no_row=0,  # inserts that found no row
            insert_overflow=0,  # iterations with more keys needing a free row than rows
            drops=0,
            drop_nonleaf_refused=0,  # drop of an unreferenced, unpinned non-leaf: invalid
            timeouts=0,
            completions=0,
            trt_blocked=0,
            sglang_retracts=0,
            partial_admits=0,
            idle=0,
            held_back=0,
            # agentic sessions
            continuations=0,  # completed calls whose row became the session's next (TOOL)
            wakes=0,  # TOOL rows whose call arrived (WAITING)
            history_hits=0,  # admissions of calls t >= 1 that hit call t-1's history
            system_fallbacks=0,  # admissions of calls t >= 1 that hit the system prompt
            ended_turns=0,  # sessions ended with their last call (more than one call)
            ended_context=0,  # sessions ended with calls left: the next prompt did not fit
            woken_timeouts=0,  # calls t >= 1 dropped by the client timeout
        )

    # -- construction from a JAX state -------------------------------------------------------
    @classmethod
    def from_state(
        cls, state: ServeState, params: ServeParams, cfg: ServeConfig, stream: Stream | None = None
    ) -> ReferenceEngine:
        """The reference at `state` (one scenario, e.g. from env.reset); the queue and running
        orders are read from queue_key / run_key."""
        st = _numpy_tree(state)
        if stream is None:
            p = scalar_params(params)
            n = int(float(p.arrival_rate) * float(p.horizon) * 1.5) + 64
            stream = Stream(st.seed, params, cfg, max(n, int(st.next_index) + 64))
        ref = cls(params, cfg, stream)
        rq = st.requests
        for r in range(cfg.max_requests):
            if int(rq.status[r]) == EMPTY:
                continue
            kw = {k: _py(getattr(rq, k)[r], k) for k in REQUEST_FIELDS}
            qkey = int(rq.queue_key[r])
            ref.rows[r] = Request(
                row=r, status=int(rq.status[r]), qkey=qkey if qkey >= 0 else None, **kw
            )
        key = lambda r: (int(rq.queue_key[r]), r)  # noqa: E731
        ref.waiting = sorted(
            (
                r
                for r in range(cfg.max_requests)
                if int(rq.status[r]) in (WAITING, SWAPPED, OFFLOADING)
            ),
            key=key,
        )
        ref.running = sorted(
            (r for r in range(cfg.max_requests) if int(rq.status[r]) in (RUNNING, LOADING)),
            key=lambda r: (int(rq.run_key[r]), r),
        )
        sg = st.segments
        for g in range(cfg.max_segments):
            ref.segments[g] = Segment(**{k: _py(getattr(sg, k)[g], k) for k in SEGMENT_FIELDS})
        for k in SCALAR_FIELDS:
            setattr(ref, k, _py(getattr(st, k), k))
        ref.link_free = [f32(x) for x in st.link_free]
        for k in METRIC_FIELDS:
            ref.metrics[k] = _py(getattr(st.metrics, k), k)
        ref.log_ttft = [f32(x) for x in st.metrics.log_ttft]
        ref.log_tpot = [f32(x) for x in st.metrics.log_tpot]
        return ref

    # -- memory ------------------------------------------------------------------------------
    def live(self):
        return (r for r in self.rows if r is not None)

    def pool(self) -> int:
        return self.p.gpu_pool_tokens * (1 + self.p.kv_dtype) // BLOCK_TOKENS

    def cpu_pool(self) -> int:
        return self.p.cpu_pool_tokens * (1 + self.p.kv_dtype) // BLOCK_TOKENS

    # Segment rows (section 1): a tree by `parent`; tokens count from the prompt's first token.
    def seg_tokens(self, g: int) -> int:
        """tokens[g]; 0 for no row (-1)."""
        return self.segments[g].tokens if g >= 0 else 0

    def cached(self, g: int) -> bool:
        """Row g is resident (valid and on the GPU)."""
        return 0 <= g < len(self.segments) and self.segments[g].resident()

    def own_blocks(self, g: int) -> int:
        """Blocks a segment holds itself: (tokens - tokens[parent]) / 16 while resident."""
        s = self.segments[g]
        return (s.tokens - self.seg_tokens(s.parent)) // BLOCK_TOKENS if s.resident() else 0

    def resident_row(self, key: int) -> int:
        """The resident row holding `key`, -1 when none (valid rows have distinct keys)."""
        if key < 0:
            return -1
        for g, s in enumerate(self.segments):
            if s.resident() and s.key == key:
                return g
        return -1

    def leaves(self) -> list[int]:
        """Resident rows with no resident child."""
        has_child = {s.parent for s in self.segments if s.resident()}
        return [g for g, s in enumerate(self.segments) if s.resident() and g not in has_child]

    def refs(self) -> list[int]:
        """Per row: the requests on the GPU attached to it."""
        out = [0] * len(self.segments)
        for r in self.live():
            if r.status in ON_GPU and r.attached >= 0:
                out[r.attached] += 1
        return out

    def evictable(self, clock: np.float32 | None = None) -> list[int]:
        """Leaves nobody is attached to and nobody has pinned (at `clock`, default now)."""
        clock = self.clock if clock is None else clock
        refs = self.refs()
        return [g for g in self.leaves() if refs[g] == 0 and self.segments[g].pinned_until <= clock]

    def eviction_order(self, rows) -> list[int]:
        """Lowest retention priority first, then least recently used (then lowest row)."""
        return sorted(
            rows, key=lambda g: (self.segments[g].priority, self.segments[g].last_access, g)
        )

    # Requests' blocks (section 1): the prefix up to tokens[attached] lives in the segments.
    def own_tokens(self, r: Request) -> int:
        """Computed tokens beyond the attached segment's end (negative when short of it)."""
        return r.computed - self.seg_tokens(r.attached)

    def held(self, r: Request) -> int:
        """Private GPU blocks: ceil(max(computed - tokens[attached], 0) / 16) on the GPU."""
        return ceil_blocks(self.own_tokens(r)) if r.status in ON_GPU else 0

    def free_blocks(self) -> int:
        used = sum(self.held(r) for r in self.live())
        cached = sum(self.own_blocks(g) for g in range(len(self.segments)))
        return self.pool() - used - cached

    def kv_factor(self) -> np.float32:
        return f32(0.5) if self.p.kv_dtype == 1 else f32(1.0)

    def transfer_time(self, blocks: int) -> np.float32:
        nbytes = f32(f32(blocks) * f32(BLOCK_TOKENS)) * self.p.kv_bytes_per_token
        return f32(f32(nbytes * self.kv_factor()) / self.p.pcie_bytes_per_s)

    def iteration_time(self, num_tokens: int, decode_context: int, pairs: np.float32) -> np.float32:
        p = self.p
        linear = max(p.t_weights, f32(p.lin_a + f32(p.lin_b * f32(num_tokens))))
        t = f32(p.t_cpu + linear)
        t = f32(t + f32(f32(p.attn_decode * self.kv_factor()) * f32(decode_context)))
        return f32(t + f32(p.attn_prefill * pairs))

    def _recompute_preempt(self, r: Request) -> int:
        """Recompute preemption: blocks free, computed -> 0, to the head of the queue."""
        lost = max(self.own_tokens(r), 0)  # reading: the private KV discarded (never negative)
        r.status = WAITING
        r.computed = 0
        r.target = r.prompt + r.generated
        r.attached = -1
        r.preemptions += 1
        r.recomputed += lost
        r.qkey = None
        self.running.remove(r.row)
        self.waiting.insert(0, r.row)
        self.preempt_counter += 1
        return lost

    # -- the agent's action (section 5) ------------------------------------------------------
    def decode(self, cid: int) -> tuple[str, int] | None:
        S, G, nres = self.cfg.max_requests, self.cfg.max_segments, len(self.cfg.reserve_levels)
        if cid == 0:
            return ("noop", -1)
        for kind, size in (
            ("offload", S),
            ("preempt", S),
            ("pin", G),
            ("drop", G),
            ("reserve", nres),
        ):
            if 1 <= cid <= size:
                return (kind, cid - 1)
            cid -= size
        return None

    def command_valid(self, kind: str, t: int) -> bool:
        if kind in ("noop", "reserve"):
            return True
        if kind in ("offload", "preempt"):
            r = self.rows[t]
            if r is None or r.status != RUNNING:
                return False
            if kind == "preempt":
                return True
            cpu_used = sum(q.cpu_blocks for q in self.live())
            return r.computed > 0 and ceil_blocks(r.computed) <= self.cpu_pool() - cpu_used
        if kind == "pin":
            return self.cached(t)
        # drop: the engine's own rule - a leaf, unreferenced, not pinned.
        ok = t in self.evictable()
        if not ok and self.cached(t) and self.refs()[t] == 0:
            self.events["drop_nonleaf_refused"] += t not in self.leaves() and (
                self.segments[t].pinned_until <= self.clock
            )
        return ok

    def apply(self, action: dict) -> None:
        """Priorities, then each command in order (each validated on the state so far)."""
        L = self.cfg.priority_levels
        rp = [int(v) for v in np.asarray(action["request_priority"]).reshape(-1)]
        sp = [int(v) for v in np.asarray(action["segment_priority"]).reshape(-1)]
        invalid = sum(1 for v in rp + sp if v < 0 or v > L)
        for r, v in zip(self.rows, rp, strict=True):
            if r is not None and 1 <= v <= L:
                r.priority = v - 1
        for s, v in zip(self.segments, sp, strict=True):
            if s.valid and 1 <= v <= L:
                s.priority = v - 1
        for cid in np.asarray(action["commands"]).reshape(-1):
            cmd = self.decode(int(cid))
            if cmd is None or not self.command_valid(*cmd):
                invalid += 1
                continue
            kind, t = cmd
            if kind == "offload":
                r = self.rows[t]
                blocks = ceil_blocks(r.computed)
                start = max(self.clock, self.link_free[0])
                done = f32(start + self.transfer_time(blocks))
                self.link_free[0] = done
                r.status, r.xfer_done, r.cpu_blocks = OFFLOADING, done, blocks
                r.preemptions += 1
                r.qkey = None
                # engine/: it holds its place at the head of the queue from now on.
                self.running.remove(t)
                self.waiting.insert(0, t)
                self.preempt_counter += 1
                self.metrics["offloads"] += 1
            elif kind == "preempt":
                lost = self._recompute_preempt(self.rows[t])
                self.metrics["agent_preemptions"] += 1
                self.metrics["recomputed_tokens"] += lost
            elif kind == "pin":
                self.segments[t].pinned_until = f32(self.clock + self.p.pin_ttl)
            elif kind == "drop":
                self.segments[t].on_gpu = False
                self.segments[t].pinned_until = f32(0)
                self.events["drops"] += 1
            elif kind == "reserve":
                self.reserve_level = t
        self.metrics["invalid_commands"] += invalid

    # -- one engine iteration (section 3) ----------------------------------------------------
    def iterate(self) -> None:
        if not self.clock < self.p.horizon:
            return
        self.arrivals()
        self.transfers()
        self.timeouts()
        plan = self.schedule()
        self.execute(plan)

    def arrivals(self) -> None:
        """Section 3 phase 1: (agentic) TOOL rows whose call has arrived wake, queued at the
        stream pointer; then up to K stream arrivals enter empty rows, in stream order."""
        L = self.cfg.priority_levels
        if self.cfg.agentic:
            for r in self.rows:
                if r is not None and r.status == TOOL and r.arrival <= self.clock:
                    r.status, r.qkey = WAITING, self.next_index
                    self.enqueue(r)
                    self.metrics["arrived"] += 1
                    self.events["wakes"] += 1
        for _ in range(self.cfg.max_arrivals_per_iter):
            if not self.next_arrival <= self.clock:
                break
            if None not in self.rows:
                self.events["held_back"] += 1  # the table is full: it waits behind the pointer
                break
            row = self.rows.index(None)
            i = self.next_index
            d = self.stream.request(i)
            self.rows[row] = r = Request(
                row=row,
                status=WAITING,
                qkey=i,
                index=i,
                turn=0,
                arrival=self.next_arrival,
                attached=-1,
                computed=0,
                target=d["prompt"],
                generated=0,
                run_key=0,
                priority=(L - 1) // 2,
                first_token=f32(-1),
                last_token=f32(-1),
                preemptions=0,
                recomputed=0,
                hit_tokens=0,
                xfer_done=f32(0),
                cpu_blocks=0,
                **d,
            )
            self.enqueue(r)
            self.next_index = i + 1
            self.next_arrival = self.stream.arrival_of(i + 1)
            self.metrics["arrived"] += 1

    def enqueue(self, r: Request) -> None:
        """An arrival joins the queue behind the preempted and offloaded requests, among the
        arrivals in the order of (queue key, row): FIFO by stream index, a woken call at the
        stream pointer of its wake-up (reading: ties - woken calls and the stream request at
        that index - by table row, engine/'s tie rule for every order)."""
        keys = [
            (-1, -1) if self.rows[q].qkey is None else (self.rows[q].qkey, q) for q in self.waiting
        ]
        self.waiting.insert(bisect.bisect(keys, (r.qkey, r.row)), r.row)

    def transfers(self) -> None:
        for r in self.live():
            if r.xfer_done <= self.clock and r.status == OFFLOADING:
                r.status, r.attached = SWAPPED, -1  # detached from its segment
                self.events["offloads_done"] += 1
            elif r.xfer_done <= self.clock and r.status == LOADING:
                r.status, r.cpu_blocks = RUNNING, 0
                self.events["loads_done"] += 1

    def timeouts(self) -> None:
        for r in list(self.live()):
            if (
                r.status == WAITING
                and r.first_token < 0
                and f32(self.clock - r.arrival) > self.p.client_timeout
            ):
                self.rows[r.row] = None
                self.waiting.remove(r.row)
                self.metrics["timed_out"] += 1
                self.events["timeouts"] += 1
                self.events["woken_timeouts"] += r.turn > 0

    def running_order(self) -> list[int]:
        """Retention priority (higher first), then the engine's rule: vLLM / TRT admission
        order; SGLang most decoded first, ties by shorter prompt (then admission order)."""
        sgl = self.p.engine == SGLANG

        def key(row):
            r = self.rows[row]
            return (-r.priority, -r.generated if sgl else 0, r.prompt if sgl else 0)

        return sorted((row for row in self.running if self.rows[row].status == RUNNING), key=key)

    def schedule(self) -> dict:
        """Running requests first (victims from the tail), then the waiting queue (stop at the
        first that fails), then evictions. Preemptions and admissions take effect here, as in
        vLLM's scheduler; the tokens go to execute."""
        p = self.p
        pool = self.pool()
        free = self.free_blocks()
        assert free >= 0, f"free blocks negative: {free}"
        evictable = self.evictable()  # at the start of the iteration
        available = free + sum(self.own_blocks(g) for g in evictable)
        left = p.max_batched_tokens
        tokens: dict[int, int] = {}
        demand: dict[int, int] = {}
        queue = self.running_order()
        victims: list[Request] = []
        if p.engine == SGLANG:
            # SGLang: everyone asks; on a shortage retract from the tail until the kept
            # requests' blocks plus retract_tokens per kept request fit.
            for row in queue:
                r = self.rows[row]
                need = max(r.target - r.computed, 1)
                tokens[row] = tok = min(left, need)
                left -= tok
                own = self.own_tokens(r)
                demand[row] = ceil_blocks(own + tok) - ceil_blocks(own)
            if sum(demand.values()) > available:
                freed = 0
                while queue:
                    kept_demand = sum(demand[row] for row in queue)
                    headroom = ceil_blocks(len(queue) * p.sglang_retract_tokens)
                    if kept_demand + headroom <= available + freed:
                        break
                    victim = self.rows[queue.pop()]
                    freed += self.held(victim)
                    victims.append(victim)
                    left += tokens.pop(victim.row)  # (at the tail: nobody after it to use it)
                    del demand[victim.row]
                self.events["sglang_retracts"] += bool(victims)
        else:
            room = available
            i = 0
            while i < len(queue):
                r = self.rows[queue[i]]
                need = max(r.target - r.computed, 1)
                tok = min(left, need)
                own = self.own_tokens(r)
                d = ceil_blocks(own + tok) - ceil_blocks(own)
                if d > room and p.engine == TRT:
                    # TRT never preempts: this request and the rest get no tokens this time.
                    self.events["trt_blocked"] += 1
                    break
                while d > room:
                    victim = self.rows[queue.pop()]
                    victims.append(victim)
                    room += self.held(victim)
                    if victim is r:
                        break
                if victims and victims[-1] is r:
                    break
                room -= d
                left -= tok
                tokens[r.row], demand[r.row] = tok, d
                i += 1
        freed = sum(self.held(v) for v in victims)
        lost = sum(max(self.own_tokens(v), 0) for v in victims)
        for v in victims:  # the tail's victim first, so the one nearest the head ends first
            self._recompute_preempt(v)
        self.events["preempted"] += len(victims)
        kept_demand = sum(demand.values())

        admitted: list[Request] = []
        hits: dict[int, int] = {}
        hit_rows: dict[int, int] = {}  # admitted request row -> the segment row it hit
        lookups = 0
        if not victims:
            # Each waiting (not swapped) request's hit row: its `segment` key's row if
            # resident, else its `segment_up` key's row if resident, else none.
            hit_row_of = {}
            for row in self.waiting:
                r = self.rows[row]
                if r.status != WAITING:
                    continue
                g = self.resident_row(r.segment)
                if g < 0:
                    g = self.resident_row(r.segment_up)
                if g >= 0:
                    hit_row_of[row] = g
            wanted = {
                g
                for row, g in hit_row_of.items()
                if min(self.seg_tokens(g), self.rows[row].target - 1) > 0
            }
            room = (
                free + sum(self.own_blocks(g) for g in evictable if g not in wanted) - kept_demand
            )
            seqs = sum(1 for row in self.running)  # RUNNING (all kept) and LOADING
            # Unfinished prefills: every running request whose prefill this iteration does not
            # complete. (TRT's stalled requests are included; engine/ counts the scheduled
            # ones only, which decides the same: a stalled prefill needs no more blocks than a
            # new partial prefill, which takes all the tokens left, so neither is admitted.)
            partials = sum(
                1
                for row in queue
                if self.rows[row].computed + tokens.get(row, 0) < self.rows[row].target
            )
            agent_reserve = int(
                np.ceil(f32(f32(self.cfg.reserve_levels[self.reserve_level]) * f32(pool)))
            )
            # TRT's reservations: prompt + max_tokens, less the attached segment's tokens, of
            # every request on the GPU, within the pool less the unevictable segments.
            trt_cap = pool - sum(
                self.own_blocks(g) for g in range(len(self.segments)) if g not in evictable
            )
            trt_reserved = sum(
                ceil_blocks(r.prompt + r.max_tokens - self.seg_tokens(r.attached))
                for r in self.live()
                if r.status in ON_GPU
            )

            def future(r):
                return min(max(r.max_tokens - r.generated, 0), p.sglang_reserve_cap)

            sgl_future = sum(future(self.rows[row]) for row in self.running)
            blocks_so_far = 0
            for row in list(self.waiting):
                r = self.rows[row]
                if r.status == OFFLOADING:
                    continue
                swapped = r.status == SWAPPED  # (looks nothing up: no hit row)
                hit_row = hit_row_of.get(row, -1)
                hit = min(self.seg_tokens(hit_row), r.target - 1) if hit_row >= 0 else 0
                # reading: a hit row that skips no token (target 1: only when prefix_len >
                # prompt) is no hit - nothing attached, nothing subtracted (engine/ too).
                hit_row = hit_row if hit > 0 else -1
                need = 0 if swapped else r.target - hit
                tok = min(left, need)
                if not swapped and tok <= 0:
                    break
                blocks = r.cpu_blocks if swapped else ceil_blocks(tok)
                partial = tok < need
                if seqs + 1 > p.max_num_seqs:
                    break
                if blocks_so_far + blocks + agent_reserve > room:
                    break
                if partial and partials + 1 > p.max_partial_prefills:
                    break
                full = ceil_blocks(r.prompt + r.max_tokens - self.seg_tokens(hit_row))
                if p.engine == TRT and trt_reserved + full > trt_cap:
                    break
                if p.engine == SGLANG:
                    reserve = int(np.ceil(f32(self.new_token_ratio * f32(sgl_future + future(r)))))
                    if blocks_so_far + blocks + ceil_blocks(reserve) > room:
                        break
                # admitted
                blocks_so_far += blocks
                seqs += 1
                left -= tok
                partials += partial
                trt_reserved += full
                sgl_future += future(r)
                admitted.append(r)
                self.waiting.remove(row)
                self.running.append(row)
                r.run_key = self.run_counter
                self.run_counter += 1
                if swapped:
                    r.status = LOADING
                else:
                    r.status = RUNNING
                    r.computed, r.attached = hit, hit_row
                    r.hit_tokens += hit
                    hits[row] = hit
                    if hit_row >= 0:
                        hit_rows[row] = hit_row
                        fallback = self.segments[hit_row].key != r.segment
                        self.events["fallback_hits"] += fallback
                        if r.turn > 0:
                            self.events["history_hits"] += not fallback
                            self.events["system_fallbacks"] += fallback
                    tokens[row] = tok
                    lookups += r.target
                    self.events["partial_admits"] += partial
            # Loads start when the CPU->GPU link is free and queue on it (engine/: each one
            # finishes at the start + the bytes of the loads up to it / PCIe).
            loads = [r for r in admitted if r.status == LOADING]
            if loads:
                start = max(self.clock, self.link_free[1])
                cum = 0
                for r in loads:
                    cum += r.cpu_blocks
                    r.xfer_done = f32(start + self.transfer_time(cum))
                    self.link_free[1] = max(self.link_free[1], r.xfer_done)
                self.events["loads"] += len(loads)
            self.events["admitted"] += len(admitted)
            self.events["hits"] += sum(1 for h in hits.values() if h > 0)

        # Evictions: lowest retention priority first, then least recently used, until the
        # blocks allocated now are covered; never a segment an admitted request hits.
        alloc = kept_demand + sum(
            r.cpu_blocks if r.status == LOADING else ceil_blocks(tokens[r.row]) for r in admitted
        )
        shortfall = alloc - (free + freed)
        # Only leaves are evictable (the set at the iteration's start), so a path loses at most
        # one level per iteration; an evicted row keeps its key.
        hit_segs = set(hit_rows.values())
        cands = self.eviction_order(g for g in evictable if g not in hit_segs)
        covered = 0
        evicted = []
        for g in cands:
            if covered >= shortfall:
                break
            covered += self.own_blocks(g)
            evicted.append(g)
        if evicted:
            refs = self.refs()
            leaves = self.leaves()
            self.events["nonleaf_spared"] += any(
                self.cached(g)
                and g not in leaves
                and refs[g] == 0
                and self.segments[g].pinned_until <= self.clock
                for g in range(len(self.segments))
            )
        for g in evicted:
            s = self.segments[g]
            s.on_gpu, s.pinned_until = False, f32(0)
            self.events["evictions"] += 1
            self.events["deep_evictions"] += s.parent >= 0
        return dict(
            tokens=tokens,
            hits=hits,
            hit_rows=hit_rows,
            victims=len(victims),
            lost=lost,
            lookups=lookups,
            admitted=len(admitted),
        )

    def execute(self, plan: dict) -> None:
        p, cfg = self.p, self.cfg
        tokens = {row: t for row, t in plan["tokens"].items() if t > 0}
        self.touch_segments(plan)
        # The iteration's duration, or a jump to the next event.
        num_tokens, ctx, pairs, prefill = 0, 0, f32(0), 0
        for row in sorted(tokens):
            r, c = self.rows[row], tokens[row]
            num_tokens += c
            if r.computed < r.target:
                pairs = f32(pairs + f32(f32(c) * f32(f32(r.computed) + f32(f32(0.5) * f32(c)))))
                prefill += c
            else:
                ctx += r.computed
        busy = num_tokens > 0
        if busy:
            dt = self.iteration_time(num_tokens, ctx, pairs)
        else:
            events = [self.next_arrival, p.horizon]
            for r in self.live():
                if r.status in (OFFLOADING, LOADING):
                    events.append(r.xfer_done)
                if r.status == WAITING and r.first_token < 0:
                    events.append(f32(r.arrival + p.client_timeout))
                if r.status == TOOL:  # reading: a call's arrival is an arrival event
                    events.append(r.arrival)
            for s in self.segments:
                if s.resident() and s.pinned_until > self.clock:
                    events.append(s.pinned_until)
            dt = max(f32(min(events) - self.clock), p.t_cpu)
            self.events["idle"] += 1
        self.clock = clock = f32(self.clock + dt)
        # Progress: chunks advance computed; a finished prefill or a decode emits a token.
        emitted = 0
        for row, c in tokens.items():
            r = self.rows[row]
            emits = r.computed + c >= r.target
            r.computed += c
            if emits:
                emitted += 1
                r.generated += 1
                if r.first_token < 0:
                    r.first_token = clock
                r.last_token = clock
        self.insert_segments(clock)
        # Completions.
        m = self.metrics
        R = cfg.finished_log
        n_done = good = 0
        ttft_sum = tpot_sum = e2e_sum = f32(0)
        for r in list(self.live()):
            if r.status != RUNNING or r.generated < r.output_len:
                continue
            ttft = f32(r.first_token - r.arrival)
            tpot = (
                f32(f32(r.last_token - r.first_token) / f32(max(r.generated - 1, 1)))
                if r.generated > 1
                else f32(0)
            )
            good += bool(ttft <= p.ttft_slo and tpot <= p.tpot_slo)
            self.log_ttft[m["log_count"] % R] = ttft
            self.log_tpot[m["log_count"] % R] = tpot
            m["log_count"] += 1
            n_done += 1
            ttft_sum, tpot_sum = f32(ttft_sum + ttft), f32(tpot_sum + tpot)
            e2e_sum = f32(e2e_sum + f32(r.last_token - r.arrival))
            self.running.remove(r.row)
            if not (self.cfg.agentic and self.continue_session(r, clock)):
                self.rows[r.row] = None
        self.events["completions"] += n_done
        m["finished"] += n_done
        m["good"] += good
        m["preemptions"] += plan["victims"]
        m["output_tokens"] += emitted
        m["prompt_tokens"] += plan["lookups"]
        m["hit_tokens"] += sum(plan["hits"].values())
        m["recomputed_tokens"] += plan["lost"]
        m["prefill_tokens"] += prefill
        m["ttft_sum"] = f32(m["ttft_sum"] + ttft_sum)
        m["tpot_sum"] = f32(m["tpot_sum"] + tpot_sum)
        m["e2e_sum"] = f32(m["e2e_sum"] + e2e_sum)
        if n_done:
            keep, blend = f32(f32(1) - f32(0.2)), f32(0.2)
            self.recent_ttft = f32(
                f32(keep * self.recent_ttft) + f32(blend * f32(ttft_sum / f32(n_done)))
            )
            self.recent_tpot = f32(
                f32(keep * self.recent_tpot) + f32(blend * f32(tpot_sum / f32(n_done)))
            )
        if plan["victims"]:
            self.new_token_ratio = p.sglang_ratio_init
        else:
            self.new_token_ratio = max(
                f32(self.new_token_ratio - p.sglang_ratio_decay), p.sglang_ratio_min
            )
        if busy:
            self.last_iter_time = dt
        self.iterations += 1

    def continue_session(self, r: Request, clock: np.float32) -> bool:
        """Agentic sessions (section 7): call t of session i has completed at `clock`. While
        calls remain (t + 1 < turns) and the next prompt (prompt + output + the new tokens
        after call t) fits in max_model_len - max_tokens, the row becomes call t + 1 in status
        TOOL: it arrives after call t's tool gap, reads call t's history (its publish key and
        length) falling back to the session's system prompt, publishes its own history (the
        KV that exists when its last token is emitted) and starts with fresh progress fields.
        Returns whether the session continues (else the row is freed)."""
        p, L = self.p, self.cfg.priority_levels
        i, t = r.index, r.turn
        after = self.stream.call(i, t)
        prompt = r.prompt + r.output_len + after["new_tokens"]
        if t + 1 >= self.stream.session_turns(i):
            self.events["ended_turns"] += t > 0
            return False
        if prompt > p.max_model_len - p.max_tokens:
            self.events["ended_context"] += 1
            return False
        nxt = self.stream.call(i, t + 1)
        system = self.stream.request(i)["segment"]  # call 0 reads the system prompt
        r.status, r.qkey = TOOL, None
        r.turn = t + 1
        r.arrival = f32(clock + after["tool_gap"])
        r.prompt, r.output_len = prompt, nxt["output_len"]
        r.segment, r.segment_up, r.prefix_len = self.history_key(i, t), system, r.publish_len
        r.publish = self.history_key(i, t + 1)
        r.publish_len = (prompt + r.output_len - 1) // BLOCK_TOKENS * BLOCK_TOKENS
        # fresh progress fields, as an arrival's (reading: the retention priority too)
        r.attached, r.computed, r.target, r.generated = -1, 0, prompt, 0
        r.run_key, r.priority = 0, (L - 1) // 2
        r.first_token, r.last_token = f32(-1), f32(-1)
        r.preemptions, r.recomputed, r.hit_tokens = 0, 0, 0
        r.xfer_done, r.cpu_blocks = f32(0), 0
        self.events["continuations"] += 1
        return True

    def history_key(self, session: int, turn: int) -> int:
        """The key of call `turn`'s history segment: max_segments + 64 session + turn."""
        return self.cfg.max_segments + MAX_TURNS * session + turn

    def touch_segments(self, plan: dict) -> None:
        """LRU: the rows requests on the GPU are attached to (this iteration's hits included)
        get last access = the iteration's start time. engine/: the attached row itself, not
        its ancestors (they cannot be evicted before it)."""
        for r in self.live():
            if r.status in ON_GPU and r.attached >= 0:
                self.segments[r.attached].last_access = self.clock

    def next_insert(self, r: Request) -> tuple[int, int] | None:
        """(key, tokens) a RUNNING request makes resident next: its `segment` while the
        attached row ends before `prefix_len`, else its `publish` while it ends before
        `publish_len`; None when neither (or the key is -1)."""
        have = self.seg_tokens(r.attached)
        if have < r.prefix_len:
            key, tokens = r.segment, r.prefix_len
        elif have < r.publish_len:
            key, tokens = r.publish, r.publish_len
        else:
            return None
        return (key, tokens) if key >= 0 else None

    def insert_segments(self, clock: np.float32) -> None:
        """Segment inserts (section 3, phase 5) at the new clock: a RUNNING request whose
        computed tokens reach its next insert's tokens, with no resident row holding that key,
        makes it resident (of several requests with one key, the lowest table row). The row:
        the non-resident row with the key if there is one, else the next free row in order -
        rows never used, rows not resident whose key nobody inserts now (lowest row first),
        then evictable leaves in eviction order (each evicted by the insert); none left, no
        insert. Inserts take free rows in the order of their requests' table rows (reading)."""
        L = self.cfg.priority_levels
        inserts: dict[int, tuple[Request, int]] = {}  # key -> (request, tokens), by row
        for r in sorted(self.live(), key=lambda r: r.row):
            if r.status != RUNNING:
                continue
            nxt = self.next_insert(r)
            if nxt is None:
                continue
            key, tokens = nxt
            if r.computed >= tokens and self.resident_row(key) < 0 and key not in inserts:
                inserts[key] = (r, tokens)
        if not inserts:
            return
        row_of_key = {s.key: g for g, s in enumerate(self.segments) if s.valid}
        never = [g for g, s in enumerate(self.segments) if not s.valid]
        stale = [
            g
            for g, s in enumerate(self.segments)
            if s.valid and not s.on_gpu and s.key not in inserts
        ]
        # engine/: the evictable leaves as the insert phase starts (after this iteration's
        # admissions, evictions and progress), pins compared with the new clock.
        leaves = self.eviction_order(self.evictable(clock))
        free_rows = [("fresh_rows", g) for g in never] + [("stale_rows", g) for g in stale]
        free_rows += [("replacements", g) for g in leaves]
        self.events["insert_overflow"] += sum(1 for key in inserts if key not in row_of_key) > len(
            self.segments
        )
        for key, (r, tokens) in inserts.items():
            if key in row_of_key:
                g, how = row_of_key[key], "reinserts"
            elif free_rows:
                how, g = free_rows.pop(0)
            else:
                self.events["no_row"] += 1
                continue
            s = self.segments[g]
            if not (s.valid and s.key == key):
                s.priority, s.pinned_until = (L - 1) // 2, f32(0)
            s.valid, s.key, s.parent, s.tokens = True, key, r.attached, tokens
            s.on_gpu, s.last_access = True, clock
            r.attached = g  # its blocks up to `tokens` move to the segment
            self.events["inserts"] += 1
            self.events[how] += 1
            self.events["publish_inserts"] += key == r.publish and key != r.segment

    # -- env step ----------------------------------------------------------------------------
    def step(self, action: dict) -> np.float32:
        """The action, then `iterations_per_step` iterations; returns the reward."""
        before = self.score()
        self.apply(action)
        for _ in range(self.cfg.iterations_per_step):
            self.iterate()
        self.steps += 1
        return f32(self.score() - before)

    def score(self) -> np.float32:
        """good / (arrival_rate x calls_per_arrival x horizon): per call offered."""
        p = self.p
        offered = f32(f32(p.arrival_rate * p.calls_per_arrival) * p.horizon)
        return f32(f32(self.metrics["good"]) / offered)

    # -- comparison --------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return dict(
            status=[EMPTY if r is None else r.status for r in self.rows],
            requests={r.row: {k: getattr(r, k) for k in REQUEST_FIELDS} for r in self.live()},
            waiting_order=list(self.waiting),
            running_order=list(self.running),
            segments=[
                _segment_view({k: getattr(s, k) for k in SEGMENT_FIELDS}) for s in self.segments
            ],
            scalars={k: getattr(self, k) for k in SCALAR_FIELDS},
            link_free=list(self.link_free),
            metrics=dict(self.metrics),
            log_ttft=list(self.log_ttft),
            log_tpot=list(self.log_tpot),
        )


def _py(x, name: str):
    a = np.asarray(x)
    if name in FLOAT_FIELDS:
        return f32(a)
    if a.dtype == bool:
        return bool(a)
    return int(a)


def _segment_view(row: dict) -> dict:
    """A segment row as compared: all fields of a valid row; of a row never used only that
    (and that it is not resident) - its other fields are never read."""
    return row if row["valid"] else {"valid": False, "on_gpu": row["on_gpu"]}


def _numpy_tree(tree):
    import jax

    return jax.tree_util.tree_map(np.asarray, tree)


def snapshot_of_state(state: ServeState, cfg: ServeConfig) -> dict:
    """The JAX state (one scenario) in ReferenceEngine.snapshot's form: queue and running
    orders from the keys, fields of empty rows left out."""
    st = _numpy_tree(state)
    rq = st.requests
    S = cfg.max_requests
    status = [int(x) for x in rq.status]
    return dict(
        status=status,
        requests={
            r: {k: _py(getattr(rq, k)[r], k) for k in REQUEST_FIELDS}
            for r in range(S)
            if status[r] != EMPTY
        },
        waiting_order=sorted(
            (r for r in range(S) if status[r] in (WAITING, SWAPPED, OFFLOADING)),
            key=lambda r: (int(rq.queue_key[r]), r),
        ),
        running_order=sorted(
            (r for r in range(S) if status[r] in (RUNNING, LOADING)),
            key=lambda r: (int(rq.run_key[r]), r),
        ),
        segments=[
            _segment_view({k: _py(getattr(st.segments, k)[g], k) for k in SEGMENT_FIELDS})
            for g in range(cfg.max_segments)
        ],
        scalars={k: _py(getattr(st, k), k) for k in SCALAR_FIELDS},
        link_free=[f32(x) for x in st.link_free],
        metrics={k: _py(getattr(st.metrics, k), k) for k in METRIC_FIELDS},
        log_ttft=[f32(x) for x in st.metrics.log_ttft],
        log_tpot=[f32(x) for x in st.metrics.log_tpot],
    )


def diff(
    ref: dict, other: dict, rtol: float = 1e-5, atol: float = 1e-6, path: str = ""
) -> list[str]:
    """Differences between two snapshots: integers, bools and orders exactly, floats within
    rtol / atol (float fields are named in FLOAT_FIELDS)."""
    out = []
    if isinstance(ref, dict):
        if set(ref) != set(other):
            return [f"{path}: keys {sorted(set(ref) ^ set(other))} in one only"]
        for k in ref:
            out += diff(ref[k], other[k], rtol, atol, f"{path}.{k}")
        return out
    if isinstance(ref, list) and ref and isinstance(ref[0], dict):
        for i, (a, b) in enumerate(zip(ref, other, strict=True)):
            out += diff(a, b, rtol, atol, f"{path}[{i}]")
        return out
    name = path.rsplit(".", 1)[-1].split("[")[0]
    if name in FLOAT_FIELDS:
        a, b = np.asarray(ref, np.float64), np.asarray(other, np.float64)
        if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=atol):
            bad = (
                np.flatnonzero(~np.isclose(a, b, rtol=rtol, atol=atol))
                if a.shape == b.shape
                else []
            )
            out.append(
                f"{path}: ref {a.ravel()[bad[:4]] if len(bad) else a} "
                f"jax {b.ravel()[bad[:4]] if len(bad) else b} at {list(bad[:4])}"
            )
    elif ref != other:
        out.append(f"{path}: ref {ref} jax {other}")
    return out


__all__ = ["ReferenceEngine", "Stream", "diff", "scalar_params", "snapshot_of_state"]
