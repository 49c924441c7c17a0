"""A deliberately plain, pure-Python reference of the kvjax dynamics and rubric.

One scenario at a time, written from docs/dynamics.md with plain lists, dicts, ints and floats
(no JAX, no NumPy in the logic), so it is the test oracle for `kvjax.cache.dynamics` /
`kvjax.cache.rewards` and the speed baseline for `kvjax bench`.

A reference state is a dict::

    {"slots": [dict | None] * S,          # None = empty slot
     "pending": [dict, ...],              # FIFO pending queue, at most max_pending
     "arrivals": [[dict, ...]] * T,       # arrivals appended at the end of step t (read-only)
     "counters": {name: int | float},
     "time", "usage_peak", "time_above_0_95", "pending_queue_growth",
     "tier", "regime", "memory_budget",
     "seed",                              # [int, int] of a generated scenario, else None
     "max_pending", "max_arrivals"}       # capacities, for converting back to arrays

A generated JAX scenario draws its arrivals from its seed when they arrive (docs/dynamics.md,
section 3); `from_jax` draws its whole schedule with the same JAX code
(`kvjax.cache.scenarios.schedule`) and keeps the seed, so the reference reads the same future as a
table, and `to_arrays` / `to_jax` give back a state in the generated form.

and reference params are a dict with every `EnvParams` field as a Python int or float (floats
rounded to float32, the values JAX computes with). Every public function is pure: it returns a
new state and never mutates its argument (the arrival schedule is shared, never written).

Float parity: memory is in fp16-token equivalents (multiples of 0.25), so sums and comparisons
of memory are exact in both. Where JAX forms a float32 intermediate that is then compared with a
threshold (budget, room under the admit watermark, usage, progress), the reference rounds it with
`f32` so both take the same branch. Accumulators (tokens, latency) are float64 here and agree
with JAX's float32 to about 1e-6 relative.

The converters at the end (`from_jax`, `from_jax_batch`, `to_arrays`, `to_jax`, `state_arrays`)
are the only code that touches NumPy / JAX, and they import it lazily.
"""

from __future__ import annotations

import functools
import random
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

RefState = dict[str, Any]
RefParams = dict[str, Any]
Policy = Callable[[RefState], Sequence[int]]

# Independent copies of the model's constants (docs/dynamics.md); the parity tests catch drift.
SYSTEM, CONTEXT, GENERATION, REASONING, EPHEMERAL = 0, 1, 2, 3, 4
GPU, CPU = 0, 1
KEEP, EVICT, COMPRESS, SWAP = 0, 1, 2, 3

SLOT_FIELDS = (
    "seq_id", "block_type", "tokens", "precision", "location", "priority", "eviction_value",
    "output_len", "remaining", "last_access", "tool_period", "tool_wait_len", "tool_tokens",
    "tool_countdown", "tool_wait", "arrival_step",
)
REQUEST_FIELDS = (
    "seq_id", "block_type", "tokens", "output_len", "priority", "tool_period", "tool_wait_len",
    "tool_tokens", "arrival_step",
)
FLOAT_COUNTERS = ("tokens", "raw_tokens", "latency", "headroom", "eviction_value_sum")
INT_COUNTERS = (
    "failures", "preemptions", "queue_overflows", "queue_timeouts", "completed", "evictions",
    "high_value_lost", "risky_evictions", "compressions", "swaps", "swap_ins", "invalid_actions",
)
COMPONENTS = (
    "failure_penalty", "throughput_reward", "headroom_bonus", "memory_efficiency",
    "eviction_quality", "latency_penalty", "risky_eviction_penalty",
)
WEIGHTS = dict(
    failure_penalty="w_failure",
    throughput_reward="w_throughput",
    headroom_bonus="w_headroom",
    memory_efficiency="w_memory_efficiency",
    eviction_quality="w_eviction_quality",
    latency_penalty="w_latency",
    risky_eviction_penalty="w_risky_eviction",
)


