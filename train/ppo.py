"""PureJaxRL-style PPO for kvjax: `make_train(config) -> train(key)` is the whole loop as one
jittable function (rollout, GAE, epochs and minibatches are nested `lax.scan`s), and
`jax.vmap(train)` trains several seeds at once.

Rollouts. Every update plays one full episode (`episode_len` steps) in each of `num_envs`
scenarios drawn fresh with `env.reset_env`, stepping with `env.step_env`. All episodes start
together and have the same length, so an update boundary is an episode boundary: this gives the
same transitions as `env.step`'s auto-reset but computes one reset per episode instead of one per
step (a reset is several times dearer than a step).

GAE masks on `terminated` only and bootstraps truncated steps from the value of
`info["final_observation"]`; the value head is 0 when the observation says no steps remain, so
that bootstrap is exact for this fixed-horizon task rather than an untrained extrapolation.

Data parallelism: with more than one local device the env batch is sharded over a 1-D mesh
("data") with `jax.sharding`; parameters are replicated and XLA inserts the gradient all-reduce.

CLI: `python -m train.ppo --difficulty hard --total-steps N --num-envs M --seeds K`.
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

import kvjax
from kvjax import rewards
from kvjax.env import KVCacheEnv
from kvjax.observations import Observation
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
from train.networks import ActorCritic, dists

# Training difficulty: a kvjax tier, or "medium+hard" (half the envs each).
TRAIN_DIFFICULTIES = ("easy", "medium", "hard", "all", "medium+hard")
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

    def __post_init__(self):
        if self.difficulty not in TRAIN_DIFFICULTIES:
            raise ValueError(
                f"unknown difficulty {self.difficulty!r}; allowed: {list(TRAIN_DIFFICULTIES)}"
            )
        for name in ("num_envs", "total_steps", "update_epochs", "num_minibatches", "hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < 2**31:
                raise ValueError(f"{name} must be a positive int (< 2**31), got {v!r}")
        if self.num_envs % self.num_minibatches:
            raise ValueError(f"num_envs {self.num_envs} must be divisible by num_minibatches "
                             f"{self.num_minibatches}")
        for name, spec in REAL_SPECS.items():
            check_field("PPOConfig", name, getattr(self, name), spec)
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
    obs: Observation
    action: chex.Array
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


class Trainer(NamedTuple):
    """The pieces of `make_train`, for the CLI's chunked loop and for tests."""

    config: PPOConfig
    env: KVCacheEnv
    network: ActorCritic
    num_updates: int
    steps_per_update: int
    init: Any  # key -> Runner
    update: Any  # (Runner, None) -> (Runner, metrics)  (a lax.scan body)
    run: Any  # (Runner, n: static int) -> (Runner, metrics stacked over n updates)
    rollout: Any  # (TrainState, key) -> (traj [T, N], final obs [N], final state [N])
    learn: Any  # (TrainState, (traj, adv, targets) flat [T*N], key) -> (TrainState, aux)


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


def _env_difficulties(config: PPOConfig) -> np.ndarray:
    if config.difficulty == "medium+hard":
        return np.where(np.arange(config.num_envs) % 2 == 0, 1, 2).astype(np.int32)
    return np.full(config.num_envs, kvjax.difficulty_index(config.difficulty), np.int32)


def make_optimizer(config: PPOConfig, num_updates: int) -> optax.GradientTransformation:
    """clip_by_global_norm then Adam with a linearly annealed (or constant) learning rate."""
    n = max(num_updates * config.update_epochs * config.num_minibatches, 1)
    lr = optax.linear_schedule(config.lr, 0.0, n) if config.anneal_lr else config.lr
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(lr, eps=1e-5))


