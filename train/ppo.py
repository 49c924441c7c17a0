"""PureJaxRL-style PPO for kvjax: `make_train(config) -> train(key)` is the whole loop as one
jittable function (rollout, GAE, epochs and minibatches are nested `lax.scan`s), and
`jax.vmap(train)` trains several seeds at once.

Any kvjax env (`config.env`): kv-cache-v0 or kv-serve-v0. What depends on the env's actions -
the network, the action distribution's log-prob / entropy / sampling, what a policy observes -
is the agent object of train/agents/; this file is the same PPO for both.

Rollouts. kv-cache-v0 (episodic agent): every update plays one full episode (`episode_len`
steps) in each of `num_envs` scenarios drawn fresh with `env.reset_env`, stepping with
`env.step_env`. All episodes start together and have the same length, so an update boundary is
an episode boundary: this gives the same transitions as `env.step`'s auto-reset but computes one
reset per episode instead of one per step (a reset is several times dearer than a step).
kv-serve-v0: episodes end when the simulated clock reaches the horizon (a variable number of
steps), so the `num_envs` envs keep running across updates (carried in `Runner.env`), each
update taking `num_steps` steps of `env.step` with its auto-reset.

GAE masks on `terminated` only and bootstraps truncated steps from the value of
`info["final_observation"]`; both networks' value heads are 0 when the observation says the
episode is over (no steps / no time remain), so that bootstrap is exactly 0 - nothing after the
end of an episode counts towards its score - rather than an untrained extrapolation.

Data parallelism: with more than one local device the env batch is sharded over a 1-D mesh
("data") with `jax.sharding`; parameters are replicated and XLA inserts the gradient all-reduce.

CLI: `python -m train.ppo --difficulty hard --total-steps N --num-envs M --seeds K`, or
`python -m train.ppo --env kv-serve-v0 --preset toy --workload synthetic --load 0.9
--set horizon=60 gpu_pool_tokens=40000 ...`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvjax import registry
from kvjax.validation import (
    ArgumentParser,
    Spec,
    check_field,
    check_writable_dir,
    fail,
    positive_int,
    real_arg,
    seed_arg,
)
from train import checkpoint
from train.agents import agent_class, learned_policy, make_agent
from train.agents.cache import TRAIN_DIFFICULTIES

# The allowed values of PPOConfig's real-valued hyperparameters (all finite).
REAL_SPECS = {
    "lr": Spec(0.0, lo_open=True),
    "gamma": Spec(0.0, 1.0),
    "gae_lambda": Spec(0.0, 1.0),
    "clip_eps": Spec(0.0, lo_open=True),
    "ent_coef": Spec(0.0),
    "vf_coef": Spec(0.0),
    "max_grad_norm": Spec(0.0, lo_open=True),
}


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Everything that defines a run (JSON-serialisable; stored in every checkpoint)."""

    difficulty: str = "hard"
    # 2,048 episodes per update, one pass in 32 minibatches of 960 samples, hidden 16: the
    # fastest config measured on the 2-core CPU (small minibatches stay in cache) and the best
    # learner per wall-clock second (docs/training.md).
    num_envs: int = 2048  # episodes per update (each episode_len steps)
    total_steps: int = 1_000_000  # env steps per seed
    update_epochs: int = 1
    num_minibatches: int = 32
    lr: float = 1e-3
    anneal_lr: bool = True
    gamma: float = 1.0  # the return is the episode's final rubric total: do not discount it
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    hidden: int = 16
    attention: bool = False
    shard: bool = True  # shard the env batch over local devices when there are several
    env: str = "kv-cache-v0"  # a registered env id (kvjax.registry) with a PPO agent
    # kv-serve-v0 only: the env is kvjax.make("kv-serve-v0", preset=, workload=, load=,
    # **serve_params) (serve_params: ServeParams overrides, e.g. horizon, gpu_pool_tokens), and
    # each update takes num_steps env steps in each of num_envs envs.
    preset: str = "toy"
    workload: str = "synthetic"
    load: float = 0.9
    serve_params: dict = dataclasses.field(default_factory=dict)
    num_steps: int = 64

    def __post_init__(self):
        if self.env not in registry.env_ids():
            raise ValueError(f"unknown env {self.env!r}; allowed: {list(registry.env_ids())}")
        if not isinstance(self.serve_params, dict) or not all(
                isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
                for k, v in self.serve_params.items()):
            raise ValueError(f"serve_params must map ServeParams names to numbers, got "
                             f"{self.serve_params!r}")
        if self.difficulty not in TRAIN_DIFFICULTIES:
            raise ValueError(
                f"unknown difficulty {self.difficulty!r}; allowed: {list(TRAIN_DIFFICULTIES)}"
            )
        for name in ("num_envs", "total_steps", "update_epochs", "num_minibatches", "hidden",
                     "num_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < 2**31:
                raise ValueError(f"{name} must be a positive int (< 2**31), got {v!r}")
        if self.num_envs % self.num_minibatches:
            raise ValueError(f"num_envs {self.num_envs} must be divisible by num_minibatches "
                             f"{self.num_minibatches}")
        for name, spec in REAL_SPECS.items():
            check_field("PPOConfig", name, getattr(self, name), spec)
        check_field("PPOConfig", "load", self.load, Spec(0.0, lo_open=True))
        for name in ("anneal_lr", "attention", "shard"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PPOConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**d)


class Transition(NamedTuple):
    obs: Any  # the env's observation (kvjax Observation or ServeObservation)
    action: Any  # int32 [A] (kv-cache-v0) or the action dict (kv-serve-v0)
    log_prob: chex.Array
    value: chex.Array
    reward: chex.Array
    terminated: chex.Array
    truncated: chex.Array


class Runner(NamedTuple):
    """Everything the loop carries between updates (and what a checkpoint stores)."""

    train_state: TrainState
    key: chex.PRNGKey
    update: chex.Array  # int32, updates done
    # Envs whose episodes outlast an update (kv-serve-v0): their EnvCarry; () for kv-cache-v0,
    # whose updates start fresh episodes.
    env: Any = ()


class EnvCarry(NamedTuple):
    """The running envs of a non-episodic agent, [num_envs] leading axis."""

    obs: Any
    state: Any
    episode_return: chex.Array  # float32, reward so far in the current episode
    ended_return: chex.Array  # float32, summed returns of episodes ended in this update
    ended: chex.Array  # int32, episodes ended in this update


class Trainer(NamedTuple):
    """The pieces of `make_train`, for the CLI's chunked loop and for tests."""

    config: PPOConfig
    env: Any  # KVCacheEnv or ServeEnv
    network: Any  # agent.network
    num_updates: int
    steps_per_update: int
    init: Any  # key -> Runner
    update: Any  # (Runner, None) -> (Runner, metrics)  (a lax.scan body)
    run: Any  # (Runner, n: static int) -> (Runner, metrics stacked over n updates)
    rollout: Any  # (TrainState, key, env carry) -> (traj [T, N], final obs [N], final
    # state [N] (episodic) or EnvCarry)
    learn: Any  # (TrainState, (traj, adv, targets) flat [T*N], key) -> (TrainState, aux)
    agent: Any = None  # train/agents/


def gae(rewards_, values, next_values, terminated, truncated, gamma: float, lam: float):
    """Generalised advantage estimation over [T, N] arrays (time first).

    `next_values[t]` is V(s_{t+1}) - for a truncated step the value of its final observation.
    Terminated steps do not bootstrap; any episode end (terminated or truncated) cuts the
    lambda-return recursion. Returns (advantages, targets)."""
    not_term = 1.0 - terminated.astype(jnp.float32)
    not_done = not_term * (1.0 - truncated.astype(jnp.float32))
    deltas = rewards_ + gamma * next_values * not_term - values

    def body(carry, x):
        delta, nd = x
        adv = delta + gamma * lam * nd * carry
        return adv, adv

    _, adv = jax.lax.scan(body, jnp.zeros_like(values[0]), (deltas, not_done), reverse=True)
    return adv, adv + values


def make_optimizer(config: PPOConfig, num_updates: int) -> optax.GradientTransformation:
    """clip_by_global_norm then Adam with a linearly annealed (or constant) learning rate."""
    n = max(num_updates * config.update_epochs * config.num_minibatches, 1)
    lr = optax.linear_schedule(config.lr, 0.0, n) if config.anneal_lr else config.lr
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(lr, eps=1e-5))