def f32(x: float) -> float:
    """Round a Python float to the nearest float32 (what a JAX float32 intermediate holds)."""
    return struct.unpack("f", struct.pack("f", x))[0]


# Token value kept per precision tier (fp16, int8, int4), by block type.
QUALITY = [
    [f32(q) for q in row]
    for row in (
        (1.0, 0.98, 0.85),  # system
        (1.0, 0.98, 0.85),  # context
        (1.0, 0.99, 0.90),  # generation
        (1.0, 0.95, 0.50),  # reasoning
        (1.0, 0.99, 0.92),  # ephemeral
    )
]
RISKY_PRIORITY = 70
RISKY_PROGRESS = f32(0.7)
HEADROOM_LO, HEADROOM_MID, HEADROOM_HI = f32(0.8), f32(0.95), 1.0
PRESSURE_LEVEL = f32(0.95)
EFFICIENT_BELOW = f32(0.85)


# -- small helpers -------------------------------------------------------------------------------
def slot_memory(slot: dict | None) -> float:
    """KV of one slot in fp16-token equivalents (0 for an empty slot)."""
    if slot is None:
        return 0.0
    return slot["tokens"] * 0.5 ** slot["precision"]


def progress(slot: dict) -> float:
    """Fraction of its output generated (float32, as JAX computes it); 0 for system blocks."""
    if slot["output_len"] <= 0:
        return 0.0
    return f32((slot["output_len"] - slot["remaining"]) / slot["output_len"])


def budget_tokens(state: RefState, params: RefParams) -> float:
    """The scenario's budget in fp16-token equivalents (float32)."""
    capacity = f32(params["kv_cache_bytes"] / params["kv_bytes_per_token"])
    return f32(state["memory_budget"] * capacity)


def gpu_tokens(state: RefState) -> float:
    """GPU-resident KV in fp16-token equivalents (exact)."""
    return sum(slot_memory(s) for s in state["slots"] if s is not None and s["location"] == GPU)


def usage(state: RefState, params: RefParams) -> float:
    """GPU KV used / budget (float32, not clamped)."""
    return f32(gpu_tokens(state) / budget_tokens(state, params))


def transfer_seconds(mem: float, params: RefParams) -> float:
    """Seconds to move `mem` fp16-token equivalents over the swap link."""
    return mem * params["kv_bytes_per_token"] / params["swap_bandwidth"]


def _ready(slot: dict) -> bool:
    return slot["tool_wait"] == 0 and slot["remaining"] > 0


def copy_state(state: RefState) -> RefState:
    """A copy that shares nothing mutable with `state` (the arrival schedule is read-only)."""
    out = dict(state)
    out["slots"] = [None if s is None else dict(s) for s in state["slots"]]
    out["pending"] = [dict(r) for r in state["pending"]]
    out["counters"] = dict(state["counters"])
    return out


def _check_seqs(state: RefState, max_seqs: int | None) -> int:
    S = len(state["slots"])
    if max_seqs is not None and max_seqs != S:
        raise ValueError(f"max_seqs must equal the state's slot count {S}, got {max_seqs}")
    return S


def action_mask(state: RefState) -> list[bool]:
    """[1 + 3S]: keep, then evict / compress / swap_to_cpu per slot (True = would act)."""
    slots = state["slots"]
    evict = [s is not None for s in slots]
    on_gpu = [s is not None and s["location"] == GPU for s in slots]
    compress = [g and s["precision"] < 2 for g, s in zip(on_gpu, slots, strict=True)]
    return [True, *evict, *compress, *on_gpu]


