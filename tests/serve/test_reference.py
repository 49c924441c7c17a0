"""Parity of kv-serve-v0's JAX step (`env.step_env`: actions.apply + engine.run) with the plain
Python oracle `kvjax/serve/reference.py`, on whole episodes and on crafted mid-episode states.

Each case is one ServeConfig (one compile of the vmapped step) and a batch of scenarios: the
three engines x both KV dtypes x light and overloaded loads, under random actions (random
priorities, including out-of-range ones; command ids that are random, out of range, or aimed
at running requests and segment rows: offloads that complete and load back, preemptions,
pins, drops, reserve levels). After every step the request table (fields of occupied rows,
the waiting and running orders), the segment table, the clock and engine scalars, the metrics
and the finished-request log must agree: integers exactly, times within rtol 1e-5; and the
JAX state must keep the segment tree's invariants (`tree_errors`). What the episodes went
through (preemptions, retractions, TRT stalls, prefix hits, evictions, segment inserts, client
timeouts, offloads and loads) is asserted, so parity cannot become vacuous.

Synthetic workloads only have root segments (one per system prompt). The keyed tree - fallback
keys, published keys, rows allocated for inserts (fresh, stale, an evictable leaf replaced),
leaf-only evictions and drops - is exercised by the crafted states: random prefix forests,
segment tables over part of them and requests reading, falling back and publishing along
their paths.

The agentic closed-loop workload (docs/serving.md section 7) has its own case: sessions whose
completed calls continue as TOOL rows, wake into the queue at the stream pointer, read their
previous call's history or fall back to the system prompt, and end by their number of calls or
a full context (asserted, with client timeouts of woken calls); a hand-built state pins the
wake-up order and a continuation's fields.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.serve import engine as serve_engine
from kvjax.serve import reference as ref_mod
from kvjax.serve.build import build_state
from kvjax.serve.types import ENGINES, KV_DTYPES, LOADING, OFFLOADING, RUNNING

RTOL = 1e-5

# One compile per case; scenarios = engines x dtypes x loads.
CASES = {
    # The `toy` preset as shipped (shorter horizon), light and overloaded.
    "toy": dict(config=None, loads=(0.5, 1.5), max_steps=200, params=dict(horizon=12.0)),
    # A small engine under memory pressure: 16 rows, a 512-block pool, a small CPU tier and a
    # short client timeout, so preemption, prefix hits and evictions, timeouts, arrivals held
    # behind a full table and offload / load round trips all happen.
    "tight": dict(
        config=dict(max_requests=16, max_segments=4, finished_log=64),
        loads=(0.7, 3.0),
        max_steps=260,
        params=dict(
            horizon=10.0,
            gpu_pool_tokens=8192,
            cpu_pool_tokens=6144,
            max_num_seqs=12,
            max_batched_tokens=1024,
            max_tokens=128,
            max_model_len=4096,
            num_prefixes=3,
            prefix_share=0.7,
            client_timeout=3.0,
            pin_ttl=1.0,
        ),
    ),
}

# The agentic closed-loop workload (docs/serving.md section 7): sessions of calls separated by
# short tool gaps, small contexts (calls of ~1.5K new tokens in an 8K context, so sessions end
# by a full context as well as by their number of calls), a short client timeout so woken calls
# time out under overload, and an 8-row segment table that history keys keep turning over.
AGENTIC = dict(
    config=dict(max_requests=16, max_segments=8, finished_log=64),
    engines=ENGINES,
    dtypes=("bf16",),
    loads=(0.6, 3.0),
    max_steps=400,
    params=dict(
        workload="agentic",
        horizon=10.0,
        gpu_pool_tokens=24576,
        cpu_pool_tokens=16384,
        max_num_seqs=12,
        max_batched_tokens=1024,
        max_tokens=256,
        max_model_len=8192,
        prefix_tokens=1024,
        agent_task_tokens=1500.0,
        agent_output_tokens=60.0,
        agent_turn_tokens=1500.0,
        agent_turns=4.0,
        tool_gap_median=0.3,
        client_timeout=3.0,
        pin_ttl=1.0,
    ),
)
CASES["agentic"] = AGENTIC

# Longer (marked slow): another workload, other engine knobs and config shapes, more segments.
SLOW_CASES = {
    "code": dict(
        CASES["tight"],
        seed=5,
        params=dict(CASES["tight"]["params"], workload="synthetic-code"),
    ),
    "knobs": dict(
        config=dict(
            CASES["tight"]["config"],
            max_arrivals_per_iter=1,
            iterations_per_step=4,
            priority_levels=2,
        ),
        loads=(0.7, 3.0),
        max_steps=900,
        params=dict(
            CASES["tight"]["params"], max_partial_prefills=2, max_batched_tokens=512, horizon=5.0
        ),
    ),
    "agentic-fp8": dict(
        AGENTIC,
        dtypes=("fp8",),
        loads=(1.0, 4.0),
        seed=3,
        max_steps=800,
        params=dict(AGENTIC["params"], horizon=25.0, agent_turns=6.0, client_timeout=1.5),
    ),
    "prefixes": dict(
        config=dict(reserve_levels=(0.0, 0.3)),
        loads=(1.0, 4.0),
        max_steps=300,
        params=dict(horizon=8.0, num_prefixes=8, prefix_share=0.9, gpu_pool_tokens=40000),
    ),
}


def scenarios(case: dict):
    """The case's envs and params, engines mixed in one batch: the traced-engine config
    (engine=None; test_serve_engine proves the static engines equal to it)."""
    envs, plist, names = [], [], []
    engines, dtypes = case.get("engines", ENGINES), case.get("dtypes", KV_DTYPES)
    for engine, dtype, load in itertools.product(engines, dtypes, case["loads"]):
        env, p = kvjax.make(
            "kv-serve-v0",
            preset="toy",
            engine=engine,
            kv_dtype=dtype,
            load=load,
            config={**(case["config"] or {}), "engine": None},
            **case["params"],
        )
        envs.append(env)
        plist.append(p)
        names.append(f"{engine}/{dtype}/load={load}")
    return ENVS.setdefault(envs[0].config, envs[0]), plist, names


ENVS: dict = {}  # one env object per config, so compiled() hits its cache


@functools.cache
def compiled(env):
    """The vmapped reset and step of a config's env (one compile per config and batch size;
    the crafted-state test reuses the `tight` case's)."""
    return jax.jit(jax.vmap(env.reset_env)), jax.jit(jax.vmap(env.step_env))


