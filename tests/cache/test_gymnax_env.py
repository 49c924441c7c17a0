"""gymnax fit: `import kvjax` registers kv-cache-v0 and kv-cache-flat-v0 with gymnax; the flat
variant passes gymnax's space checks and runs under its wrappers and a PureJaxRL-style PPO loop
with only the environment name changed. Skips cleanly without the `gymnax` extra."""

from __future__ import annotations

import subprocess
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gymnax = pytest.importorskip("gymnax")

import distrax  # noqa: E402
import flax.linen as nn  # noqa: E402
import optax  # noqa: E402
from flax.training.train_state import TrainState  # noqa: E402
from gymnax.environments import spaces  # noqa: E402
from gymnax.wrappers import (  # noqa: E402
    FlattenObservationWrapper,
    LegacyStepAPIWrapper,
    LogWrapper,
)

import kvjax  # noqa: E402
from kvjax.cache.gymnax_env import flat_size  # noqa: E402

ENV_NAME = "kv-cache-flat-v0"


@pytest.mark.parametrize("first", ["kvjax", "gymnax"])
def test_either_import_order_registers_both_ids(first):
    second = "gymnax" if first == "kvjax" else "kvjax"
    code = (
        f"import {first}, {second}, gymnax\n"
        "print(sorted(i for i in gymnax.registered_envs if i.startswith('kv-cache')))\n"
        "env, params = gymnax.make('kv-cache-v0', difficulty='hard')\n"
        "print(type(env).__name__, int(params.difficulty))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    ).stdout.splitlines()
    assert out == ["['kv-cache-flat-v0', 'kv-cache-v0']", "TieredKVCacheEnv 2"]


def test_flat_spaces_pass_gymnax_isinstance_checks_and_the_mask_is_documented():
    env, params = gymnax.make(ENV_NAME, difficulty="medium")
    assert int(params.difficulty) == 1
    assert isinstance(env, gymnax.environments.environment.Environment)
    act, obs_space = env.action_space(params), env.observation_space(params)
    assert isinstance(act, spaces.Discrete) and act.n == env.num_actions == 97
    assert isinstance(obs_space, spaces.Box) and obs_space.shape == (flat_size(env.config),)
    obs, state = env.reset(jax.random.PRNGKey(0), params)
    assert obs.shape == obs_space.shape and obs.dtype == jnp.float32
    mask = kvjax.action_mask(state)
    np.testing.assert_array_equal(obs[-env.num_actions :], mask.astype(np.float32))
    _, _, _, _, _, info = env.step(jax.random.PRNGKey(1), state, 0, params)
    assert info["action_mask"].shape == (env.num_actions,)
    # FlattenObservationWrapper's own assertion (isinstance Box) passes.
    assert FlattenObservationWrapper(env).observation_space(params).shape == obs_space.shape


def test_flat_episode_return_is_the_rubric_total_and_bad_ids_are_invalid():
    env, params = gymnax.make(ENV_NAME, difficulty="hard")
    core = kvjax.KVCacheEnv()
    obs, state = env.reset_env(jax.random.PRNGKey(3), params)
    _, ref = core.reset_env(jax.random.PRNGKey(3), params)
    ret = 0.0
    ids = [1, 33, 65, 0, 2**20, -4] + [0] * (env.config.episode_len - 6)
    step = jax.jit(env.step_env)
    for a in ids:
        obs, state, r, term, info = step(None, state, jnp.int32(a), params)
        _, ref, *_ = core.step_env(None, ref, jnp.array([a if 0 <= a < 97 else -1, 0, 0]), params)
        ret += float(r)
    assert not bool(term) and bool(env.is_truncated(state, params))
    assert ret == pytest.approx(float(kvjax.rubric(state, params)["total"]), abs=1e-5)
    assert int(state.counters.invalid_actions) == int(ref.counters.invalid_actions) >= 2
    np.testing.assert_array_equal(state.slots.tokens, ref.slots.tokens)


# -- a PureJaxRL-style PPO (the stock script's structure; only ENV_NAME is kvjax's) --------------
class ActorCritic(nn.Module):
    action_dim: int

    @nn.compact
    def __call__(self, x):
        a = nn.tanh(nn.Dense(64)(x))
        pi = distrax.Categorical(logits=nn.Dense(self.action_dim)(nn.tanh(nn.Dense(64)(a))))
        v = nn.Dense(1)(nn.tanh(nn.Dense(64)(nn.tanh(nn.Dense(64)(x)))))
        return pi, jnp.squeeze(v, axis=-1)


class Transition(NamedTuple):
    done: jnp.ndarray
    action: jnp.ndarray
    value: jnp.ndarray
    reward: jnp.ndarray
    log_prob: jnp.ndarray
    obs: jnp.ndarray
    info: dict


def make_train(config):
    config["NUM_UPDATES"] = config["TOTAL_TIMESTEPS"] // config["NUM_STEPS"] // config["NUM_ENVS"]
    config["MINIBATCH_SIZE"] = config["NUM_ENVS"] * config["NUM_STEPS"] // config["NUM_MINIBATCHES"]
    env, env_params = gymnax.make(config["ENV_NAME"])
    env = FlattenObservationWrapper(env)
    env = LogWrapper(env)
    env = LegacyStepAPIWrapper(env)  # gymnax >= 1.0: the five-value step PureJaxRL expects

    def train(rng):
        network = ActorCritic(env.action_space(env_params).n)
        rng, _rng = jax.random.split(rng)
        init_x = jnp.zeros(env.observation_space(env_params).shape)
        params = network.init(_rng, init_x)
        tx = optax.chain(
            optax.clip_by_global_norm(config["MAX_GRAD_NORM"]), optax.adam(config["LR"], eps=1e-5)
        )
        train_state = TrainState.create(apply_fn=network.apply, params=params, tx=tx)
        rng, _rng = jax.random.split(rng)
        reset_rng = jax.random.split(_rng, config["NUM_ENVS"])
        obsv, env_state = jax.vmap(env.reset, in_axes=(0, None))(reset_rng, env_params)

        def _update_step(runner_state, unused):
            def _env_step(runner_state, unused):
                train_state, env_state, last_obs, rng = runner_state
                rng, _rng = jax.random.split(rng)
                pi, value = network.apply(train_state.params, last_obs)
                action = pi.sample(seed=_rng)
                log_prob = pi.log_prob(action)
                rng, _rng = jax.random.split(rng)
                rng_step = jax.random.split(_rng, config["NUM_ENVS"])
                obsv, env_state, reward, done, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                    rng_step, env_state, action, env_params
                )
                transition = Transition(done, action, value, reward, log_prob, last_obs, info)
                return (train_state, env_state, obsv, rng), transition

            runner_state, traj_batch = jax.lax.scan(
                _env_step, runner_state, None, config["NUM_STEPS"]
            )
            train_state, env_state, last_obs, rng = runner_state
            _, last_val = network.apply(train_state.params, last_obs)

            def _get_advantages(gae_and_next_value, transition):
                gae, next_value = gae_and_next_value
                delta = (
                    transition.reward
                    + config["GAMMA"] * next_value * (1 - transition.done)
                    - transition.value
                )
                gae = delta + config["GAMMA"] * config["GAE_LAMBDA"] * (1 - transition.done) * gae
                return (gae, transition.value), gae

            _, advantages = jax.lax.scan(
                _get_advantages, (jnp.zeros_like(last_val), last_val), traj_batch, reverse=True
            )
            targets = advantages + traj_batch.value

            def _update_epoch(update_state, unused):
                def _update_minbatch(train_state, batch_info):
                    traj_batch, advantages, targets = batch_info

                    def _loss_fn(params, traj_batch, gae, targets):
                        pi, value = network.apply(params, traj_batch.obs)
                        log_prob = pi.log_prob(traj_batch.action)
                        value_pred_clipped = traj_batch.value + (value - traj_batch.value).clip(
                            -config["CLIP_EPS"], config["CLIP_EPS"]
                        )
                        value_loss = (
                            0.5
                            * jnp.maximum(
                                jnp.square(value - targets),
                                jnp.square(value_pred_clipped - targets),
                            ).mean()
                        )
                        ratio = jnp.exp(log_prob - traj_batch.log_prob)
                        gae = (gae - gae.mean()) / (gae.std() + 1e-8)
                        loss_actor = -jnp.minimum(
                            ratio * gae,
                            jnp.clip(ratio, 1.0 - config["CLIP_EPS"], 1.0 + config["CLIP_EPS"])
                            * gae,
                        ).mean()
                        entropy = pi.entropy().mean()
                        total = (
                            loss_actor
                            + config["VF_COEF"] * value_loss
                            - config["ENT_COEF"] * entropy
                        )
                        return total, (value_loss, loss_actor, entropy)

                    grad_fn = jax.value_and_grad(_loss_fn, has_aux=True)
                    total_loss, grads = grad_fn(train_state.params, traj_batch, advantages, targets)
                    return train_state.apply_gradients(grads=grads), total_loss

                train_state, traj_batch, advantages, targets, rng = update_state
                rng, _rng = jax.random.split(rng)
                batch_size = config["MINIBATCH_SIZE"] * config["NUM_MINIBATCHES"]
                permutation = jax.random.permutation(_rng, batch_size)
                batch = jax.tree_util.tree_map(
                    lambda x: x.reshape((batch_size,) + x.shape[2:]),
                    (traj_batch, advantages, targets),
                )
                shuffled = jax.tree_util.tree_map(lambda x: jnp.take(x, permutation, axis=0), batch)
                minibatches = jax.tree_util.tree_map(
                    lambda x: jnp.reshape(x, [config["NUM_MINIBATCHES"], -1] + list(x.shape[1:])),
                    shuffled,
                )
                train_state, total_loss = jax.lax.scan(_update_minbatch, train_state, minibatches)
                return (train_state, traj_batch, advantages, targets, rng), total_loss

            update_state = (train_state, traj_batch, advantages, targets, rng)
            update_state, loss_info = jax.lax.scan(
                _update_epoch, update_state, None, config["UPDATE_EPOCHS"]
            )
            train_state, rng = update_state[0], update_state[-1]
            return (train_state, env_state, last_obs, rng), (traj_batch.info, loss_info)

        rng, _rng = jax.random.split(rng)
        runner_state = (train_state, env_state, obsv, _rng)
        runner_state, metric = jax.lax.scan(_update_step, runner_state, None, config["NUM_UPDATES"])
        return {"runner_state": runner_state, "metrics": metric}

    return train