# -- phase 1: the agent's actions ----------------------------------------------------------------
def _apply_one(state: RefState, action: int, params: RefParams, S: int) -> None:
    """Apply one action id in place; an id that names nothing valid is a counted no-op."""
    c = state["counters"]
    action = int(action)
    if action == 0:
        return
    if not 0 < action < 1 + 3 * S:
        c["invalid_actions"] += 1
        return
    kind, i = divmod(action - 1, S)
    kind += 1
    slot = state["slots"][i]
    if slot is None:
        c["invalid_actions"] += 1
        return
    if kind == EVICT:
        risky = (
            slot["block_type"] == SYSTEM
            or slot["priority"] >= RISKY_PRIORITY
            or progress(slot) >= RISKY_PROGRESS
        )
        c["evictions"] += 1
        c["eviction_value_sum"] += slot["eviction_value"]
        c["high_value_lost"] += slot["block_type"] in (SYSTEM, CONTEXT)
        c["risky_evictions"] += risky
        state["slots"][i] = None
    elif slot["location"] != GPU or (kind == COMPRESS and slot["precision"] >= 2):
        c["invalid_actions"] += 1
    elif kind == COMPRESS:
        slot["precision"] += 1
        c["compressions"] += 1
    else:  # SWAP
        c["swaps"] += 1
        c["latency"] += transfer_seconds(slot_memory(slot), params)
        slot["location"] = CPU


def apply_actions(
    state: RefState, action: Sequence[int], params: RefParams, max_seqs: int | None = None
) -> RefState:
    """Phase 1 alone: apply the action ids in order (any number); time does not advance."""
    S = _check_seqs(state, max_seqs)
    state = copy_state(state)
    for a in action:
        _apply_one(state, a, params, S)
    return state


# -- phases 2-8: the engine ----------------------------------------------------------------------
def _schedule(state: RefState, params: RefParams, B: float) -> int:
    """Swap ready CPU sequences in (slot order), then admit pending requests FIFO into free slots,
    both while the running total fits under the admit watermark. Returns the number admitted."""
    slots, c, t = state["slots"], state["counters"], state["time"]
    room = f32(f32(params["admit_watermark"] * B) - gpu_tokens(state))
    cum = swapped = 0.0
    for s in slots:
        if s is None or s["location"] != CPU or not _ready(s):
            continue
        cum += slot_memory(s)
        if cum > room:
            break  # the first that does not fit blocks the rest
        swapped += slot_memory(s)
        s["location"] = GPU
        s["last_access"] = t
        c["swap_ins"] += 1
    c["latency"] += transfer_seconds(swapped, params)
    room = f32(room - swapped)

    free = [i for i, s in enumerate(slots) if s is None]
    n_admit, cum_tokens = 0, 0
    for r in state["pending"]:
        cum_tokens += r["tokens"]
        if n_admit >= len(free) or cum_tokens > room:
            break
        slots[free[n_admit]] = {
            **{k: r[k] for k in REQUEST_FIELDS},
            "precision": 0,
            "location": GPU,
            "eviction_value": f32(1.0 - f32(r["priority"] / 100.0)),
            "remaining": r["output_len"],
            "last_access": t,
            "tool_countdown": r["tool_period"],
            "tool_wait": 0,
        }
        n_admit += 1
    return n_admit


def _decode(state: RefState, params: RefParams) -> None:
    """Running GPU sequences generate; tool calls pause/resume; ready CPU sequences stall;
    finished sequences complete and free their slot."""
    slots, c, t = state["slots"], state["counters"], state["time"]
    system_quality = min(
        (QUALITY[SYSTEM][s["precision"]] for s in slots if s is not None
         and s["block_type"] == SYSTEM),
        default=1.0,
    )
    weighted, raw, stalled = 0.0, 0, 0
    for i, s in enumerate(slots):
        if s is None:
            continue
        running = _ready(s) and s["location"] == GPU
        stalled += _ready(s) and s["location"] == CPU
        gen = min(params["decode_tokens_per_step"], s["remaining"]) if running else 0
        weighted += gen * QUALITY[s["block_type"]][s["precision"]]
        raw += gen
        s["remaining"] -= gen
        s["tokens"] += gen
        if s["tool_wait"] > 0:  # paused on a tool call (on GPU or CPU)
            s["tool_wait"] -= 1
            if s["tool_wait"] == 0:  # the tool returned: its result joins the context
                s["tokens"] += s["tool_tokens"]
                s["last_access"] = t
        if running:
            s["last_access"] = t
            if s["tool_period"] > 0:
                s["tool_countdown"] -= 1
                if s["tool_countdown"] <= 0 and s["remaining"] > 0:
                    s["tool_wait"] = s["tool_wait_len"]
                    s["tool_countdown"] = s["tool_period"]
            if s["remaining"] == 0:
                c["completed"] += 1
                slots[i] = None
    c["tokens"] += weighted * system_quality
    c["raw_tokens"] += raw
    c["latency"] += params["step_seconds"] * stalled


