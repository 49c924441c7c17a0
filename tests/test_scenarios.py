"""kvjax.scenarios: tiers, budgets, regimes and the initial cache (moved from test_env.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import dynamics, scenarios

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