def make_env(config: PPOConfig):
    """The env `config` trains on (its agent class builds it from the config)."""
    return agent_class(config.env).make_env(config)


def make_trainer(config: PPOConfig, env=None) -> Trainer:
    """Build init / update / run for `config` (nothing is traced until they are called).
    `env`: the env to train on (default `make_env(config)`; its `default_params` are used)."""
    env = env or make_env(config)
    if env.name != config.env:
        raise ValueError(f"config.env is {config.env!r} but the env is {env.name!r}")
    agent = make_agent(env, config.hidden, config.attention)
    N = config.num_envs
    T = env.config.episode_len if agent.episodic else config.num_steps
    if N % config.num_minibatches:
        raise ValueError(f"num_envs {N} must be divisible by num_minibatches")
    steps_per_update = T * N
    num_updates = max(config.total_steps // steps_per_update, 1)
    env_params = env.default_params
    # Episodic agents' episodes end with the update: no auto-reset needed.
    env_step = env.step_env if agent.episodic else env.step
    tx = make_optimizer(config, num_updates)

    devices = jax.local_devices()
    sharded = config.shard and len(devices) > 1 and N % len(devices) == 0
    mesh = Mesh(np.asarray(devices), ("data",)) if sharded else None

    def shard(tree):
        """Pin the leading (env) axis of every leaf to the data mesh (no-op on one device)."""
        if mesh is None:
            return tree
        spec = NamedSharding(mesh, P("data"))
        return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, spec), tree)

    def reset(key):
        return agent.reset(jax.random.split(key, N), env_params, config)

    def init(key: chex.PRNGKey) -> Runner:
        k_net, k_obs, key = jax.random.split(key, 3)
        obs, _ = env.reset_env(k_obs, env_params)
        ts = TrainState.create(apply_fn=agent.network.apply, params=agent.init(k_net, obs),
                               tx=tx)
        carry = ()
        if not agent.episodic:
            key, k_env = jax.random.split(key)
            obs, state = reset(k_env)
            zeros = jnp.zeros((N,), jnp.float32)
            carry = EnvCarry(obs, state, zeros, zeros, jnp.zeros((N,), jnp.int32))
        return Runner(ts, key, jnp.int32(0), carry)

    def rollout(ts: TrainState, key, carry=()):
        k_reset, k_act = jax.random.split(key)
        if agent.episodic:
            obs, state = shard(reset(k_reset))
        else:
            zeros = jnp.zeros((N,), jnp.float32)
            carry = carry._replace(ended_return=zeros, ended=jnp.zeros((N,), jnp.int32))
            obs, state = carry.obs, carry.state

        def step(c, k):
            obs, state, carry = c
            keys = jax.random.split(k, N)
            action, logp, _, v = jax.vmap(agent.sample, in_axes=(None, 0, 0))(
                ts.params, obs, keys)
            obs2, state2, r, term, trunc, _ = jax.vmap(env_step, in_axes=(0, 0, 0, None))(
                keys, state, action, env_params)
            tr = Transition(obs, action, logp, v, r, term, trunc)
            if not agent.episodic:  # episode returns for the metrics
                ret, done = carry.episode_return + r, term | trunc
                carry = carry._replace(
                    episode_return=jnp.where(done, 0.0, ret),
                    ended_return=carry.ended_return + jnp.where(done, ret, 0.0),
                    ended=carry.ended + done)
            return shard((obs2, state2, carry)), tr

        # Episodic: step_env does not auto-reset, so the last carried observation is the final
        # step's info["final_observation"] (only the last one is needed: no [T, N] copy).
        (final_obs, final_state, carry), traj = jax.lax.scan(
            step, (obs, state, carry), jax.random.split(k_act, T)
        )
        if agent.episodic:
            return traj, final_obs, final_state
        return traj, final_obs, carry._replace(obs=final_obs, state=final_state)

    def loss_fn(net_params, batch: Transition, adv, targets):
        logp, entropy, v = jax.vmap(agent.evaluate, in_axes=(None, 0, 0))(
            net_params, batch.obs, batch.action
        )
        entropy = entropy.mean()
        v_clipped = batch.value + jnp.clip(v - batch.value, -config.clip_eps, config.clip_eps)
        v_loss = 0.5 * jnp.maximum((v - targets) ** 2, (v_clipped - targets) ** 2).mean()
        ratio = jnp.exp(logp - batch.log_prob)
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        pg_loss = -jnp.minimum(
            ratio * adv, jnp.clip(ratio, 1 - config.clip_eps, 1 + config.clip_eps) * adv
        ).mean()
        total = pg_loss + config.vf_coef * v_loss - config.ent_coef * entropy
        aux = dict(
            pg_loss=pg_loss, v_loss=v_loss, entropy=entropy,
            approx_kl=((ratio - 1) - jnp.log(ratio)).mean(),
            clip_frac=(jnp.abs(ratio - 1) > config.clip_eps).mean(),
        )
        return total, aux

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def learn(ts: TrainState, data, key):
        """`update_epochs` passes over the flat batch, `num_minibatches` shuffled slices each."""
        mb = config.num_minibatches

        def epoch(ts, k):
            perm = jax.random.permutation(k, T * N)
            shuffled = jax.tree_util.tree_map(
                lambda x: x[perm].reshape((mb, -1) + x.shape[1:]), data
            )

            def minibatch(ts, b):
                (_, aux), grads = grad_fn(ts.params, *b)
                return ts.apply_gradients(grads=grads), aux

            return jax.lax.scan(minibatch, ts, shuffled)

        return jax.lax.scan(epoch, ts, jax.random.split(key, config.update_epochs))

    def update(runner: Runner, _=None):
        ts, key, n, carry = runner
        key, k_roll, k_perm = jax.random.split(key, 3)
        traj, final_obs, final = rollout(ts, k_roll, carry)

        # V(s_{t+1}): the next step's value inside an episode; at an episode's end the value
        # of info["final_observation"], which the value heads fix at 0 (nothing is earned
        # after the end), so truncated steps bootstrap from 0. (After an auto-reset, the next
        # stored value is the new episode's: not this one's.)
        last_v = jax.vmap(agent.value, in_axes=(None, 0))(ts.params, final_obs)
        next_v = jnp.concatenate([traj.value[1:], last_v[None]], axis=0)
        next_v = jnp.where(traj.truncated, 0.0, next_v)
        adv, targets = gae(traj.reward, traj.value, next_v, traj.terminated, traj.truncated,
                           config.gamma, config.gae_lambda)

        flat = lambda x: x.reshape((T * N,) + x.shape[2:])  # noqa: E731
        ts, aux = learn(ts, jax.tree_util.tree_map(flat, (traj, adv, targets)), k_perm)
        metrics = {k: v.mean() for k, v in aux.items()}
        metrics.update(agent.metrics(final))
        return Runner(ts, key, n + 1, carry if agent.episodic else final), metrics

    def run(runner: Runner, n: int):
        return jax.lax.scan(update, runner, None, length=n)

    return Trainer(config, env, agent.network, num_updates, steps_per_update, init, update, run,
                   rollout, learn, agent)