def _preempt(state: RefState, B: float) -> float:
    """While GPU KV exceeds the budget, drop GPU residents in vLLM-like order (non-system first,
    then newest arrival, then highest slot); each is a failure. Returns the peak usage."""
    slots, c = state["slots"], state["counters"]
    resident = [i for i, s in enumerate(slots) if s is not None and s["location"] == GPU]
    used = sum(slot_memory(slots[i]) for i in resident)
    order = sorted(
        resident,
        key=lambda i: (slots[i]["block_type"] == SYSTEM, -slots[i]["arrival_step"], -i),
    )
    left = used
    for i in order:
        if left <= B:
            break
        left -= slot_memory(slots[i])
        c["preemptions"] += 1
        c["failures"] += 1
        c["high_value_lost"] += slots[i]["block_type"] in (SYSTEM, CONTEXT)
        slots[i] = None
    return f32(used / B)


def _advance_queue(state: RefState, n_admit: int, params: RefParams) -> None:
    """Drop the admitted prefix and timed-out requests, then append this step's arrivals (those
    that do not fit the queue overflow)."""
    c, t = state["counters"], state["time"]
    queue = state["pending"]
    count = len(queue)
    rest = queue[n_admit:]
    kept = [r for r in rest if t - r["arrival_step"] < params["max_wait_steps"]]
    n_timeout = len(rest) - len(kept)
    arrivals = state["arrivals"]
    arriving = arrivals[t] if t < len(arrivals) else []
    accepted = arriving[: max(state["max_pending"] - len(kept), 0)]
    overflow = len(arriving) - len(accepted)
    state["pending"] = kept + [dict(r) for r in accepted]
    c["queue_timeouts"] += n_timeout
    c["queue_overflows"] += overflow
    c["failures"] += n_timeout + overflow
    state["pending_queue_growth"] = len(state["pending"]) - count


def headroom_score(peak: float) -> float:
    """1.0 below 0.8, 0.5 below 0.95, 0.0 up to 1.0, -0.5 above."""
    if peak < HEADROOM_LO:
        return 1.0
    if peak < HEADROOM_MID:
        return 0.5
    return 0.0 if peak <= HEADROOM_HI else -0.5


def advance(state: RefState, params: RefParams) -> RefState:
    """Phases 2-8 (the engine's part of a step, after the agent has acted); time advances."""
    state = copy_state(state)
    B = budget_tokens(state, params)
    n_admit = _schedule(state, params, B)
    _decode(state, params)
    peak = _preempt(state, B)
    _advance_queue(state, n_admit, params)
    state["counters"]["headroom"] += headroom_score(peak)
    state["time"] += 1
    state["usage_peak"] = peak
    state["time_above_0_95"] += peak > PRESSURE_LEVEL
    return state


def step(
    state: RefState, action: Sequence[int], params: RefParams, max_seqs: int | None = None
) -> RefState:
    """One full step: the actions in order, then the engine. Pure (returns a new state)."""
    return advance(apply_actions(state, action, params, max_seqs), params)


