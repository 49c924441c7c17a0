"""Parity of kv-serve-v0's JAX step (`env.step_env`: actions.apply + engine.run) with the plain
Python oracle `kvjax/serve/reference.py`, on whole episodes.

Each case is one ServeConfig (one compile of the vmapped step) and a batch of scenarios: the
three engines x both KV dtypes x light and overloaded loads, under random actions (random
priorities, including out-of-range ones; command ids that are random, out of range, or aimed
at running requests and cached segments: offloads that complete and load back, preemptions,
pins, drops, reserve levels). After every step the request table (fields of occupied rows,
the waiting and running orders), the segment table, the clock and engine scalars, the metrics
and the finished-request log must agree: integers exactly, times within rtol 1e-5. What the
episodes went through (preemptions, retractions, TRT stalls, prefix hits, evictions, segment
inserts, client timeouts, offloads and loads) is asserted, so parity cannot become vacuous.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.serve import reference as ref_mod
from kvjax.serve.types import ENGINES, KV_DTYPES, RUNNING

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

# Longer (marked slow): another workload, other engine knobs and config shapes, more segments.
SLOW_CASES = {
    "code": dict(
        CASES["tight"],
        seed=5,
        params=dict(CASES["tight"]["params"], workload_name="synthetic-code"),
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
    "prefixes": dict(
        config=dict(reserve_levels=(0.0, 0.3)),
        loads=(1.0, 4.0),
        max_steps=300,
        params=dict(horizon=8.0, num_prefixes=8, prefix_share=0.9, gpu_pool_tokens=40000),
    ),
}


def scenarios(case: dict):
    envs, plist, names = [], [], []
    for engine, dtype, load in itertools.product(ENGINES, KV_DTYPES, case["loads"]):
        env, p = kvjax.make(
            "kv-serve-v0",
            preset="toy",
            engine=engine,
            kv_dtype=dtype,
            load=load,
            config=case["config"],
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


# -- crafted states ----------------------------------------------------------------------------
def crafted(rng: np.random.Generator, st, p, cfg, stream: ref_mod.Stream):
    """A random but consistent mid-episode state (numpy, one scenario) and its params: every
    status, prefills and decodes, attached and unattached prefixes, cached / pinned / evictable
    segments, transfers about to end, preempted requests in the queue, a pool with little
    slack and varied batch limits."""
    S, G, L = cfg.max_requests, cfg.max_segments, cfg.priority_levels
    plen = (p.prefix_tokens // 16) * 16
    n = int(rng.integers(S + 4, 60))
    stream.ensure(n + 1)
    clock = np.float32(stream.arrival[n] - rng.uniform(0.0, 0.3))
    q = st.requests
    rq = {k: np.array(getattr(q, k)) for k in vars(q) if not k.startswith("_")}
    seg_on = np.zeros(G, bool)
    status = rng.choice(6, S, p=[0.12, 0.3, 0.3, 0.08, 0.1, 0.1])
    idx = rng.permutation(n)[:S]
    neg = 0
    for r in range(S):
        s = int(status[r])
        prompt = int(rng.integers(1, 2500))
        out = int(rng.integers(1, p.max_tokens + 1))
        has = prompt > plen and rng.random() < 0.6
        g0 = 0 if (out == 1 or rng.random() < 0.6) else int(rng.integers(1, out))
        target, gen, comp = prompt + g0, g0, 0
        if s in (2, 3, 4, 5):  # running, offloading, swapped, loading: some KV computed
            if gen + 1 < out and rng.random() < 0.5:  # decoding
                gen = int(rng.integers(g0 + 1, out))
                comp = target + gen - g0 - 1
            else:
                comp = int(rng.integers(1, target)) if target > 1 else 1
        seg = int(rng.integers(p.num_prefixes)) if has else -1
        attached = bool(has and s in (2, 3) and comp >= plen and rng.random() < 0.6)
        if attached:
            seg_on[seg] = True
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
            segment=seg,
            prefix_len=plen if has else 0,
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
            hit_tokens=int(rng.choice([0, plen])),
            xfer_done=np.float32(clock + rng.uniform(-0.05, 0.2)) if s in (3, 5) else 0.0,
            cpu_blocks=-(-comp // 16) if s in (3, 4, 5) else 0,
        )
        for k, v in rq_row.items():
            rq[k][r] = v
    # negative queue keys are a permutation of -1..-neg (most recent first)
    negs = rq["queue_key"] < 0
    rq["queue_key"][negs] = -1 - rng.permutation(int(negs.sum()))
    sg = {k: np.array(getattr(st.segments, k)) for k in vars(st.segments) if not k.startswith("_")}
    sg["on_gpu"] = sg["valid"] & (seg_on | (rng.random(G) < 0.6))
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
    on = np.isin(rq["status"], (2, 3, 5))
    own = rq["computed"] - np.where(rq["attached"], rq["prefix_len"], 0)
    used = int(np.sum(np.where(on, -(-own // 16), 0)))
    cached = int(np.sum(np.where(sg["on_gpu"], sg["tokens"] // 16, 0)))
    blocks = used + cached + int(rng.choice([0, 1, 4, 16, 64]))
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
            **{k: jnp.asarray(v, getattr(st.segments, k).dtype) for k, v in sg.items()}
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
            stream = ref_mod.Stream(host.seed[i], base[i], 256)
            st, p = crafted(rng, pick(host, i), base[i], cfg, stream)
            built.append(st)
            plist.append(p)
            refs.append(ref_mod.ReferenceEngine.from_state(st, p, cfg, stream))
            errs = ref_mod.diff(refs[i].snapshot(), ref_mod.snapshot_of_state(st, cfg))
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


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_CASES))
def test_parity_more_cases(name):
    refs, names, steps, _ = run_case(name)
    assert steps >= 600
    assert total(refs, "preempted") > 0 and total(refs, "hits") > 0
    assert total(refs, "loads_done") > 0 and total(refs, "completions") > 0
