"""Training throughput of `train.ppo` in env-steps/s, and where the time goes.

    python -m train.bench                       # the default configs
    python -m train.bench --configs 2048:32:2:4 4096:32:1:2 --repeats 5

A config is `num_envs:hidden:update_epochs:num_minibatches`. For each, five jitted pieces are
compiled (compile time reported apart) and then timed as wall-clock medians over `--repeats`
calls (each call blocks until its results are ready):

- `train`: `Trainer.run` over `--updates` updates (rollout + GAE + PPO epochs), the figure the
  training CLI reports; env-steps/s = updates x episode_len x num_envs / median seconds;
- `env`: reset + `episode_len` x (`step_env` + observe) with "keep" actions (no network);
- `policy`: `episode_len` x the batched sampling forward pass (no env, no gradients);
- `rollout`: the trainer's rollout (env + policy + storing the trajectory), as in training;
- `learn`: the PPO epochs x minibatches of forward + backward + Adam on one update's batch.

Each piece is also given as the env-steps/s it alone would allow. The machine is shared, so the
1-minute load average is printed before and after every config. With `--cpu-devices N` the
`train` and `learn` pieces run on the trainer's data mesh; `env` and `policy` stay on one device.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from train.networks import ActorCritic
from train.ppo import PPOConfig, force_cpu_devices, make_trainer

# The first committed run's config, the old throughput preset, the default config with hidden
# 32, the default config (PPOConfig).
DEFAULT_CONFIGS = ("512:32:2:4", "1024:32:1:4", "2048:32:1:32", "2048:16:1:32")


def parse_config(spec: str, difficulty: str = "medium+hard") -> PPOConfig:
    """`num_envs:hidden:update_epochs:num_minibatches` -> PPOConfig (one update's worth of
    total_steps; the learning rate schedule does not affect the cost)."""
    try:
        n, h, e, m = (int(x) for x in spec.split(":"))
    except ValueError as err:
        raise ValueError(f"bad config {spec!r}; want num_envs:hidden:epochs:minibatches") from err
    return PPOConfig(difficulty=difficulty, num_envs=n, hidden=h, update_epochs=e,
                     num_minibatches=m, total_steps=n * 15)


def _time(fn: Callable[..., Any], args: tuple, repeats: int) -> tuple[float, float]:
    """-> (compile seconds, median seconds of a call) for jitted `fn` on `args`."""
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(*args))  # warm-up (allocations, thread pools)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return compile_s, statistics.median(times)


def bench_config(config: PPOConfig, updates: int = 2, repeats: int = 3,
                 breakdown: bool = True) -> dict[str, Any]:
    """Compile and time the five pieces (only `train` without `breakdown`) for one config
    -> a JSON-ready row."""
    tr = make_trainer(config)
    T, N = tr.env.config.episode_len, config.num_envs
    steps = T * N
    params = tr.env.default_params
    load0 = os.getloadavg()[0]
    runner = jax.jit(tr.init)(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)
    row: dict[str, Any] = dict(num_envs=N, hidden=config.hidden, epochs=config.update_epochs,
                               minibatches=config.num_minibatches, devices=jax.device_count())

    def train(r):
        return tr.run(r, updates)

    c, s = _time(train, (runner,), repeats)
    row.update(train_compile_s=round(c, 1), train_s_per_update=round(s / updates, 4),
               train_steps_per_s=round(updates * steps / s))
    if not breakdown:
        row["load_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        return row

    A = tr.env.config.max_actions

    def env_only(k):
        keys = jax.random.split(k, N)
        obs, st = jax.vmap(tr.env.reset_env, in_axes=(0, None))(keys, params)
        keep = jnp.zeros((N, A), jnp.int32)

        def step(st, _):
            obs, st, r, *_ = jax.vmap(tr.env.step_env, in_axes=(0, 0, 0, None))(
                keys, st, keep, params)
            return st, r.sum() + obs.slots.sum()

        return jax.lax.scan(step, st, None, length=T)[1].sum() + obs.globals.sum()

    _, s = _time(env_only, (key,), repeats)
    row.update(env_s=round(s, 4), env_steps_per_s=round(steps / s))

    obs0, _ = jax.jit(jax.vmap(tr.env.reset_env, in_axes=(0, None)))(
        jax.random.split(key, N), params)
    net_params = runner.train_state.params

    def policy_only(p, obs, k):
        def step(c, kk):
            a, logp, _, v = jax.vmap(
                lambda o, k1: tr.network.apply(p, o, k1, method=ActorCritic.sample))(
                obs, jax.random.split(kk, N))
            return c + logp.sum() + v.sum() + a.sum(), None

        return jax.lax.scan(step, 0.0, jax.random.split(k, T))[0]

    _, s = _time(policy_only, (net_params, obs0, key), repeats)
    row.update(policy_s=round(s, 4), policy_steps_per_s=round(steps / s))

    def rollout(ts, k):
        return tr.rollout(ts, k)[0].reward.sum()

    _, s = _time(rollout, (runner.train_state, key), repeats)
    row.update(rollout_s=round(s, 4), rollout_steps_per_s=round(steps / s))

    traj, _, _ = jax.jit(tr.rollout)(runner.train_state, key)
    flat = lambda x: x.reshape((steps,) + x.shape[2:])  # noqa: E731
    data = jax.tree_util.tree_map(flat, (traj, traj.reward, traj.reward + traj.value))

    def learn(ts, d, k):
        return tr.learn(ts, d, k)[1]

    _, s = _time(learn, (runner.train_state, data, key), repeats)
    row.update(learn_s=round(s, 4), learn_steps_per_s=round(steps / s))
    row["load_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    return row


def main(argv: list[str] | None = None) -> int:
    from kvjax.validation import ArgumentParser, fail, positive_int

    ap = ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                    help="num_envs:hidden:epochs:minibatches (default: %(default)s)")
    ap.add_argument("--updates", type=positive_int, default=2,
                    help="updates per timed train call")
    ap.add_argument("--repeats", type=positive_int, default=3,
                    help="timed calls per piece (median)")
    ap.add_argument("--difficulty", default="medium+hard",
                    help="kv-cache-v0 tier(s) the timed configs train on (default: medium+hard)")
    ap.add_argument("--train-only", action="store_true", help="skip the env/policy/learn pieces")
    ap.add_argument("--cpu-devices", type=positive_int, default=1,
                    help="XLA CPU devices (the env batch is sharded over them)")
    try:
        a = ap.parse_args(argv)
        configs = [parse_config(c, a.difficulty) for c in a.configs]
    except SystemExit as e:
        return int(e.code or 0)
    except ValueError as e:
        return fail("python -m train.bench", str(e))
    force_cpu_devices(a.cpu_devices)
    print(json.dumps(dict(backend=jax.default_backend(), devices=jax.device_count(),
                          cpus=os.cpu_count(), jax=jax.__version__)), flush=True)
    for c in configs:
        print(json.dumps(bench_config(c, a.updates, a.repeats, not a.train_only)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