# -- rubric --------------------------------------------------------------------------------------
def rubric(state: RefState, params: RefParams) -> dict[str, float]:
    """The seven weighted components, `total` and the four metrics (all 0 before step 1)."""
    c = state["counters"]
    played = state["time"] > 0
    f = float(c["failures"])
    peak = state["usage_peak"]
    mean_value = c["eviction_value_sum"] / c["evictions"] if c["evictions"] > 0 else 1.0
    comps = {
        "failure_penalty": -min(f * 0.15 + max(0.0, f - 2.0) * 0.1, 1.0),
        "throughput_reward": min(c["tokens"] / params["throughput_target_tokens"], 1.0),
        "headroom_bonus": c["headroom"] / len(state["arrivals"]),
        "memory_efficiency": (
            (-0.2 if peak > 1.0 else 0.2 if peak < EFFICIENT_BELOW else 0.0) if played else 0.0
        ),
        "eviction_quality": (
            max(-1.0, min(1.0, mean_value - 0.25 * c["high_value_lost"])) if played else 0.0
        ),
        "latency_penalty": -min(c["latency"] * params["latency_scale"], params["latency_cap"]),
        "risky_eviction_penalty": -min(0.25 * c["risky_evictions"], 1.0),
    }
    out = {k: v + 0.0 for k, v in comps.items()}
    out["total"] = sum(params[WEIGHTS[k]] * out[k] for k in COMPONENTS)
    out["total_tokens_metric"] = float(c["tokens"])
    out["total_failures_metric"] = f
    out["total_latency_metric"] = float(c["latency"])
    out["pressure_steps_metric"] = float(state["time_above_0_95"])
    return out


def total(state: RefState, params: RefParams) -> float:
    """The weighted rubric total alone."""
    return rubric(state, params)["total"]


# -- episodes and baseline policies (the speed baseline of `kvjax bench`) ------------------------
def keep_policy(max_actions: int = 3) -> Policy:
    """A policy that always keeps."""
    keep = [KEEP] * max_actions
    return lambda state: keep


def random_valid_policy(seed: int = 0, max_actions: int = 3) -> Policy:
    """Each of `max_actions` entries uniform over the ids valid in the current state (keep
    included); later entries may become no-ops after earlier ones, as in the JAX baseline."""
    rng = random.Random(seed)

    def policy(state: RefState) -> list[int]:
        valid = [i for i, ok in enumerate(action_mask(state)) if ok]
        return [rng.choice(valid) for _ in range(max_actions)]

    return policy


def run_episode(
    state: RefState, params: RefParams, policy_fn: Policy, max_seqs: int | None = None
) -> dict[str, Any]:
    """Play from `state` until the episode's last step with `policy_fn(state) -> action ids`.

    Returns {"state": final state, "rewards": per-step rewards (change of the rubric total),
    "return": their sum, "steps": steps played, "rubric": final rubric}."""
    S = _check_seqs(state, max_seqs)
    T = len(state["arrivals"])
    rewards = []
    prev = total(state, params)
    while state["time"] < T:
        state = step(state, policy_fn(state), params, S)
        now = total(state, params)
        rewards.append(now - prev)
        prev = now
    return {
        "state": state,
        "rewards": rewards,
        "return": sum(rewards),
        "steps": len(rewards),
        "rubric": rubric(state, params),
    }


def time_episodes(
    pairs: Sequence[tuple[RefState, RefParams]], policy_fn: Policy
) -> dict[str, float]:
    """Play every (state, params) pair to the end with `policy_fn` and time it (the reference's
    speed baseline): {"episodes", "steps", "seconds", "steps_per_s", "mean_return"}."""
    start = time.perf_counter()
    steps, returns = 0, 0.0
    for state, params in pairs:
        out = run_episode(state, params, policy_fn)
        steps += out["steps"]
        returns += out["return"]
    seconds = time.perf_counter() - start
    return {
        "episodes": len(pairs),
        "steps": steps,
        "seconds": seconds,
        "steps_per_s": steps / seconds if seconds > 0 else float("inf"),
        "mean_return": returns / max(len(pairs), 1),
    }