def make_train(config: PPOConfig, env=None):
    """-> `train(key) -> {"runner": Runner, "metrics": per-update metrics}` (jit / vmap it)."""
    trainer = make_trainer(config, env)

    def train(key: chex.PRNGKey):
        runner, metrics = trainer.run(trainer.init(key), trainer.num_updates)
        return {"runner": runner, "metrics": metrics}

    return train


# -- checkpoints -----------------------------------------------------------------------------

def save_checkpoint(path: str, runner: Runner, config: PPOConfig) -> None:
    """The full training state (params, optimiser, key, update count), any seed batch shape."""
    checkpoint.save(path, runner, config.to_dict(), kind="train")


def load_checkpoint(
    path: str, seeds: int | None = None, config: PPOConfig | None = None
) -> tuple[PPOConfig, Runner]:
    """Restore a training checkpoint written by `save_checkpoint` (seeds: the leading batch
    size it was saved with, None if unbatched). `config` overrides the stored one (e.g. a larger
    `total_steps`); the optimiser and network in the returned runner are built from it."""
    cfg_dict, kind, state = checkpoint.read(path)
    if kind != "train":
        raise ValueError(f"{path} holds a {kind!r} checkpoint; resume needs a 'train' one")
    saved = checkpoint.seed_count(kind, state)
    if saved != seeds:
        have = "one unbatched runner" if saved is None else f"{saved} seeds"
        raise ValueError(f"{path} holds {have}, not "
                         f"{'an unbatched runner' if seeds is None else f'{seeds} seeds'}")
    config = config or PPOConfig.from_dict(cfg_dict)
    trainer = make_trainer(config)
    keys = jax.random.split(jax.random.PRNGKey(0), seeds or 1)
    # jit: an eager init resets num_envs envs op by op (minutes for kv-serve-v0's carry).
    init = jax.jit(jax.vmap(trainer.init) if seeds else trainer.init)
    template = init(keys) if seeds else init(keys[0])
    return config, checkpoint.restore(template, state)


