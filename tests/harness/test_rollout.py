"""Rollout engine: equals a step-by-step loop, independent of chunk size and device count."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import kvjax
from kvjax.cache.policies import make_policy
from kvjax.cache.rewards import rubric
from kvjax.rollout import normalize_params, rollout, scenario_keys, summarize_results

ENV, PARAMS = kvjax.make("kv-cache-v0", difficulty="hard")
POLICY = make_policy("random", ENV)  # uses its key, so key derivation is exercised too
N = 16


@pytest.fixture(scope="module")
def batched():
    return rollout(POLICY, jax.random.PRNGKey(3), N, PARAMS, ENV, return_trajectory=True,
                   progress=False, micro_batch=4)  # one call of 4 micro-batches


def test_rollout_equals_step_by_step_loop(batched):
    key = jax.random.PRNGKey(3)
    params = normalize_params(PARAMS)
    k_reset, k_policy = jax.vmap(scenario_keys, in_axes=(None, 0))(key, np.arange(N))
    reset = jax.jit(jax.vmap(ENV.reset_env, in_axes=(0, None)))
    act = jax.jit(jax.vmap(POLICY, in_axes=(0, 0, None)))
    step = jax.jit(jax.vmap(ENV.step_env, in_axes=(0, 0, 0, None)))
    _, state = reset(k_reset, params)
    actions, rewards = [], []
    for t in range(ENV.config.episode_len):
        keys_t = jax.vmap(jax.random.fold_in, in_axes=(0, None))(k_policy, t)
        a = act(keys_t, state, params)
        _, state, r, _, truncated, _ = step(k_policy, state, a, params)
        actions.append(np.asarray(a))
        rewards.append(np.asarray(r))
    assert bool(np.all(truncated))
    final = jax.device_get(jax.vmap(rubric, in_axes=(0, None))(state, params))
    # Integer counters and actions agree exactly; float accumulators to float32 rounding (XLA
    # may fuse the scanned program's sums in another order than the stepwise one).
    for k, v in final.items():
        np.testing.assert_allclose(batched[k], v, rtol=1e-6, atol=1e-6, err_msg=k)
    np.testing.assert_array_equal(batched["total_failures_metric"], final["total_failures_metric"])
    traj = batched["trajectory"]
    np.testing.assert_array_equal(traj["action"], np.stack(actions, axis=1))
    np.testing.assert_allclose(traj["reward"], np.stack(rewards, axis=1), atol=1e-6)
    # the episode's return is its final rubric total
    np.testing.assert_allclose(traj["reward"].sum(axis=1), batched["total"], atol=1e-5)
    assert np.any(traj["action"] != 0) and batched["total"].shape == (N,)


def test_results_do_not_depend_on_chunk_size(batched):
    chunked = rollout(POLICY, jax.random.PRNGKey(3), 14, PARAMS, ENV, chunk_size=8,
                      micro_batch=4, progress=False)  # two calls of 2 micro-batches, padded
    assert chunked["total"].shape == (14,)
    for k, v in chunked.items():
        np.testing.assert_array_equal(v, batched[k][:14], err_msg=k)


@pytest.mark.slow
def test_sharded_equals_unsharded_on_four_devices(tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(textwrap.dedent("""
        import jax, numpy as np, kvjax
        from jax.sharding import Mesh
        from kvjax.cache.policies import make_policy
        from kvjax.rollout import rollout, default_mesh
        assert len(jax.devices()) == 4, jax.devices()
        env, params = kvjax.make("kv-cache-v0", difficulty="hard")
        assert default_mesh().devices.size == 4
        key = jax.random.PRNGKey(11)
        # keep at 512: two micro-batches of 256, so 4 devices would each run one - the case
        # that differed in the last bit before every device got at least two (issue 15).
        for name, n in (("random", 10), ("keep", 512), ("value_aware", 300)):
            pol = make_policy(name, env)
            sharded = rollout(pol, key, n, params, env, progress=False)
            single = rollout(pol, key, n, params, env, progress=False,
                             mesh=Mesh(np.array(jax.devices()[:1]), ("batch",)))
            for k in single:
                np.testing.assert_array_equal(sharded[k], single[k], err_msg=f"{name} {k}")
        print("OK", float(np.mean(sharded["total"])))
    """))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK")


def test_bad_arguments_and_summary(batched):
    with pytest.raises(ValueError, match="num_scenarios"):
        rollout(POLICY, jax.random.PRNGKey(0), 0, PARAMS, ENV)
    with pytest.raises(ValueError, match="chunk_size"):
        rollout(POLICY, jax.random.PRNGKey(0), 4, PARAMS, ENV, chunk_size=-1)
    summ = summarize_results(batched)
    assert "trajectory" not in summ and "tier" not in summ
    x = batched["total"].astype(np.float64)
    assert summ["total"]["mean"] == pytest.approx(x.mean())
    assert summ["total"]["ci95"] == pytest.approx(1.96 * x.std(ddof=1) / np.sqrt(N))
    assert np.all(batched["tier"] == 2)