def make_trainer(config: PPOConfig, env: KVCacheEnv | None = None) -> Trainer:
    """Build init / update / run for `config` (nothing is traced until they are called)."""
    env = env or KVCacheEnv()
    cfg = env.config
    T, N = cfg.episode_len, config.num_envs
    if N % config.num_minibatches:
        raise ValueError(f"num_envs {N} must be divisible by num_minibatches")
    steps_per_update = T * N
    num_updates = max(config.total_steps // steps_per_update, 1)
    env_params = env.default_params
    difficulties = jnp.asarray(_env_difficulties(config))
    network = ActorCritic(max_actions=cfg.max_actions, hidden=config.hidden,
                          attention=config.attention)
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
        keys = jax.random.split(key, N)
        return jax.vmap(lambda k, d: env.reset_env(k, env_params.replace(difficulty=d)))(
            keys, difficulties
        )

    def init(key: chex.PRNGKey) -> Runner:
        k_net, k_obs, key = jax.random.split(key, 3)
        obs, _ = env.reset_env(k_obs, env_params)
        dummy = jnp.zeros((cfg.max_actions,), jnp.int32)
        net_params = network.init(k_net, obs, dummy)
        ts = TrainState.create(apply_fn=network.apply, params=net_params, tx=tx)
        return Runner(ts, key, jnp.int32(0))

    def sample(net_params, obs, key):
        return network.apply(net_params, obs, key, method=ActorCritic.sample)

    def value(net_params, obs):
        return network.apply(net_params, obs, method=ActorCritic.encode)[2]

    def rollout(ts: TrainState, key):
        k_reset, k_act = jax.random.split(key)
        obs, state = shard(reset(k_reset))

        def step(carry, k):
            obs, state = carry
            keys = jax.random.split(k, N)
            action, logp, _, v = jax.vmap(sample, in_axes=(None, 0, 0))(ts.params, obs, keys)
            obs2, state2, r, term, trunc, _ = jax.vmap(
                env.step_env, in_axes=(0, 0, 0, None)
            )(keys, state, action, env_params)
            tr = Transition(obs, action, logp, v, r, term, trunc)
            return shard((obs2, state2)), tr

        # step_env does not auto-reset, so the last carried observation is the final step's
        # info["final_observation"] (only the last one is needed: no [T, N] copy of them).
        (final_obs, final_state), traj = jax.lax.scan(
            step, (obs, state), jax.random.split(k_act, T)
        )
        return traj, final_obs, final_state

    def loss_fn(net_params, batch: Transition, adv, targets):
        logits, v = jax.vmap(network.apply, in_axes=(None, 0, 0))(
            net_params, batch.obs, batch.action
        )
        d = dists(logits)
        logp = d.log_prob(batch.action).sum(-1)
        entropy = d.entropy().sum(-1).mean()
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
        ts, key, n = runner
        key, k_roll, k_perm = jax.random.split(key, 3)
        traj, final_obs, final_state = rollout(ts, k_roll)

        # V(s_{t+1}): the next step's value inside the episode; for the last (truncated) step
        # the value of info["final_observation"].
        last_v = jax.vmap(value, in_axes=(None, 0))(ts.params, final_obs)
        next_v = jnp.concatenate([traj.value[1:], last_v[None]], axis=0)
        adv, targets = gae(traj.reward, traj.value, next_v, traj.terminated, traj.truncated,
                           config.gamma, config.gae_lambda)

        flat = lambda x: x.reshape((T * N,) + x.shape[2:])  # noqa: E731
        ts, aux = learn(ts, jax.tree_util.tree_map(flat, (traj, adv, targets)), k_perm)
        rub = jax.vmap(rewards.rubric, in_axes=(0, None))(final_state, env_params)
        tier = final_state.tier
        metrics = {k: v.mean() for k, v in aux.items()}
        metrics.update({f"rubric/{k}": v.mean() for k, v in rub.items()})
        metrics["return"] = rub["total"].mean()
        for i, name in enumerate(kvjax.DIFFICULTIES[:3]):
            m = tier == i
            metrics[f"return/{name}"] = jnp.where(
                jnp.any(m), jnp.sum(jnp.where(m, rub["total"], 0.0)) / jnp.maximum(m.sum(), 1),
                jnp.nan,
            )
        metrics["failures"] = final_state.counters.failures.mean().astype(jnp.float32)
        metrics["invalid_actions"] = final_state.counters.invalid_actions.sum().astype(
            jnp.float32)
        return Runner(ts, key, n + 1), metrics

    def run(runner: Runner, n: int):
        return jax.lax.scan(update, runner, None, length=n)

    return Trainer(config, env, network, num_updates, steps_per_update, init, update, run,
                   rollout, learn)


def make_train(config: PPOConfig, env: KVCacheEnv | None = None):
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
    template = jax.vmap(trainer.init)(keys) if seeds else trainer.init(keys[0])
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
    template = trainer.init(jax.random.PRNGKey(0))
    seeds = checkpoint.seed_count(kind, state)
    if kind == "policy" or seeds is None:
        if seed_index not in (None, 0):
            raise ValueError(f"{path} holds one policy; seed_index must be 0 or omitted, got "
                             f"{seed_index}")
        if kind == "policy":
            return config, checkpoint.restore(template.train_state.params, state)
        return config, checkpoint.restore(template, state).train_state.params
    if seed_index is None and seeds == 1:
        seed_index = 0
    if isinstance(seed_index, bool) or not isinstance(seed_index, int) or not (
            0 <= seed_index < seeds):
        raise ValueError(f"{path} holds a training batch of {seeds} seeds: pick one with "
                         f"seed_index (--seed-index) in [0, {seeds - 1}], got {seed_index}")
    batched = jax.vmap(trainer.init)(jax.random.split(jax.random.PRNGKey(0), seeds))
    return config, policy_params(checkpoint.restore(batched, state), seed_index)


def make_policy(net_params, config: PPOConfig, greedy: bool = True, env: KVCacheEnv | None = None):
    """A kvjax policy `policy(key, state, params) -> int32[max_actions]` from trained weights
    (observes the state with `kvjax.observe`; greedy = the most likely action of each head)."""
    env = env or KVCacheEnv()
    network = ActorCritic(max_actions=env.config.max_actions, hidden=config.hidden,
                          attention=config.attention)

    def policy(key, state, params):
        obs = kvjax.observe(state, params)
        return network.apply(net_params, obs, key, greedy, method=ActorCritic.sample)[0]

    return policy


# -- CLI -------------------------------------------------------------------------------------

def _plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["env_steps"] for r in rows])
    ret = np.array([r["return"] for r in rows])  # [n, seeds]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for s in range(ret.shape[1]):
        ax[0].plot(steps, ret[:, s], lw=1, label=f"seed {s}")
    ax[0].set_xlabel("env steps (per seed)")
    ax[0].set_ylabel("mean episode rubric total")
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


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    ap = ArgumentParser(prog="python -m train.ppo", description=__doc__.split("\n")[0])
    ap.add_argument("--difficulty", default="hard", choices=TRAIN_DIFFICULTIES)
    ap.add_argument("--total-steps", type=positive_int, default=2_000_000,
                    help="env steps per seed")
    ap.add_argument("--num-envs", type=positive_int, default=PPOConfig.num_envs)
    ap.add_argument("--seeds", type=positive_int, default=None,
                    help="seeds trained at once (vmap); default 1, or the checkpoint's with "
                    "--resume (a different count is an error)")
    ap.add_argument("--seed", type=seed_arg, default=0, help="in [0, 2**32)")
    ap.add_argument("--lr", type=real_arg(0.0, lo_open=True), default=PPOConfig.lr)
    ap.add_argument("--epochs", type=positive_int, default=PPOConfig.update_epochs)
    ap.add_argument("--minibatches", type=positive_int, default=PPOConfig.num_minibatches)
    ap.add_argument("--ent-coef", type=real_arg(0.0), default=PPOConfig.ent_coef)
    ap.add_argument("--hidden", type=positive_int, default=PPOConfig.hidden)
    ap.add_argument("--attention", action="store_true")
    ap.add_argument("--log-every", type=positive_int, default=5, help="updates per jitted chunk")
    ap.add_argument("--cpu-devices", type=positive_int, default=1,
                    help="XLA CPU devices to shard the env batch over (e.g. the core count)")
    ap.add_argument("--time-limit", type=real_arg(0.0), default=0.0,
                    help="stop (and checkpoint) after this many minutes; 0 = none")
    ap.add_argument("--out", default=None, help="output dir (default runs/ppo-<difficulty>-...)")
    ap.add_argument("--resume", default=None,
                    help="training checkpoint to continue from (its config is used; only "
                    "--total-steps may change)")
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
                difficulty=a.difficulty, num_envs=a.num_envs, total_steps=a.total_steps,
                update_epochs=a.epochs, num_minibatches=a.minibatches, lr=a.lr,
                ent_coef=a.ent_coef, hidden=a.hidden, attention=a.attention,
            )
            runner = None
        trainer = make_trainer(config)
    except (ValueError, OSError) as e:
        return fail("python -m train.ppo", str(e))

    out = a.out or os.path.join(
        "runs", f"ppo-{config.difficulty}-{time.strftime('%Y%m%d-%H%M%S')}")
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
    best = int(np.argmax(final))
    save_policy(os.path.join(out, "policy.msgpack"), policy_params(runner, best), config)
    if rows:
        _plot(rows, os.path.join(out, "learning_curve.png"))
    summary = dict(out=out, updates=done, env_steps_per_seed=done * trainer.steps_per_update,
                   final_return=final.tolist(), best_seed=best,
                   steps_per_s=round(timed_steps / timed_s) if timed_s else None)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
