"""kvjax.cache.scenarios: tiers, budgets, regimes and the initial cache (moved from test_env.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.cache import dynamics, scenarios

ENV, PARAMS = kvjax.make("kv-cache-v0", difficulty="all")
CFG = ENV.config
A, T = CFG.max_actions, CFG.episode_len
KEY = jax.random.PRNGKey(0)
vreset = jax.jit(jax.vmap(ENV.reset_env, in_axes=(0, None)))


def keep() -> jnp.ndarray:
    return jnp.zeros((A,), jnp.int32)


def test_usage_is_not_clamped_at_reset():
    _, s = vreset(jax.random.split(KEY, 512), PARAMS.replace(difficulty=2))
    u = jax.vmap(scenarios.usage, in_axes=(0, None))(s, PARAMS)
    assert float(u.max()) > 1.0  # hard scenarios can start above their budget
    assert np.allclose(np.asarray(u), np.asarray(s.usage_peak))


def test_keep_only_fails_more_on_hard_than_easy():
    def episode(key, params):
        _, s = ENV.reset_env(key, params)
        s = jax.lax.fori_loop(0, T, lambda t, s: dynamics.step_dynamics(s, keep(), params, CFG), s)
        return s.counters.failures

    run = jax.jit(jax.vmap(episode, in_axes=(0, None)))
    keys = jax.random.split(jax.random.PRNGKey(1), 1024)
    easy = np.asarray(run(keys, PARAMS.replace(difficulty=0)))
    hard = np.asarray(run(keys, PARAMS.replace(difficulty=2)))
    assert hard.mean() > easy.mean() + 3 * np.sqrt(hard.var() / 1024 + easy.var() / 1024)


def test_tiers_draw_their_documented_budgets():
    for tier, (lo, hi) in enumerate(zip(scenarios.BUDGET_LO, scenarios.BUDGET_HI, strict=True)):
        _, s = vreset(jax.random.split(KEY, 256), PARAMS.replace(difficulty=tier))
        b = np.asarray(s.memory_budget)
        assert b.min() >= lo - 1e-6 and b.max() <= hi + 1e-6
        assert np.all(np.asarray(s.tier) == tier)
        assert set(np.unique(np.asarray(s.regime)).tolist()) == set(scenarios.TIER_REGIMES[tier])
    _, s = vreset(jax.random.split(KEY, 256), PARAMS)  # "all" mixes tiers per scenario
    assert set(np.unique(np.asarray(s.tier)).tolist()) == {0, 1, 2}


def test_reset_draws_no_schedule_and_the_step_draws_the_same_rows():
    """A generated scenario holds an empty [T, 0] arrival table and its seed; row t + 1 of its
    draws (`arrival_row`, the bursty chain recomputed from the seed) is row t of `schedule`,
    and row 0 is the queue at reset."""
    keys = jax.random.split(jax.random.PRNGKey(3), 256)
    _, s = vreset(keys, PARAMS.replace(difficulty=2))  # high and bursty regimes
    assert s.arrivals.valid.shape == (256, T, 0) and s.seed.dtype == jnp.uint32
    sched = jax.vmap(lambda sd, r: scenarios.schedule(sd, r, PARAMS, CFG))(s.seed, s.regime)
    K = CFG.max_arrivals
    for t in range(-1, T):
        row = jax.vmap(lambda sd, r, t=t: scenarios.arrival_row(sd, t + 1, r, PARAMS, CFG))(
            s.seed, s.regime
        )
        want = (jax.tree_util.tree_map(lambda x: x[:, :K], s.pending) if t < 0
                else jax.tree_util.tree_map(lambda x, t=t: x[:, t], sched))
        for a, b in zip(jax.tree_util.tree_leaves(row), jax.tree_util.tree_leaves(want),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bursts = jax.vmap(lambda sd: jax.vmap(lambda r: scenarios.burst_state(sd, r, CFG))(
        jnp.arange(T + 1)))(s.seed)
    assert bool(bursts.any()) and not bool(bursts[:, 0].any())  # starts calm, then switches


def test_generated_and_tabled_scenarios_step_identically():
    """Drawing arrivals when they arrive (generated form) and reading them from the drawn
    table (`with_schedule`, the form `build` and the reference use) give the same episodes."""
    keys = jax.random.split(jax.random.PRNGKey(4), 128)
    params = PARAMS.replace(arrival_scale=1.5)
    _, lazy = vreset(keys, params)
    table = jax.vmap(lambda s: scenarios.with_schedule(s, params, CFG))(lazy)
    assert table.arrivals.valid.shape == (128, T, CFG.max_arrivals)
    step = jax.jit(jax.vmap(lambda s, a: dynamics.step_dynamics(s, a, params, CFG)))
    rng = np.random.default_rng(0)
    for _ in range(T + 1):  # one step past the end: nothing arrives in either form
        act = jnp.asarray(rng.integers(0, CFG.num_action_ids, (128, A)), jnp.int32)
        lazy, table = step(lazy, act), step(table, act)
        for name in ("slots", "pending", "counters", "time", "usage_peak"):
            for a, b in zip(jax.tree_util.tree_leaves(getattr(lazy, name)),
                            jax.tree_util.tree_leaves(getattr(table, name)), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(lazy.counters.queue_overflows.sum() + lazy.counters.queue_timeouts.sum()) > 0


def test_scenarios_are_bit_reproducible_from_their_key():
    """Exact contents of 64 scenarios (initial cache, queue, whole schedule) for a fixed key:
    the same numbers as the generator that drew the whole schedule at reset (before arrivals
    were drawn lazily), so every episode, leaderboard entry and checkpoint score is unchanged."""
    keys = jax.random.split(jax.random.PRNGKey(2026), 64)
    _, s = vreset(keys, PARAMS)
    sched = jax.vmap(lambda sd, r: scenarios.schedule(sd, r, PARAMS, CFG))(s.seed, s.regime)
    got = [int(s.slots.tokens.sum()), int(s.pending.tokens.sum()), int(sched.tokens.sum()),
           int(sched.valid.sum()), int(sched.output_len.sum()), int(sched.priority.sum())]
    assert got == [3038123, 150212, 2528056, 1072, 77208, 32894]
    assert np.asarray(s.seed[0]).tolist() == [2757606701, 116249525]