@pytest.mark.slow
def test_purejaxrl_ppo_runs_on_kv_cache_flat_v0():
    config = {
        "LR": 2.5e-4,
        "NUM_ENVS": 8,
        "NUM_STEPS": 15,
        "TOTAL_TIMESTEPS": 8 * 15 * 3,
        "UPDATE_EPOCHS": 2,
        "NUM_MINIBATCHES": 2,
        "GAMMA": 0.99,
        "GAE_LAMBDA": 0.95,
        "CLIP_EPS": 0.2,
        "ENT_COEF": 0.01,
        "VF_COEF": 0.5,
        "MAX_GRAD_NORM": 0.5,
        "ENV_NAME": ENV_NAME,
    }
    out = jax.jit(make_train(config))(jax.random.PRNGKey(42))
    info, (loss, _) = out["metrics"]
    assert np.isfinite(np.asarray(loss)).all()
    done = np.asarray(info["returned_episode"])  # [updates, steps, envs]
    assert done.shape == (3, 15, 8)
    assert done[:, -1].all() and not done[:, :-1].any()  # every episode is 15 steps
    returns = np.asarray(info["returned_episode_returns"])[done]
    assert np.isfinite(returns).all() and ((returns > -0.6) & (returns < 0.5)).all()
    assert (np.asarray(info["returned_episode_lengths"])[done] == 15).all()