def random_action(rng: np.random.Generator, ref: ref_mod.ReferenceEngine, busy: float) -> dict:
    """Priorities (some out of range) and commands: noop, random ids (some out of range),
    offload / preempt of running requests, pin / drop of segments, reserve levels."""
    cfg = ref.cfg
    S, G, L, A = cfg.max_requests, cfg.max_segments, cfg.priority_levels, cfg.max_commands
    n_ids = cfg.num_command_ids
    rp, sp = np.zeros(S, np.int32), np.zeros(G, np.int32)
    cmds = np.zeros(A, np.int32)
    if rng.random() < busy:
        if rng.random() < 0.4:
            m = rng.random(S) < 0.3
            rp[m] = rng.integers(-1, L + 2, int(m.sum()))
        if rng.random() < 0.3:
            m = rng.random(G) < 0.5
            sp[m] = rng.integers(-1, L + 2, int(m.sum()))
        running = [r.row for r in ref.live() if r.status == RUNNING]
        for a in range(A):
            u = rng.random()
            if u < 0.15:
                cmds[a] = rng.integers(-3, n_ids + 3)
            elif u < 0.35 and running:
                cmds[a] = 1 + rng.choice(running)  # offload
            elif u < 0.45 and running:
                cmds[a] = 1 + S + rng.choice(running)  # preempt
            elif u < 0.55:
                cmds[a] = 1 + 2 * S + rng.integers(G)  # pin
            elif u < 0.65:
                cmds[a] = 1 + 2 * S + G + rng.integers(G)  # drop
            elif u < 0.72:
                cmds[a] = 1 + 2 * S + 2 * G + rng.integers(len(cfg.reserve_levels))
    return dict(request_priority=rp, segment_priority=sp, commands=cmds)


