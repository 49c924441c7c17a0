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
    "toy": dict(config=None, loads=(0.5, 1.5), max_steps=200,
                params=dict(horizon=12.0)),
    # A small engine under memory pressure: 16 rows, a 512-block pool, a small CPU tier and a
    # short client timeout, so preemption, prefix hits and evictions, timeouts, arrivals held
    # behind a full table and offload / load round trips all happen.
    "tight": dict(config=dict(max_requests=16, max_segments=4, finished_log=64), loads=(0.7, 3.0),
                  max_steps=260,
                  params=dict(horizon=10.0, gpu_pool_tokens=8192, cpu_pool_tokens=6144,
                              max_num_seqs=12, max_batched_tokens=1024, max_tokens=128,
                              max_model_len=4096, num_prefixes=3, prefix_share=0.7,
                              client_timeout=3.0, pin_ttl=1.0)),
}


def scenarios(case: dict):
    envs, plist, names = [], [], []
    for engine, dtype, load in itertools.product(ENGINES, KV_DTYPES, case["loads"]):
        env, p = kvjax.make("kv-serve-v0", preset="toy", engine=engine, kv_dtype=dtype,
                            load=load, config=case["config"], **case["params"])
        envs.append(env)
        plist.append(p)
        names.append(f"{engine}/{dtype}/load={load}")
    return envs[0], plist, names


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
    case = CASES[name]
    env, plist, names = scenarios(case)
    cfg = env.config
    n = len(plist)
    params = jax.tree_util.tree_map(lambda *xs: jnp.asarray(np.stack(xs)), *plist)
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    _, states = jax.jit(jax.vmap(env.reset_env))(keys, params)
    vstep = jax.jit(jax.vmap(env.step_env))
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
            errs = ref_mod.diff(refs[i].snapshot(), ref_mod.snapshot_of_state(pick(host, i), cfg),
                                rtol=RTOL)
            if not np.isclose(reward, rewards[i], rtol=RTOL, atol=1e-6):
                errs.append(f"reward: ref {reward} jax {rewards[i]}")
            if errs:
                pytest.fail(f"{name} {names[i]} step {refs[i].steps}: " + "; ".join(errs[:8]))
        steps += n
        if np.all(host.clock >= horizon):
            break
    assert np.all(host.clock >= horizon), "episodes did not reach the horizon"
    return refs, names, steps


def total(refs, key, which=None):
    return sum(r.events[key] if key in r.events else r.metrics[key]
               for r in refs if which is None or which(r))


def test_parity_toy_preset():
    refs, names, steps = run_case("toy")
    assert steps >= 700
    assert total(refs, "completions") > 500
    assert total(refs, "hits") > 0 and total(refs, "inserts") > 0
    assert total(refs, "offloads_done") > 0 and total(refs, "loads_done") > 0
    assert total(refs, "agent_preemptions") > 0 and total(refs, "invalid_commands") > 0
    assert total(refs, "partial_admits") > 0


def test_parity_tight_memory():
    refs, names, steps = run_case("tight")
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