# -- converters (the only NumPy / JAX code) ------------------------------------------------------
def _params_from(params: Any, index: int | None = None) -> RefParams:
    """EnvParams -> dict of Python scalars; float fields rounded to float32. With `index`,
    leaves that are batched (ndim > 0) are indexed."""
    import dataclasses

    import numpy as np

    from kvjax.cache.types import EnvParams

    out = {}
    for field in dataclasses.fields(EnvParams):
        value = np.asarray(getattr(params, field.name))
        if value.ndim > 0:
            if index is None:
                raise ValueError(f"params.{field.name} is batched; pass an unbatched EnvParams")
            value = value[index]
        is_float = isinstance(field.default, float)
        out[field.name] = float(np.float32(value)) if is_float else int(value)
    return out


def _requests(tree: dict[str, list], fields: Sequence[str]) -> list[dict]:
    return [
        {k: tree[k][j] for k in fields} for j, ok in enumerate(tree["valid"]) if ok
    ]


def _state_from_lists(t: dict[str, Any], seed: list[int] | None = None) -> RefState:
    """Build a reference state from a nested dict of Python lists / scalars (one scenario).
    `seed`: the scenario's seed when its arrivals table was drawn from it (generated)."""
    sl = t["slots"]
    slots = [
        {k: sl[k][i] for k in SLOT_FIELDS} if sl["active"][i] else None
        for i in range(len(sl["active"]))
    ]
    arr = t["arrivals"]
    arrivals = [
        _requests({k: arr[k][row] for k in arr}, REQUEST_FIELDS)
        for row in range(len(arr["valid"]))
    ]
    return {
        "slots": slots,
        "pending": _requests(t["pending"], REQUEST_FIELDS),
        "arrivals": arrivals,
        "counters": dict(t["counters"]),
        **{k: t[k] for k in ("time", "usage_peak", "time_above_0_95", "pending_queue_growth",
                             "tier", "regime", "memory_budget")},
        "seed": seed,
        "max_pending": len(t["pending"]["valid"]),
        "max_arrivals": len(arr["valid"][0]),
    }


def _draw_schedules(arrays: dict[str, Any], params: Any, cfg: Any, batched: bool) -> None:
    """Replace `arrays["arrivals"]` of generated scenarios ([T, 0]: drawn when they arrive) by
    their whole schedule [T, K], drawn from the seed by
    `kvjax.cache.scenarios.schedule` (in place)."""
    import jax
    import numpy as np

    from kvjax.cache.types import EnvConfig

    if np.shape(arrays["arrivals"]["valid"])[-1] != 0:
        return
    S = np.shape(arrays["slots"]["active"])[-1]
    P = np.shape(arrays["pending"]["valid"])[-1]
    T = np.shape(arrays["arrivals"]["valid"])[-2]
    cfg = cfg or EnvConfig()
    cfg = EnvConfig(max_seqs=S, max_pending=P, max_actions=cfg.max_actions, episode_len=T,
                    max_arrivals=cfg.max_arrivals)
    axes = (
        jax.tree_util.tree_map(lambda x: 0 if np.ndim(x) > 0 else None, params) if batched else None
    )
    table = jax.device_get(_schedule_drawer(cfg, axes)(arrays["seed"], arrays["regime"], params))
    arrays["arrivals"] = {k: np.asarray(v) for k, v in vars(table).items()}


@functools.cache
def _schedule_drawer(cfg: Any, axes: Any) -> Callable:
    """jit(scenarios.schedule), vmapped over `axes` unless None: one per (config, axes), so that
    converting many states compiles once, not once per call."""
    import jax

    from kvjax.cache import scenarios

    fn = lambda seed, regime, p: scenarios.schedule(seed, regime, p, cfg)  # noqa: E731
    return jax.jit(fn if axes is None else jax.vmap(fn, in_axes=(0, 0, axes)))


