"""kvjax.bench's standard path: the program a gymnax / PureJaxRL user writes, for kv-cache-v0 and
gymnax's Asterix-MinAtar (no timings are asserted: speed is reported by `kvjax bench` only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import bench as harness_bench
from kvjax.cache import bench


def test_standard_path_program_equals_a_hand_written_loop():
    """Same keys, same sampled actions, auto-reset across an episode end: the scanned program's
    per-scenario sum of rewards and observations equals a Python loop over vmap(env.step)."""
    env, params = kvjax.make("kv-cache-v0", difficulty="hard")
    n, steps = 4, env.config.episode_len + 3
    got = np.asarray(bench.standard_path_program(env, params, n, steps)(jax.random.PRNGKey(5)))
    space = env.action_space(params)
    k_reset, key = jax.random.split(jax.random.PRNGKey(5))
    _, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, n), params)
    step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
    acc = np.zeros(n, np.float64)
    for _ in range(steps):
        key, k_act, k_step = jax.random.split(key, 3)
        action = jax.vmap(space.sample)(jax.random.split(k_act, n))
        obs, state, reward, _, trunc, _ = step(jax.random.split(k_step, n), state, action, params)
        acc += np.asarray(reward) + sum(
            np.asarray(x, np.float64).reshape(n, -1).sum(axis=1)
            for x in jax.tree_util.tree_leaves(obs)
        )
    np.testing.assert_allclose(got, acc, rtol=1e-5)
    assert int(jnp.min(state.time)) == 3  # every scenario was reset once, on step 15


def test_standard_path_rows_compare_with_asterix_in_the_same_run():
    pytest.importorskip("gymnax")
    rows = bench.time_standard_path([2], repeats=1, steps=2, progress=False)
    assert [r["env"] for r in rows] == ["kv-cache-v0", "gymnax Asterix-MinAtar"]
    kv, ast = rows
    assert kv["x_gymnax"] == pytest.approx(ast["median_s"] / kv["median_s"])
    assert ast["x_gymnax"] == pytest.approx(1.0)
    assert kv["steps_per_s"] == pytest.approx(2 * 2 / kv["median_s"])


def test_ab_medians_alternates_the_candidates_and_reports_each():
    calls = []

    def make(name):
        def fn():
            calls.append(name)
            return jnp.zeros(())

        return fn

    out = harness_bench.ab_medians({"a": make("a"), "b": make("b")}, repeats=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then alternating
    assert set(out) == {"a", "b"} and out["a"]["x_first"] == 1.0
    assert all(0 < r["min_s"] <= r["median_s"] for r in out.values())