def stored_config(path: str) -> PPOConfig:
    """The PPOConfig a checkpoint was written with."""
    return PPOConfig.from_dict(checkpoint.read(path)[0])


def policy_params(runner: Runner, seed_index: int | None = None):
    """The network parameters of one seed of a (possibly seed-batched) runner."""
    p = runner.train_state.params
    return p if seed_index is None else jax.tree_util.tree_map(lambda x: x[seed_index], p)


def save_policy(path: str, net_params, config: PPOConfig) -> None:
    """Network parameters alone (what evaluation needs; a few hundred KB)."""
    checkpoint.save(path, net_params, config.to_dict(), kind="policy")


def load_policy(path: str, seed_index: int | None = None) -> tuple[PPOConfig, Any]:
    """-> (config, network params) from either file `train.ppo` writes: a policy checkpoint
    (`policy.msgpack`) or a training checkpoint (`checkpoint.msgpack`, unbatched or
    seed-batched). For a batch of several seeds, `seed_index` picks one (it is never
    guessed); with one seed it may be omitted."""
    cfg_dict, kind, state = checkpoint.read(path)
    config = PPOConfig.from_dict(cfg_dict)
    trainer = make_trainer(config)
    seeds = checkpoint.seed_count(kind, state)
    if kind == "policy" or seeds is None:
        if seed_index not in (None, 0):
            raise ValueError(f"{path} holds one policy; seed_index must be 0 or omitted, got "
                             f"{seed_index}")
        if kind == "policy":  # under jit the unused env resets of init are dropped
            params = jax.jit(lambda k: trainer.init(k).train_state.params)
            return config, checkpoint.restore(params(jax.random.PRNGKey(0)), state)
        template = jax.jit(trainer.init)(jax.random.PRNGKey(0))
        return config, checkpoint.restore(template, state).train_state.params
    if seed_index is None and seeds == 1:
        seed_index = 0
    if isinstance(seed_index, bool) or not isinstance(seed_index, int) or not (
            0 <= seed_index < seeds):
        raise ValueError(f"{path} holds a training batch of {seeds} seeds: pick one with "
                         f"seed_index (--seed-index) in [0, {seeds - 1}], got {seed_index}")
    batched = jax.jit(jax.vmap(trainer.init))(jax.random.split(jax.random.PRNGKey(0), seeds))
    return config, policy_params(checkpoint.restore(batched, state), seed_index)