def state_arrays(state: Any, canonical: bool = True) -> dict[str, Any]:
    """A (possibly batched) JAX EnvState -> nested dict of NumPy arrays with the same field names
    and dtypes as `to_arrays` (for comparisons).

    With `canonical`, empty slot rows and empty pending rows are zeroed (seq_id -1): the JAX step
    leaves them inert but not necessarily cleared (every rule masks by `active` / `valid`)."""
    import jax
    import numpy as np

    host = jax.device_get(state)

    def table(x: Any, live: str | None = None) -> dict[str, np.ndarray]:
        out = {k: np.asarray(v) for k, v in vars(x).items()}
        if canonical and live is not None:
            keep = out[live]
            for k, v in out.items():
                if k != live:
                    out[k] = np.where(keep, v, -1 if k == "seq_id" else 0).astype(v.dtype)
        return out

    out: dict[str, Any] = {
        "slots": table(host.slots, "active"),
        "pending": table(host.pending, "valid"),
        "arrivals": table(host.arrivals),
        "counters": table(host.counters),
    }
    for k in ("time", "usage_peak", "time_above_0_95", "pending_queue_growth", "tier", "regime",
              "memory_budget", "seed"):
        out[k] = np.asarray(getattr(host, k))
    return out


def _to_lists(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _to_lists(v) if isinstance(v, dict) else v.tolist() for k, v in tree.items()}


def _seed_of(arrays: dict[str, Any], drawn: bool) -> list[int] | None:
    return [int(x) for x in arrays["seed"]] if drawn else None


def from_jax(state: Any, params: Any, cfg: Any = None) -> tuple[RefState, RefParams]:
    """One unbatched JAX EnvState and EnvParams -> (reference state, reference params). A
    generated state's future is drawn into the reference's arrivals table; `cfg` (an
    EnvConfig) gives its max_arrivals when that is not the default."""
    arrays = state_arrays(state)
    if arrays["time"].ndim != 0:
        raise ValueError("from_jax takes one unbatched state; use from_jax_batch for a batch")
    drawn = arrays["arrivals"]["valid"].shape[-1] == 0
    _draw_schedules(arrays, params, cfg, batched=False)
    seed = _seed_of(arrays, drawn)
    del arrays["seed"]
    return _state_from_lists(_to_lists(arrays), seed), _params_from(params)


def from_jax_batch(
    states: Any, params: Any, cfg: Any = None
) -> list[tuple[RefState, RefParams]]:
    """A batched JAX EnvState (leading axis) and EnvParams (batched or shared leaves) -> one
    (reference state, reference params) pair per scenario (see `from_jax`)."""
    arrays = state_arrays(states)
    drawn = arrays["arrivals"]["valid"].shape[-1] == 0
    _draw_schedules(arrays, params, cfg, batched=True)
    seeds = arrays.pop("seed")
    lists = _to_lists(arrays)
    n = len(lists["time"])

    def pick(tree: Any, i: int) -> Any:
        return {k: pick(v, i) for k, v in tree.items()} if isinstance(tree, dict) else tree[i]

    return [
        (_state_from_lists(pick(lists, i), _seed_of({"seed": seeds[i]}, drawn)),
         _params_from(params, i))
        for i in range(n)
    ]


def _request_lists(rows: Sequence[dict], capacity: int, step: int | None = None) -> dict:
    """Rows -> a valid-prefix table of lists. Empty rows are zeros with seq_id -1, except that
    in the arrival schedule (`step` given) every entry of row t has arrival_step t, as generated."""
    pad = capacity - len(rows)
    out: dict[str, list] = {"valid": [True] * len(rows) + [False] * pad}
    for k in REQUEST_FIELDS:
        empty = -1 if k == "seq_id" else step if k == "arrival_step" and step is not None else 0
        out[k] = [r[k] for r in rows] + [empty] * pad
    return out