def run_case(name: str, seed: int = 0):
    case = {**CASES, **SLOW_CASES}[name]
    seed = case.get("seed", seed)
    env, plist, names = scenarios(case)
    cfg = env.config
    n = len(plist)
    params = jax.tree_util.tree_map(lambda *xs: jnp.asarray(np.stack(xs)), *plist)
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    vreset, vstep = compiled(env)
    _, states = vreset(keys, params)
    host = jax.device_get(states)
    pick = lambda tree, i: jax.tree_util.tree_map(lambda x: x[i], tree)  # noqa: E731
    refs = [ref_mod.ReferenceEngine.from_state(pick(host, i), plist[i], cfg) for i in range(n)]
    rng = np.random.default_rng(seed)
    busy = np.where(np.arange(n) % 2 == 0, 0.6, 0.15)  # agent activity per scenario
    steps = 0
    horizon = np.asarray(params.horizon)
    for _ in range(case["max_steps"]):
        acts = [random_action(rng, refs[i], busy[i]) for i in range(n)]
        batch = {k: jnp.asarray(np.stack([a[k] for a in acts])) for k in acts[0]}
        _, states, rewards, _, _, _ = vstep(keys, states, batch, params)
        host, rewards = jax.device_get((states, rewards))
        for i in range(n):
            reward = refs[i].step(acts[i])
            errs = ref_mod.diff(
                refs[i].snapshot(), ref_mod.snapshot_of_state(pick(host, i), cfg), rtol=RTOL
            )
            if not np.isclose(reward, rewards[i], rtol=RTOL, atol=1e-6):
                errs.append(f"reward: ref {reward} jax {rewards[i]}")
            errs += tree_errors(pick(host, i), refs[i].pool())
            if errs:
                pytest.fail(f"{name} {names[i]} step {refs[i].steps}: " + "; ".join(errs[:8]))
        steps += n
        if np.all(host.clock >= horizon):
            break
    assert np.all(host.clock >= horizon), "episodes did not reach the horizon"
    return refs, names, steps, host


def total(refs, key, which=None):
    return sum(
        r.events[key] if key in r.events else r.metrics[key]
        for r in refs
        if which is None or which(r)
    )


def test_parity_toy_preset():
    refs, names, steps, _ = run_case("toy")
    assert steps >= 700
    assert total(refs, "completions") > 500
    assert total(refs, "hits") > 0 and total(refs, "inserts") > 0
    assert total(refs, "offloads_done") > 0 and total(refs, "loads_done") > 0
    assert total(refs, "agent_preemptions") > 0 and total(refs, "invalid_commands") > 0
    assert total(refs, "partial_admits") > 0


def test_parity_tight_memory():
    refs, names, steps, _ = run_case("tight")
    assert steps >= 800
    eng = lambda e: lambda r: r.p.engine == ENGINES.index(e)  # noqa: E731
    assert total(refs, "preempted", eng("vllm")) > 0  # engine preemptions by recompute
    assert total(refs, "sglang_retracts", eng("sglang")) > 0
    assert total(refs, "trt_blocked", eng("trt")) > 0
    assert total(refs, "preempted", eng("trt")) == 0  # TRT never preempts
    assert total(refs, "hits") > 0 and total(refs, "evictions") > 0
    assert total(refs, "inserts") > 0 and total(refs, "timeouts") > 0
    assert total(refs, "offloads_done") > 0 and total(refs, "loads_done") > 0
    assert total(refs, "idle") > 0 and total(refs, "partial_admits") > 0
    assert any(r.metrics["log_count"] > r.cfg.finished_log for r in refs)  # the ring wrapped
    assert total(refs, "held_back") > 0  # arrivals waited behind a full table


def test_parity_agentic_sessions():
    """The agentic workload under random actions: completed calls continue as TOOL rows,
    wake into the queue at the stream pointer, hit their previous call's history (or fall
    back to the system prompt), and sessions end by their number of calls and by a full
    context; woken calls can time out."""
    refs, names, steps, host = run_case("agentic")
    assert_agentic(refs)


def assert_agentic(refs):
    eng = lambda e: lambda r: r.p.engine == ENGINES.index(e)  # noqa: E731
    assert total(refs, "continuations") > 0 and total(refs, "wakes") > 0
    assert total(refs, "history_hits") > 0 and total(refs, "system_fallbacks") > 0
    assert total(refs, "ended_turns") > 0 and total(refs, "ended_context") > 0
    assert total(refs, "woken_timeouts") > 0
    assert total(refs, "publish_inserts") > 0 and total(refs, "completions") > 0
    assert total(refs, "preempted", eng("vllm")) > 0
    assert total(refs, "offloads_done") > 0 and total(refs, "loads_done") > 0
    # Every scenario had TOOL rows in the table at some point and scored per call.
    assert all(r.events["continuations"] > 0 for r in refs)


# -- crafted states ----------------------------------------------------------------------------
KEY0 = 16  # crafted keys start here, apart from the synthetic stream's (0..num_prefixes-1)


