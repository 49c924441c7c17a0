"""The batch-trailing layout (kvjax.cache.dynamics, kvjax.cache.rollout.episodes_trailing): the
same step and policies called on [S, batch] states give what vmap gives on [batch, S] states."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trees import assert_trees_equal

import kvjax
from kvjax.cache import dynamics
from kvjax.cache.policies import POLICY_NAMES, make_policy
from kvjax.cache.rollout import to_trailing
from kvjax.rollout import normalize_params, rollout

ENV, PARAMS = kvjax.make("kv-cache-v0", difficulty="all")
CFG = ENV.config
P = normalize_params(PARAMS)
POLYMORPHIC = [n for n in POLICY_NAMES if getattr(make_policy(n, ENV), "batch_polymorphic", False)]


def from_trailing(tree):
    return jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, -1, 0), tree)


def assert_trees_match(lead, trail):
    """Integers and bools exactly; floats to float32 rounding (sums may associate differently)."""
    assert_trees_equal(lead, trail, rtol=1e-6, atol=1e-5)


@pytest.fixture(scope="module")
def trajectory():
    """States along random-action episodes of every tier, with the actions taken (valid,
    invalid, out-of-range and negative ids), batch-leading."""
    n = 96
    keys = jax.random.split(jax.random.PRNGKey(11), n)
    _, state = jax.jit(jax.vmap(ENV.reset_env, in_axes=(0, None)))(keys, P)
    step = jax.jit(jax.vmap(lambda s, a: dynamics.step_dynamics(s, a, P, CFG)))
    out = []
    for t in range(6):
        hi = 1 + 3 * CFG.max_seqs
        act = jax.random.randint(jax.random.fold_in(jax.random.PRNGKey(5), t),
                                 (n, CFG.max_actions), -3, hi + 3).astype(jnp.int32)
        out.append((state, act))
        state = step(state, act)
    return out


def test_step_on_trailing_states_equals_vmapped_step(trajectory):
    lead = jax.jit(jax.vmap(lambda s, a: dynamics.step_dynamics(s, a, P, CFG)))
    trail = jax.jit(lambda s, a: dynamics.step_dynamics(s, a, P, CFG))
    preempted = 0
    for state, act in trajectory:
        want = lead(state, act)
        got = from_trailing(trail(to_trailing(state), act.T))
        assert_trees_match(want, got)
        preempted += int(jnp.sum(want.counters.preemptions - state.counters.preemptions))
    assert preempted > 0  # the preemption loop was exercised


def test_step_env_on_trailing_states_equals_vmapped_step_env(trajectory):
    """The one public step: a batch-trailing state gets step_env's action check, dynamics,
    reward, truncation and info, equal to vmap(step_env) scenario by scenario."""
    lead = jax.jit(jax.vmap(ENV.step_env, in_axes=(None, 0, 0, None)))
    trail = jax.jit(ENV.step_env)
    key = jax.random.PRNGKey(0)
    for state, act in trajectory:
        obs, nxt, reward, term, trunc, info = trail(key, to_trailing(state), act.T, P)
        w_obs, w_nxt, w_reward, w_term, w_trunc, w_info = lead(key, state, act, P)
        assert_trees_match(w_nxt, from_trailing(nxt))
        assert_trees_match((w_obs, w_reward, w_info), (obs, reward, info))
        np.testing.assert_array_equal(term, w_term)
        np.testing.assert_array_equal(trunc, w_trunc)
        assert reward.shape == trunc.shape == term.shape == (act.shape[0],)
    assert int(jnp.sum(info["invalid_actions"])) > 0  # out-of-range ids counted, not applied
    with pytest.raises(ValueError, match=r"action must have shape \(3, 96\)"):
        trail(key, to_trailing(state), act, P)
    with pytest.raises(ValueError, match="env.step takes one scenario"):
        ENV.step(key, to_trailing(state), act.T, P)


@pytest.mark.parametrize("name", POLYMORPHIC)
def test_policies_on_trailing_states_equal_vmapped(name, trajectory):
    policy = make_policy(name, ENV)
    lead = jax.jit(jax.vmap(lambda s: policy(None, s, P)))
    trail = jax.jit(lambda s: policy(None, s, P))
    acted = 0
    for state, _ in trajectory:
        want = lead(state)
        np.testing.assert_array_equal(np.asarray(trail(to_trailing(state))).T, want)
        acted += int(jnp.sum(want != 0))
    assert name == "keep" or acted > 0


def test_value_aware_and_lru_swap_are_marked_and_random_is_not():
    assert {"keep", "value_aware", "lru_swap", "largest_first"} <= set(POLYMORPHIC)
    assert "random" not in POLYMORPHIC and "oracle" not in POLYMORPHIC


def test_rollout_fast_path_equals_vmap_path():
    policy = make_policy("value_aware", ENV)
    plain = functools.wraps(policy)(lambda k, s, p: policy(k, s, p))
    plain.batch_polymorphic = False  # same maths through the vmapped path
    kw = dict(progress=False, return_trajectory=True, micro_batch=16)
    fast = rollout(policy, jax.random.PRNGKey(2), 32, PARAMS, ENV, **kw)
    slow = rollout(plain, jax.random.PRNGKey(2), 32, PARAMS, ENV, **kw)
    np.testing.assert_array_equal(fast["trajectory"]["action"], slow["trajectory"]["action"])
    assert np.any(fast["trajectory"]["action"] != 0)
    for k, v in slow.items():
        if k == "trajectory":
            continue
        np.testing.assert_allclose(fast[k], v, rtol=1e-5, atol=1e-5, err_msg=k)