def make_policy(net_params, config: PPOConfig, greedy: bool = True, env=None):
    """A kvjax policy `policy(key, state, params) -> action` from trained weights (int32
    [max_actions] for kv-cache-v0, the action dict for kv-serve-v0; it observes the state as the
    env does; greedy = the most likely action of each head / row). `env` defaults to
    `make_env(config)`."""
    env = env or make_env(config)
    return learned_policy(make_agent(env, config.hidden, config.attention), net_params, greedy)


# -- CLI -------------------------------------------------------------------------------------

def _plot(rows: list[dict[str, Any]], path: str,
          ylabel: str = "mean episode rubric total") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["env_steps"] for r in rows])
    ret = np.array([r["return"] for r in rows])  # [n, seeds]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for s in range(ret.shape[1]):
        ax[0].plot(steps, ret[:, s], lw=1, label=f"seed {s}")
    ax[0].set_xlabel("env steps (per seed)")
    ax[0].set_ylabel(ylabel)
    ax[0].legend(fontsize=7)
    ent = np.array([r["entropy"] for r in rows])
    ax[1].plot(steps, ent.mean(1))
    ax[1].set_xlabel("env steps (per seed)")
    ax[1].set_ylabel("policy entropy (sum of heads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def force_cpu_devices(n: int) -> None:
    """Expose `n` XLA CPU devices (one per core: an XLA CPU computation mostly runs on one
    thread) so the trainer's data mesh splits the env batch over them. Must run before JAX
    initialises its backends; XLA_FLAGS that already set a device count win."""
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def build_parser() -> ArgumentParser:
    """`python -m train.ppo`'s arguments: the run's, then each env's (its agent's)."""
    ap = ArgumentParser(prog="python -m train.ppo", description=__doc__.split("\n")[0])
    env_ids = registry.env_ids()
    ap.add_argument("--env", default=registry.DEFAULT_ENV_ID, choices=env_ids,
                    help=f"the env to train on (default: {registry.DEFAULT_ENV_ID})")
    for env_id in env_ids:
        agent_class(env_id).add_train_options(ap)
    ap.add_argument("--total-steps", type=positive_int, default=2_000_000,
                    help="env steps per seed")
    ap.add_argument("--num-envs", type=positive_int, default=PPOConfig.num_envs,
                    help=f"envs stepped in parallel per seed (default: {PPOConfig.num_envs})")
    ap.add_argument("--seeds", type=positive_int, default=None,
                    help="seeds trained at once (vmap); default 1, or the checkpoint's with "
                    "--resume (a different count is an error)")
    ap.add_argument("--seed", type=seed_arg, default=0, help="in [0, 2**32)")
    ap.add_argument("--lr", type=real_arg(0.0, lo_open=True), default=PPOConfig.lr,
                    help=f"Adam learning rate, annealed linearly to 0 (default: {PPOConfig.lr})")
    ap.add_argument("--epochs", type=positive_int, default=PPOConfig.update_epochs,
                    help=f"passes over each update's batch (default: {PPOConfig.update_epochs})")
    ap.add_argument("--minibatches", type=positive_int, default=PPOConfig.num_minibatches,
                    help=f"minibatches per pass (default: {PPOConfig.num_minibatches})")
    ap.add_argument("--ent-coef", type=real_arg(0.0), default=PPOConfig.ent_coef,
                    help=f"entropy bonus weight (default: {PPOConfig.ent_coef})")
    ap.add_argument("--hidden", type=positive_int, default=PPOConfig.hidden,
                    help=f"width of the network's layers (default: {PPOConfig.hidden})")
    ap.add_argument("--attention", action="store_true",
                    help="kv-cache-v0: self-attention across slots in the actor-critic")
    ap.add_argument("--log-every", type=positive_int, default=5, help="updates per jitted chunk")
    ap.add_argument("--cpu-devices", type=positive_int, default=1,
                    help="XLA CPU devices to shard the env batch over (e.g. the core count)")
    ap.add_argument("--time-limit", type=real_arg(0.0), default=0.0,
                    help="stop (and checkpoint) after this many minutes; 0 = none")
    ap.add_argument("--out", default=None, help="output dir (default runs/ppo-<difficulty>-...)")
    ap.add_argument("--resume", default=None,
                    help="training checkpoint to continue from (its config is used; only "
                    "--total-steps may change)")
    return ap


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    ap = build_parser()
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    force_cpu_devices(a.cpu_devices)
    try:
        if a.out:
            check_writable_dir(a.out, "--out")
        if a.resume:
            cfg_dict, kind, state = checkpoint.read(a.resume)
            saved = checkpoint.seed_count(kind, state)
            if kind == "train" and saved is None:
                raise ValueError(f"--resume {a.resume} holds an unbatched runner; train.ppo "
                                 "writes seed-batched ones")
            if a.seeds is not None and saved is not None and a.seeds != saved:
                raise ValueError(f"--resume {a.resume} was trained with {saved} seed(s); "
                                 f"--seeds {a.seeds} does not match (omit it or pass {saved})")
            a.seeds = saved if saved is not None else a.seeds
            config = dataclasses.replace(PPOConfig.from_dict(cfg_dict),
                                         total_steps=a.total_steps)
            config, runner = load_checkpoint(a.resume, seeds=a.seeds, config=config)
        else:
            a.seeds = a.seeds or 1
            config = PPOConfig(
                num_envs=a.num_envs, total_steps=a.total_steps, update_epochs=a.epochs,
                num_minibatches=a.minibatches, lr=a.lr, ent_coef=a.ent_coef, hidden=a.hidden,
                attention=a.attention, env=a.env, **agent_class(a.env).config_options(a),
            )
            runner = None
        trainer = make_trainer(config)
    except (ValueError, OSError) as e:
        return fail("python -m train.ppo", str(e))

    what = trainer.agent.run_name(config)
    out = a.out or os.path.join("runs", f"ppo-{what}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({**config.to_dict(), "seeds": a.seeds, "seed": a.seed}, f, indent=2)
    if runner is None:
        runner = jax.jit(jax.vmap(trainer.init))(
            jax.random.split(jax.random.PRNGKey(a.seed), a.seeds))
    chunk = jax.jit(jax.vmap(trainer.run, in_axes=(0, None)), static_argnums=1)

    done = int(np.asarray(runner.update)[0])
    total = trainer.num_updates
    metrics_path = os.path.join(out, "metrics.jsonl")
    rows: list[dict[str, Any]] = []
    if a.resume and os.path.exists(metrics_path):
        with open(metrics_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    ckpt = os.path.join(out, "checkpoint.msgpack")
    t0, timed_steps, timed_s, first = time.time(), 0, 0.0, True
    bar = tqdm(total=total, initial=done, desc="ppo updates", unit="upd")
    with open(metrics_path, "a") as mf:
        while done < total:
            n = min(a.log_every, total - done)
            tc = time.time()
            runner, m = chunk(runner, n)
            m = jax.device_get(m)
            dt = time.time() - tc
            if not first:  # the first chunk of this process includes compilation
                timed_steps += n * trainer.steps_per_update * a.seeds
                timed_s += dt
            done, first = done + n, False
            row = {k: np.asarray(v)[:, -1].tolist() for k, v in m.items()}  # [seeds]
            if not trainer.agent.episodic:  # episodes end in some updates only: chunk mean
                ended = np.asarray(m["episodes"])
                ret = np.nan_to_num(np.asarray(m["return"])) * ended
                row["return"] = np.where(ended.sum(1) > 0, ret.sum(1) / np.maximum(
                    ended.sum(1), 1), np.nan).tolist()
                row["episodes"] = ended.sum(1).tolist()
            row.update(update=done, env_steps=done * trainer.steps_per_update,
                       wall_s=round(time.time() - t0, 2),
                       steps_per_s=round(timed_steps / timed_s) if timed_s else None)
            rows.append(row)
            mf.write(json.dumps(row) + "\n")
            mf.flush()
            bar.update(n)
            bar.set_postfix(ret=f"{np.mean(row['return']):.3f}",
                            ent=f"{np.mean(row['entropy']):.2f}",
                            sps=row["steps_per_s"] or "-")
            save_checkpoint(ckpt, runner, config)
            if a.time_limit and time.time() - t0 > 60 * a.time_limit:
                tqdm.write(f"time limit of {a.time_limit} min reached at update {done}")
                break
    bar.close()
    final = np.asarray(rows[-1]["return"]) if rows else np.zeros(a.seeds)
    best = int(np.argmax(np.nan_to_num(final, nan=-np.inf)))
    save_policy(os.path.join(out, "policy.msgpack"), policy_params(runner, best), config)
    if rows:
        _plot(rows, os.path.join(out, "learning_curve.png"), trainer.agent.return_label)
    summary = dict(out=out, updates=done, env_steps_per_seed=done * trainer.steps_per_update,
                   final_return=final.tolist(), best_seed=best,
                   steps_per_s=round(timed_steps / timed_s) if timed_s else None)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