def crafted_forest(rng: np.random.Generator, n_keys: int = 10):
    """A random prefix forest of keys KEY0.. (parents before children): parent key (-1 for a
    root) and absolute tokens (a block multiple larger than the parent's)."""
    parent, tokens = {}, {}
    for i in range(n_keys):
        k = KEY0 + i
        parent[k] = -1 if i == 0 or rng.random() < 0.3 else KEY0 + int(rng.integers(0, i))
        base = tokens[parent[k]] if parent[k] >= 0 else 0
        tokens[k] = base + 16 * int(rng.integers(2, 24))
    return parent, tokens


def ancestors(parent: dict, k: int) -> list[int]:
    """k's proper ancestors, root first."""
    out = []
    while parent[k] >= 0:
        k = parent[k]
        out.insert(0, k)
    return out


def crafted_segments(rng: np.random.Generator, G: int, parent: dict, tokens: dict):
    """A segment table over part of the forest: some rows never used, the keys placed in
    random rows (a child may sit above its parent), paths resident from the root down (a
    resident row's parent row is resident), non-resident rows with stale parent pointers."""
    n_valid = int(rng.integers(1, G + 1))
    keys: list[int] = []
    while len(keys) < n_valid:
        k = int(rng.choice(list(parent)))
        for a in [*ancestors(parent, k), k]:
            if a not in keys and len(keys) < n_valid:
                keys.append(a)
    rows = rng.permutation(G)[:n_valid]
    row_of = {k: int(g) for k, g in zip(keys, rows, strict=True)}
    seg = dict(
        valid=np.zeros(G, bool),
        key=np.full(G, -1, np.int32),
        parent=np.full(G, -1, np.int32),
        tokens=np.zeros(G, np.int32),
        on_gpu=np.zeros(G, bool),
    )
    for k in keys:  # parents before children
        g, pk = row_of[k], parent[k]
        seg["valid"][g], seg["key"][g], seg["tokens"][g] = True, k, tokens[k]
        if pk >= 0 and pk in row_of:
            seg["parent"][g] = row_of[pk]
            seg["on_gpu"][g] = seg["on_gpu"][row_of[pk]] and rng.random() < 0.8
        else:
            seg["on_gpu"][g] = pk < 0 and rng.random() < 0.8
            if pk >= 0:  # its parent's row was reused: a stale pointer (never resident)
                seg["parent"][g] = int(rng.integers(-1, G))
    return seg, row_of


def crafted_prefix(rng: np.random.Generator, parent: dict, tokens: dict) -> dict:
    """A request's prefix fields on the forest: the key it reads, a fallback ancestor, a
    deeper key it publishes (some read nothing and only publish; some have no prefix)."""
    out = dict(segment=-1, segment_up=-1, prefix_len=0, publish=-1, publish_len=0)
    u = rng.random()
    if u < 0.25:
        return out
    k = int(rng.choice(list(parent)))
    if u < 0.35:  # reads nothing, publishes k
        out.update(publish=k, publish_len=tokens[k])
        return out
    out.update(segment=k, prefix_len=tokens[k])
    up = ancestors(parent, k)
    if up and rng.random() < 0.6:
        out["segment_up"] = int(rng.choice(up))
    below = [c for c in parent if k in ancestors(parent, c)]
    if below and rng.random() < 0.6:
        c = int(rng.choice(below))
        out.update(publish=c, publish_len=tokens[c])
    return out