def _as_lists(state: RefState) -> dict[str, Any]:
    """Reference state -> nested dict of Python lists laid out like the JAX EnvState."""
    slots = state["slots"]
    sl: dict[str, list] = {"active": [s is not None for s in slots]}
    for k in SLOT_FIELDS:
        empty = -1 if k == "seq_id" else 0
        sl[k] = [empty if s is None else s[k] for s in slots]
    seed = state.get("seed")
    if seed is None:  # a hand-built schedule: the table itself
        rows = [
            _request_lists(r, state["max_arrivals"], t) for t, r in enumerate(state["arrivals"])
        ]
        arrivals = {k: [r[k] for r in rows] for k in rows[0]}
    else:  # generated: drawn from the seed when they arrive ([T, 0])
        arrivals = {k: [[] for _ in state["arrivals"]] for k in ("valid", *REQUEST_FIELDS)}
    return {
        "slots": sl,
        "pending": _request_lists(state["pending"], state["max_pending"]),
        "arrivals": arrivals,
        "seed": [0, 0] if seed is None else list(seed),
        "counters": {k: state["counters"][k] for k in (*FLOAT_COUNTERS, *INT_COUNTERS)},
        **{k: state[k] for k in ("time", "usage_peak", "time_above_0_95",
                                 "pending_queue_growth", "tier", "regime", "memory_budget")},
    }


_FLOAT_LEAVES = {"eviction_value", "usage_peak", "memory_budget"}


def _to_numpy(tree: dict[str, Any], counters: bool = False) -> dict[str, Any]:
    import numpy as np

    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out[k] = _to_numpy(v, counters=k == "counters")
            continue
        if k in ("valid", "active"):
            dtype = np.bool_
        elif k == "seed":
            dtype = np.uint32
        elif k in _FLOAT_LEAVES or (counters and k in FLOAT_COUNTERS):
            dtype = np.float32
        else:
            dtype = np.int32
        out[k] = np.asarray(v, dtype)
    return out


def to_arrays(state: RefState) -> dict[str, Any]:
    """Reference state -> nested dict of NumPy arrays laid out like the JAX EnvState (the same
    field names and dtypes as `state_arrays`; empty rows canonical: zeros, seq_id -1)."""
    return _to_numpy(_as_lists(state))


def to_arrays_batch(states: Sequence[RefState]) -> dict[str, Any]:
    """Many reference states -> one nested dict of stacked NumPy arrays (leading batch axis)."""
    trees = [_as_lists(s) for s in states]

    def stack(parts: list[Any]) -> Any:
        if isinstance(parts[0], dict):
            return {k: stack([p[k] for p in parts]) for k in parts[0]}
        return parts

    return _to_numpy(stack(trees))


def _jax_state(a: dict[str, Any]) -> Any:
    import jax.numpy as jnp

    from kvjax.cache.types import Counters, EnvState, Requests, Slots

    def conv(d: dict[str, Any]) -> dict[str, Any]:
        return {k: jnp.asarray(v) for k, v in d.items()}

    scalars = {k: jnp.asarray(v) for k, v in a.items() if not isinstance(v, dict)}
    return EnvState(
        slots=Slots(**conv(a["slots"])),
        pending=Requests(**conv(a["pending"])),
        arrivals=Requests(**conv(a["arrivals"])),
        counters=Counters(**conv(a["counters"])),
        **scalars,
    )


def to_jax(state: RefState) -> Any:
    """Reference state -> JAX EnvState (so a hand-built reference state can be stepped by JAX)."""
    return _jax_state(to_arrays(state))


def to_jax_batch(states: Sequence[RefState]) -> Any:
    """Many reference states -> one batched JAX EnvState (leading axis)."""
    return _jax_state(to_arrays_batch(states))


__all__ = [
    "COMPONENTS",
    "action_mask",
    "advance",
    "apply_actions",
    "copy_state",
    "f32",
    "from_jax",
    "from_jax_batch",
    "keep_policy",
    "random_valid_policy",
    "rubric",
    "run_episode",
    "state_arrays",
    "step",
    "time_episodes",
    "to_arrays",
    "to_arrays_batch",
    "to_jax",
    "to_jax_batch",
    "total",
    "usage",
]
