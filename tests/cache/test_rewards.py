"""kvjax.cache.rewards: the rubric (moved from test_env.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import kvjax
from kvjax.cache import rewards

ENV, PARAMS = kvjax.make("kv-cache-v0", difficulty="all")
CFG = ENV.config
A, T = CFG.max_actions, CFG.episode_len
KEY = jax.random.PRNGKey(0)
reset = jax.jit(ENV.reset_env)


def test_rubric_is_zero_before_the_first_step():
    _, s = reset(KEY, PARAMS)
    rub = kvjax.rubric(s, PARAMS)
    assert all(float(v) == 0.0 for k, v in rub.items() if k in rewards.COMPONENTS)
    assert float(rub["total"]) == 0.0


def test_failure_penalty_matches_the_seed_formula():
    _, s = reset(KEY, PARAMS)
    for f, expected in [(1, -0.15), (2, -0.30), (3, -0.55), (5, -1.0)]:
        s = s.replace(counters=s.counters.replace(failures=jnp.int32(f)))
        assert float(kvjax.rubric(s, PARAMS)["failure_penalty"]) == pytest.approx(expected)