def crafted(rng: np.random.Generator, st, p, cfg, stream: ref_mod.Stream):
    """A random but consistent mid-episode state (numpy, one scenario) and its params: every
    status, prefills and decodes, a segment tree (resident paths, rows never used, stale
    rows, cached / pinned / evictable leaves), requests reading a key with a fallback
    ancestor and publishing a deeper one, attached to a row of their path or not, transfers
    about to end, preempted requests in the queue, a pool with little slack and varied batch
    limits."""
    S, G, L = cfg.max_requests, cfg.max_segments, cfg.priority_levels
    n = int(rng.integers(S + 4, 60))
    stream.ensure(n + 1)
    clock = np.float32(stream.arrival[n] - rng.uniform(0.0, 0.3))
    kparent, ktokens = crafted_forest(rng)
    sg, row_of = crafted_segments(rng, G, kparent, ktokens)
    q = st.requests
    rq = {k: np.array(getattr(q, k)) for k in vars(q) if not k.startswith("_")}
    status = rng.choice(6, S, p=[0.12, 0.3, 0.3, 0.08, 0.1, 0.1])
    idx = rng.permutation(n)[:S]
    neg = 0
    for r in range(S):
        s = int(status[r])
        pre = crafted_prefix(rng, kparent, ktokens)
        deepest = max(pre["prefix_len"], pre["publish_len"])
        if deepest and rng.random() < 0.08:
            prompt = deepest  # the whole prompt is the prefix
        else:
            prompt = deepest + int(rng.integers(1, 2500 - deepest // 2))
        out = int(rng.integers(1, p.max_tokens + 1))
        g0 = 0 if (out == 1 or rng.random() < 0.6) else int(rng.integers(1, out))
        target, gen, comp = prompt + g0, g0, 0
        if s in (2, 3, 4, 5):  # running, offloading, swapped, loading: some KV computed
            if gen + 1 < out and rng.random() < 0.5:  # decoding
                gen = int(rng.integers(g0 + 1, out))
                comp = target + gen - g0 - 1
            else:
                comp = int(rng.integers(1, target)) if target > 1 else 1
        attached = -1
        if s in (2, 3) and rng.random() < 0.7:  # attached to a resident row of its path
            path = [pre[f] for f in ("segment_up", "segment", "publish") if pre[f] >= 0]
            rows = [
                row_of[k]
                for k in path
                if k in row_of and sg["on_gpu"][row_of[k]] and ktokens[k] <= comp
            ]
            if rows:
                attached = int(rng.choice(rows))
        arrival = np.float32(clock - rng.uniform(0.0, 4.0))
        first = np.float32(arrival + rng.uniform(0.0, 0.5)) if gen > 0 else np.float32(-1)
        last = np.float32(first + rng.uniform(0.0, 2.0)) if gen > 0 else np.float32(-1)
        negative = s in (3, 4) or (s == 1 and (gen > 0 or rng.random() < 0.3))
        neg += negative
        rq_row = dict(
            status=s,
            index=int(idx[r]),
            arrival=arrival,
            prompt=prompt,
            output_len=out,
            max_tokens=p.max_tokens,
            **pre,
            attached=attached,
            computed=comp,
            target=target,
            generated=gen,
            queue_key=-neg if negative else int(idx[r]),
            run_key=int(rng.integers(0, 1000)),
            priority=int(rng.integers(L)),
            first_token=first,
            last_token=last,
            preemptions=int(rng.integers(0, 3)),
            recomputed=int(rng.integers(0, 500)),
            hit_tokens=int(rng.choice([0, pre["prefix_len"]])),
            xfer_done=np.float32(clock + rng.uniform(-0.05, 0.2)) if s in (3, 5) else 0.0,
            cpu_blocks=-(-comp // 16) if s in (3, 4, 5) else 0,
        )
        for k, v in rq_row.items():
            rq[k][r] = v
    # negative queue keys are a permutation of -1..-neg (most recent first)
    negs = rq["queue_key"] < 0
    rq["queue_key"][negs] = -1 - rng.permutation(int(negs.sum()))
    if rng.random() < 0.5:
        sg["last_access"] = (clock - rng.uniform(0.0, 3.0, G)).astype(np.float32)
        sg["priority"] = rng.integers(0, L, G).astype(np.int32)
    else:  # touched within one millisecond, in no particular row order: LRU decides
        ms = np.floor(float(clock) * 1e3 - 500.0) / 1e3
        sg["last_access"] = (ms + 5e-5 + rng.uniform(0.0, 8e-4, G)).astype(np.float32)
        sg["priority"] = np.full(G, (L - 1) // 2, np.int32)
    sg["pinned_until"] = np.where(
        rng.random(G) < 0.4, clock + rng.uniform(-1.0, 1.0, G), 0.0
    ).astype(np.float32)
    blocks = memory_blocks(rq, sg)["used"] + memory_blocks(rq, sg)["cached"]
    blocks += int(rng.choice([0, 1, 4, 16, 64]))
    dtype = int(p.kv_dtype)
    cpu_used = int(np.sum(np.where(rq["status"] > 0, rq["cpu_blocks"], 0)))
    p = p.replace(
        gpu_pool_tokens=-(-blocks * 16 // (1 + dtype)) + int(rng.integers(0, 8)),
        cpu_pool_tokens=(cpu_used + int(rng.integers(0, 200))) * 16 // (1 + dtype),
        max_num_seqs=int(rng.choice([4, 8, 12, 64])),
        max_batched_tokens=int(rng.choice([64, 256, 1024, 2048])),
        max_partial_prefills=int(rng.choice([1, 1, 2])),
        horizon=float(clock) + float(rng.choice([0.05, 2.0])),
    )
    st = st.replace(
        requests=type(q)(**{k: jnp.asarray(v, getattr(q, k).dtype) for k, v in rq.items()}),
        segments=type(st.segments)(
            **{
                k: jnp.asarray(sg[k], getattr(st.segments, k).dtype)
                for k in st.segments.__dataclass_fields__
            }
        ),
        clock=jnp.float32(clock),
        next_index=jnp.int32(n),
        next_arrival=jnp.float32(stream.arrival[n]),
        run_counter=jnp.int32(1000),
        preempt_counter=jnp.int32(neg + int(rng.integers(0, 3))),
        new_token_ratio=jnp.float32(rng.uniform(0.1, 0.7)),
        reserve_level=jnp.int32(rng.choice([0, 0, 1, 2, 3])),
        link_free=jnp.asarray(clock + rng.uniform(-1.0, 0.3, 2), jnp.float32),
    )
    return st, p


def memory_blocks(rq: dict, sg: dict) -> dict:
    """Block accounting of numpy tables, by docs/serving.md section 1 (independently of both
    engines): private blocks of requests on the GPU, resident segments' own blocks."""
    res = sg["valid"] & sg["on_gpu"]
    par = sg["parent"]
    base = np.where(par >= 0, sg["tokens"][np.clip(par, 0, None)], 0)
    cached = int(np.sum(np.where(res, (sg["tokens"] - base) // 16, 0)))
    att = rq["attached"]
    prefix = np.where(att >= 0, sg["tokens"][np.clip(att, 0, len(sg["tokens"]) - 1)], 0)
    on = np.isin(rq["status"], (RUNNING, OFFLOADING, LOADING))
    used = int(np.sum(np.where(on, -(-np.maximum(rq["computed"] - prefix, 0) // 16), 0)))
    return dict(used=used, cached=cached)


def tree_errors(st, pool: int) -> list[str]:
    """The segment tree's invariants on a (numpy, one scenario) state, checked independently of
    the reference: valid rows have distinct keys; a resident row's parent is resident and ends
    before it (so evictions and drops took leaves only); tokens are block multiples; requests
    on the GPU are attached to resident rows; free blocks are not negative."""
    sg = {k: np.asarray(getattr(st.segments, k)) for k in st.segments.__dataclass_fields__}
    rq = {k: np.asarray(getattr(st.requests, k)) for k in ("status", "attached", "computed")}
    errs = []
    keys = sg["key"][sg["valid"]]
    if len(set(keys.tolist())) != len(keys):
        errs.append(f"duplicate keys {sorted(keys.tolist())}")
    for g in np.flatnonzero(sg["valid"] & sg["on_gpu"]):
        par = int(sg["parent"][g])
        if sg["tokens"][g] % 16 or sg["tokens"][g] <= 0:
            errs.append(f"row {g}: tokens {sg['tokens'][g]}")
        if par >= 0 and not (
            sg["valid"][par] and sg["on_gpu"][par] and sg["tokens"][par] < sg["tokens"][g]
        ):
            errs.append(f"resident row {g} under row {par} (not resident or not shorter)")
    on = np.isin(rq["status"], (RUNNING, OFFLOADING, LOADING))
    for r in np.flatnonzero(on & (rq["attached"] >= 0)):
        g = int(rq["attached"][r])
        if not (g < len(sg["valid"]) and sg["valid"][g] and sg["on_gpu"][g]):
            errs.append(f"request {r} attached to row {g}, not resident")
    mem = memory_blocks(rq, sg)
    if mem["used"] + mem["cached"] > pool:
        errs.append(f"free blocks negative: {pool - mem['used'] - mem['cached']}")
    return errs


def test_parity_inserts_when_rows_run_out():
    """Five running requests pass the ends of five keys no row holds, in a 4-row table whose
    row 0 is resident and pinned and rows 1-3 never used: by docs/serving.md section 3 the
    three lowest requests insert into rows 1-3, the other two find no row, row 0 stays."""
    env, base, _ = scenarios(CASES["tight"])
    cfg, p = env.config, base[0]
    requests = [
        dict(
            status=RUNNING,
            index=i,
            prompt=200,
            output_len=50,
            max_tokens=128,
            segment=101 + i,
            prefix_len=48,
            computed=150,
            run_key=i,
        )
        for i in range(5)
    ]
    segments = [dict(key=100, tokens=64, on_gpu=True, pinned_until=10.0, last_access=0.5)]
    st = build_state(p, cfg, requests=requests, segments=segments, clock=1.0)
    ref = ref_mod.ReferenceEngine.from_state(st, p, cfg)
    ref.iterate()
    assert ref.events["fresh_rows"] == 3 and ref.events["no_row"] == 2
    assert [s.key for s in ref.segments] == [100, 101, 102, 103]
    got = jax.jit(serve_engine.iterate, static_argnums=2)(st, p, cfg)
    errs = ref_mod.diff(ref.snapshot(), ref_mod.snapshot_of_state(got, cfg), rtol=RTOL)
    assert not errs, errs[:6]


@pytest.mark.parametrize("batches", [8, pytest.param(96, marks=pytest.mark.slow)])
def test_parity_crafted_states(batches):
    """Random consistent mid-episode states (every status, little free memory, pinned and
    evictable segments, transfers ending, batch limits varied), a few steps each; batches of
    the `tight` case's size, so its compile is reused (96 states, or 1,152 when slow)."""
    env, base, names = scenarios(CASES["tight"])
    cfg, m = env.config, len(base)
    vreset, vstep = compiled(env)
    rng = np.random.default_rng(1)
    stack = lambda trees: jax.tree_util.tree_map(  # noqa: E731
        lambda *xs: jnp.asarray(np.stack(xs)), *trees
    )
    pick = lambda tree, i: jax.tree_util.tree_map(lambda x: x[i], tree)  # noqa: E731
    refs_all = []
    for batch_index in range(batches):
        keys = jax.random.split(jax.random.PRNGKey(100 + batch_index), m)
        host = jax.device_get(vreset(keys, stack(base))[1])
        built, plist, refs = [], [], []
        for i in range(m):
            stream = ref_mod.Stream(host.seed[i], base[i], cfg, 256)
            st, p = crafted(rng, pick(host, i), base[i], cfg, stream)
            built.append(st)
            plist.append(p)
            refs.append(ref_mod.ReferenceEngine.from_state(st, p, cfg, stream))
            errs = ref_mod.diff(refs[i].snapshot(), ref_mod.snapshot_of_state(st, cfg))
            errs += tree_errors(st, refs[i].pool())
            assert not errs, errs[:4]
        states, params = stack(built), stack(plist)
        for _ in range(4):
            acts = [random_action(rng, refs[i], 0.7) for i in range(m)]
            batch = {k: jnp.asarray(np.stack([a[k] for a in acts])) for k in acts[0]}
            _, states, _, _, _, _ = vstep(keys, states, batch, params)
            host = jax.device_get(states)
            for i in range(m):
                refs[i].step(acts[i])
                errs = ref_mod.diff(
                    refs[i].snapshot(), ref_mod.snapshot_of_state(pick(host, i), cfg), rtol=RTOL
                )
                errs += tree_errors(pick(host, i), refs[i].pool())
                if errs:
                    pytest.fail(
                        f"crafted batch {batch_index} scenario {i} ({names[i]}) step "
                        f"{refs[i].steps}: " + "; ".join(errs[:8])
                    )
        refs_all += refs
    refs = refs_all
    eng = lambda e: lambda r: r.p.engine == ENGINES.index(e)  # noqa: E731
    assert total(refs, "preempted", eng("vllm")) > 0
    assert total(refs, "sglang_retracts", eng("sglang")) > 0
    assert total(refs, "trt_blocked", eng("trt")) > 0
    assert total(refs, "evictions") > 0 and total(refs, "hits") > 0
    assert total(refs, "loads_done") > 0 and total(refs, "offloads_done") > 0
    assert total(refs, "timeouts") > 0 and total(refs, "inserts") > 0
    # The keyed segment tree: hits through the fallback key, inserts of published keys, rows
    # found for inserts in each way (the key's own row, a row never used, a stale row of
    # another key, an evictable leaf replaced), evictions of leaves below a resident parent
    # while unreferenced non-leaves stayed (tree_errors held on every JAX state), and drops
    # of leaves done and of non-leaves refused.
    assert total(refs, "fallback_hits") > 0 and total(refs, "publish_inserts") > 0
    assert total(refs, "reinserts") > 0 and total(refs, "fresh_rows") > 0
    assert total(refs, "stale_rows") > 0 and total(refs, "replacements") > 0
    assert total(refs, "deep_evictions") > 0 and total(refs, "nonleaf_spared") > 0
    assert total(refs, "drops") > 0 and total(refs, "drop_nonleaf_refused") > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_CASES))
def test_parity_more_cases(name):
    refs, names, steps, _ = run_case(name)
    assert steps >= 600
    assert total(refs, "preempted") > 0 and total(refs, "hits") > 0
    assert total(refs, "loads_done") > 0 and total(refs, "completions") > 0
    if name.startswith("agentic"):
        assert_agentic(refs)


def test_parity_agentic_wake_and_continue():
    """One iteration of a hand-built agentic state, against docs/serving.md sections 3 and 7:
    two TOOL rows whose calls have arrived wake with queue_key = the stream pointer (5) and,
    like stream request 5 arriving in the same iteration, queue behind request 4, ties by row;
    a TOOL row not yet due stays; three calls complete - one continues as a TOOL row (fields
    by the docs), one was its session's last call and one's next prompt does not fit (rows
    freed)."""
    from kvjax.serve.types import TOOL, WAITING

    env, plist, _ = scenarios(dict(AGENTIC, engines=("vllm",), loads=(1.0,)))
    cfg, p = env.config, plist[0]
    stream = ref_mod.Stream(np.array([7, 9], np.uint32), p, cfg, 256)
    turns = [stream.session_turns(i) for i in range(256)]
    many = [i for i in range(6, 256) if turns[i] >= 3][:2]  # sessions with calls left
    last = next(i for i in range(6, 256) if turns[i] == 2)  # its call 1 is the last
    cap = int(p.max_model_len) - int(p.max_tokens)
    t0 = float(stream.arrival_of(5)) + 1e-4 - 1.0  # the clock is t0 + 1, request 5 has arrived

    def finishing(index, turn, prompt, row_key):
        out = stream.call(index, turn)["output_len"]
        return dict(
            status=RUNNING,
            index=index,
            turn=turn,
            arrival=t0 + 0.2,
            prompt=prompt,
            output_len=out,
            max_tokens=int(p.max_tokens),
            segment=0,
            prefix_len=1024,
            publish=cfg.max_segments + 64 * index + turn,
            publish_len=(prompt + out - 1) // 16 * 16,
            computed=prompt + out - 2,
            target=prompt,
            generated=out - 1,
            first_token=t0 + 0.5,
            last_token=t0 + 0.9,
            run_key=row_key,
        )

    tool = dict(status=TOOL, turn=1, prompt=3000, output_len=40, max_tokens=int(p.max_tokens))
    requests = [
        dict(tool, index=3, arrival=t0 + 0.9, queue_key=0),
        dict(tool, index=1, arrival=t0 + 0.95, queue_key=0),
        dict(status=WAITING, index=4, arrival=t0 + 0.8, prompt=2000, output_len=30),
        dict(tool, index=2, arrival=t0 + 2.0, queue_key=0),
        finishing(many[0], 1, 3000, 0),
        finishing(last, 1, 2500, 1),
        finishing(many[1], 0, cap - 100, 2),  # + output + new tokens > cap: context full
    ]
    st = build_state(
        p,
        cfg,
        requests=requests,
        clock=t0 + 1.0,
        next_arrival=stream.arrival_of(5),
        seed=(7, 9),
        next_index=5,
    )
    ref = ref_mod.ReferenceEngine.from_state(st, p, cfg, stream)
    ref.arrivals()
    assert ref.events["wakes"] == 2 and ref.metrics["arrived"] == 3
    assert ref.waiting[:4] == [2, 0, 1, 7] and ref.rows[3].status == TOOL
    ref = ref_mod.ReferenceEngine.from_state(st, p, cfg, stream)
    ref.iterate()
    assert ref.events["continuations"] == 1 and ref.events["ended_turns"] == 1
    assert ref.events["ended_context"] == 1
    r = ref.rows[4]
    assert r.status == TOOL and r.turn == 2 and ref.rows[5] is None and ref.rows[6] is None
    after = stream.call(many[0], 1)
    prompt = 3000 + requests[4]["output_len"] + after["new_tokens"]
    assert r.prompt == prompt and r.output_len == stream.call(many[0], 2)["output_len"]
    assert r.segment == cfg.max_segments + 64 * many[0] + 1
    assert r.prefix_len == requests[4]["publish_len"]
    assert r.segment_up == stream.request(many[0])["segment"]
    assert r.publish == cfg.max_segments + 64 * many[0] + 2
    assert r.publish_len == (prompt + r.output_len - 1) // 16 * 16
    assert r.arrival == np.float32(ref.clock + after["tool_gap"])
    got = jax.jit(serve_engine.iterate, static_argnums=2)(st, p, cfg)
    errs = ref_mod.diff(ref.snapshot(), ref_mod.snapshot_of_state(got, cfg), rtol=RTOL)
    assert not errs, errs[:6]
