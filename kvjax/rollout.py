"""Batched rollout engine: whole episodes for many scenarios as one jitted program.

    rollout(policy, key, num_scenarios, params, env=None, *, chunk_size=None,
            return_trajectory=False, progress=True, mesh=None) -> dict[str, np.ndarray]

Each scenario `i` gets its own key `jax.random.fold_in(key, i)` (split into a reset key and a
policy key; the policy's key at step t is `fold_in(policy_key, t)`), so results do not depend on
the chunk size or on how many devices share the batch. One chunk runs
`jit(lax.map over micro-batches of vmap(reset + lax.scan(step_env over episode_len steps)))`;
for policies marked `@kvjax.cache.policies.batch_polymorphic` the micro-batch is instead reset with
vmap and then stepped in the batch-trailing layout without vmap (`episodes_trailing`: the same
public `env.step_env`, faster on CPU; results agree with the vmapped path to float32 rounding);
chunks are padded to a fixed size (one compile per policy, config and size; `params`, including
the difficulty, are traced), and a tqdm bar tracks them. A chunk's micro-batches are sharded
over a 1-D `jax.sharding.Mesh` of all devices (`mesh=None`: every device of every process;
after `jax.distributed.initialize()` each process feeds its own part with
`jax.make_array_from_process_local_data` and the results are gathered).

Any kvjax environment: kv-cache-v0 episodes are `episode_len` steps (`lax.scan`); kv-serve-v0
episodes run until truncation (the clock reaches the horizon; `lax.while_loop`, at most
`max_steps`) and return `kvjax.serve.episode_metrics` of the final state.

For kv-cache-v0, returns numpy arrays of shape [num_scenarios]: every rubric component, the
four metrics and `total` (`kvjax.cache.rewards.rubric` of the final state), plus `tier`, `regime`,
`invalid_actions`, `completed`, `evictions`, `compressions`, `swaps`, `preemptions`. With
`return_trajectory=True` also `trajectory`: a dict of [num_scenarios, T, ...] arrays - `action`
[.., A], `reward`, `usage_peak`, `failures`, `pending` (queue length after the step).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from kvjax.cache.env import KVCacheEnv
from kvjax.cache.rewards import rubric
from kvjax.cache.types import EnvConfig, EnvParams, EnvState

DEFAULT_CHUNK = 4096
DEFAULT_MICRO, DEFAULT_MICRO_ACCEL = 1024, 16384
# Batch-trailing micro-batches on CPU: small enough that a step's arrays stay in L2 (value_aware
# on a 2-core EPYC: 256 ahead of 512 and 1024 in one same-process A/B, 128-1024 within noise in
# another).
DEFAULT_MICRO_TRAILING = 256
BATCH_AXIS = "batch"
MIN_MICRO_PER_DEVICE = 2  # see rollout(): one per device compiles a different loop
EXTRA_FIELDS = ("invalid_actions", "completed", "evictions", "compressions", "swaps",
                "preemptions", "queue_timeouts", "queue_overflows")


def normalize_params(params: EnvParams) -> EnvParams:
    """Python scalars -> float32 / int32 arrays, so a jitted rollout sees one signature whatever
    the caller passed (no retracing between tiers)."""

    def conv(x):
        if isinstance(x, bool | np.bool_):
            return jnp.asarray(x, jnp.bool_)
        if isinstance(x, int | np.integer):
            return jnp.asarray(x, jnp.int32)
        if isinstance(x, float | np.floating):
            return jnp.asarray(x, jnp.float32)
        return jnp.asarray(x)

    return jax.tree_util.tree_map(conv, params)


def scenario_keys(key: chex.PRNGKey, index: chex.Array) -> tuple[chex.Array, chex.Array]:
    """(reset key, policy key) of scenario `index` (independent of batching)."""
    k = jax.random.fold_in(key, index)
    k_reset, k_policy = jax.random.split(k)
    return k_reset, k_policy


def _record(action: chex.Array, reward: chex.Array, nxt: EnvState) -> dict:
    """One trajectory row (any batch layout; `action` already in the output's layout)."""
    return dict(
        action=action,
        reward=reward,
        usage_peak=nxt.usage_peak,
        failures=nxt.counters.failures,
        pending=jnp.sum(nxt.pending.valid, axis=0).astype(jnp.int32),
    )


def _results(final: EnvState, params: EnvParams) -> dict[str, Any]:
    """Per-scenario results of final states: the rubric, tier, regime and EXTRA_FIELDS."""
    out = dict(rubric(final, params))
    out["tier"] = final.tier
    out["regime"] = final.regime
    for f in EXTRA_FIELDS:
        out[f] = getattr(final.counters, f)
    return out


def episode(
    policy, env: KVCacheEnv, key: chex.PRNGKey, index: chex.Array, params: EnvParams,
    return_trajectory: bool = False,
) -> dict[str, Any]:
    """One scenario's episode (unbatched): reset, then `episode_len` policy + step_env steps."""
    k_reset, k_policy = scenario_keys(key, index)
    _, state = env.reset_env(k_reset, params)

    def step(st: EnvState, t):
        action = policy(jax.random.fold_in(k_policy, t), st, params)
        _, nxt, reward, _, _, _ = env.step_env(k_policy, st, action, params)
        return nxt, _record(action, reward, nxt) if return_trajectory else None

    final, traj = jax.lax.scan(step, state, jnp.arange(env.config.episode_len))
    out = _results(final, params)
    if return_trajectory:
        out["trajectory"] = traj
    return out


def env_for(cfg):
    """The environment a static config describes (configs key the compile cache)."""
    if isinstance(cfg, EnvConfig):
        return KVCacheEnv(cfg)
    from kvjax.serve.env import ServeEnv

    return ServeEnv(cfg)


def episode_until_truncated(policy, env, key: chex.PRNGKey, index: chex.Array, params):
    """One scenario's episode (unbatched) for an env whose episodes end at a variable step
    (kv-serve-v0): reset, then `play_until_truncated`. Returns `env.metrics(final_state,
    params)`."""
    k_reset, k_policy = scenario_keys(key, index)
    _, state = env.reset_env(k_reset, params)
    return env.metrics(play_until_truncated(policy, env, state, k_policy, params), params)


def play_until_truncated(policy, env, state, k_policy: chex.PRNGKey, params):
    """policy + step_env from `state` until terminated or truncated, at most `max_steps`; the
    policy's key at step t is `fold_in(k_policy, t)`. Under vmap the loop runs until every
    scenario is done, finished ones frozen. Returns the final state."""

    def cond(carry):
        t, _, done = carry
        return ~done & (t < env.config.max_steps)

    def body(carry):
        t, st, _ = carry
        action = policy(jax.random.fold_in(k_policy, t), st, params)
        _, nxt, _, terminated, truncated, _ = env.step_env(k_policy, st, action, params)
        return t + 1, nxt, terminated | truncated

    _, final, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), state, jnp.bool_(False)))
    return final


def to_trailing(tree):
    """Batch-leading pytree [n, ...] -> the dynamics' batch-trailing layout [..., n]."""
    return jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, 0, -1), tree)


def episodes_trailing(
    policy, env: KVCacheEnv, key: chex.PRNGKey, index: chex.Array, params: EnvParams,
    return_trajectory: bool = False,
) -> dict[str, Any]:
    """`episode` for a whole batch `index` [n] at once, for batch-polymorphic policies.

    Resets are vmapped as usual; the states are then moved to the batch-trailing layout (slots
    [S, n], queue [P, n], ...) and the policy and `env.step_env` run on the whole batch
    directly, without vmap: reductions over slots become vector adds across scenarios,
    which XLA's CPU backend runs several times faster than the [n, S] layout vmap gives. Same
    keys and the same maths as `episode`; results agree to float32 rounding (sums over slots
    may associate differently)."""
    cfg = env.config
    k_reset, k_policy = jax.vmap(scenario_keys, in_axes=(None, 0))(key, index)
    _, state = jax.vmap(env.reset_env, in_axes=(0, None))(k_reset, params)
    state = to_trailing(state)
    n, A = index.shape[0], cfg.max_actions

    def step(st: EnvState, t):
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(k_policy, t)
        action = policy(keys, st, params)
        chex.assert_shape(action, (A, n))
        # The public step on the batch-trailing state (its observation is unused, so XLA
        # drops it): the same action check, dynamics and reward as `episode`'s.
        _, nxt, reward, _, _, _ = env.step_env(keys, st, action, params)
        return nxt, _record(action.T, reward, nxt) if return_trajectory else None

    final, traj = jax.lax.scan(step, state, jnp.arange(cfg.episode_len))
    out = _results(final, params)
    if return_trajectory:
        out["trajectory"] = jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1), traj)
    return out


@functools.lru_cache(maxsize=64)
def _compiled(policy, cfg: EnvConfig, return_trajectory: bool, mesh: Mesh | None):
    """jit of: indices [n, micro] -> lax.map over the n micro-batches of vmap(episode).

    Every micro-batch runs the same [micro]-shaped program whatever the chunk size and device
    count, so results are bit-identical across them (XLA may otherwise vectorise float sums
    differently for different batch shapes). With a mesh, `shard_map` gives each device its
    own micro-batches (a 1-D mesh over the batch axis)."""
    env = env_for(cfg)
    if not isinstance(env, KVCacheEnv):
        if return_trajectory:
            raise ValueError(f"return_trajectory is not supported for {env.name} (episodes "
                             "have a variable number of steps)")
        one = jax.vmap(lambda key, idx, params: episode_until_truncated(
            policy, env, key, idx, params), in_axes=(None, 0, None))
    elif getattr(policy, "batch_polymorphic", False):
        def one(key, idx, params):
            return episodes_trailing(policy, env, key, idx, params, return_trajectory)
    else:
        one = jax.vmap(
            lambda key, idx, params: episode(policy, env, key, idx, params, return_trajectory),
            in_axes=(None, 0, None),
        )

    def local(key, idx, params):
        return jax.lax.map(lambda i: one(key, i, params), idx)

    if mesh is None:
        return jax.jit(local)
    spec = P(BATCH_AXIS)
    # check_vma=False: the env's internal scans start from replicated constants (the check
    # would ask for pcasts inside the core); every output is per-scenario, hence sharded.
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), spec, P()), out_specs=spec,
                            check_vma=False)
    return jax.jit(sharded)


def default_micro_batch(num_scenarios: int, policy=None, env=None) -> int:
    """Scenarios vectorised together: the next power of two >= num_scenarios, capped at
    DEFAULT_MICRO (1,024 on CPU; DEFAULT_MICRO_TRAILING for a batch-polymorphic `policy`) or
    DEFAULT_MICRO_ACCEL on accelerators, and for kv-serve-v0 on CPU at 8,192 / max_requests
    (its step holds [S, S] order matrices, which then stay in a core's cache: toy at batch
    4,096 on two cores ran 168-184K engine iterations/s with micro-batches of 64 or 128 against
    136K with 256 and 105K with 512, docs/serving-benchmarks.md). Depends on nothing else, so
    results do not depend on the device count."""
    if jax.default_backend() != "cpu":
        cap = DEFAULT_MICRO_ACCEL
    elif getattr(policy, "batch_polymorphic", False):
        cap = DEFAULT_MICRO_TRAILING
    else:
        cap = DEFAULT_MICRO
    rows = getattr(getattr(env, "config", None), "max_requests", None)
    if rows:
        cap = max(1, min(cap, (8192 if jax.default_backend() == "cpu" else 2**20) // rows))
    return int(min(cap, 2 ** math.ceil(math.log2(max(int(num_scenarios), 1)))))


def default_mesh() -> Mesh:
    """A 1-D mesh over every device of every process (the batch axis)."""
    return Mesh(np.array(jax.devices()), (BATCH_AXIS,))


def _place(indices: np.ndarray, mesh: Mesh) -> jax.Array:
    """Global int32 index array sharded over the mesh; each process supplies its own part."""
    sharding = NamedSharding(mesh, P(BATCH_AXIS))
    if jax.process_count() == 1:
        return jax.device_put(indices, sharding)
    n = jax.process_count()
    per = indices.shape[0] // n  # micro-batches per process (a multiple of its devices)
    local = indices[jax.process_index() * per:(jax.process_index() + 1) * per]
    return jax.make_array_from_process_local_data(sharding, local, indices.shape)


def _fetch(tree):
    """Device arrays -> host numpy (gathering across processes when there are several)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree_util.tree_map(np.asarray, tree)


def rollout(
    policy,
    key: chex.PRNGKey,
    num_scenarios: int,
    params: EnvParams,
    env: KVCacheEnv | None = None,
    *,
    chunk_size: int | None = None,
    return_trajectory: bool = False,
    progress: bool = True,
    mesh: Mesh | None = None,
    micro_batch: int | None = None,
) -> dict[str, Any]:
    """Run `num_scenarios` whole episodes of `policy` and return per-scenario results (numpy).

    `policy(key, state, params) -> int32[A]` (see kvjax.cache.policies). Scenarios run in
    micro-batches of `micro_batch` (default: `default_micro_batch(num_scenarios, policy)`), the
    unit of vectorisation; a chunk (default 4096 scenarios, rounded up to a whole number of
    micro-batches per device) is one device call, which bounds memory; the last is padded.
    `mesh`: a 1-D Mesh over the batch axis (default: all devices). For a given micro-batch size,
    results are bit-identical for any chunk size and device count."""
    check_rollout_args(policy, key, num_scenarios, params, env, chunk_size, micro_batch)
    env = env or KVCacheEnv()
    mesh = mesh or default_mesh()
    n_dev = mesh.devices.size
    micro = int(micro_batch or default_micro_batch(num_scenarios, policy, env))
    chunk = int(chunk_size or max(micro, min(DEFAULT_CHUNK, int(num_scenarios))))
    if chunk < 1 or micro < 1:
        raise ValueError(f"chunk_size and micro_batch must be >= 1, got {chunk_size}, "
                         f"{micro_batch}")
    # Micro-batches per call: a multiple of the device count, and at least two per device - XLA
    # compiles a one-iteration lax.map differently (the body inlined and fused with its
    # surroundings), which moved float results in the last bit between device counts; with
    # >= 2 per device every device count runs the same loop body, bit for bit.
    per_chunk = max(math.ceil(math.ceil(chunk / micro) / n_dev), MIN_MICRO_PER_DEVICE) * n_dev
    chunk = per_chunk * micro
    fn = _compiled(policy, env.config, bool(return_trajectory), mesh if n_dev > 1 else None)
    params = normalize_params(params)
    key = jnp.asarray(key)
    parts = []
    n_chunks = math.ceil(num_scenarios / chunk)
    for c in tqdm(range(n_chunks), desc=getattr(policy, "__name__", "rollout"),
                  disable=not progress or n_chunks < 2, leave=False):
        idx = np.arange(c * chunk, (c + 1) * chunk, dtype=np.int32).reshape(per_chunk, micro)
        idx_dev = _place(idx, mesh) if n_dev > 1 else jnp.asarray(idx)
        out = jax.tree_util.tree_map(
            lambda x: x.reshape((chunk,) + x.shape[2:]), _fetch(fn(key, idx_dev, params))
        )
        take = min(chunk, num_scenarios - c * chunk)
        parts.append(jax.tree_util.tree_map(lambda x, take=take: x[:take], out))
    if len(parts) == 1:
        return parts[0]
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *parts)


def check_rollout_args(policy, key, num_scenarios, params, env, chunk_size, micro_batch) -> None:
    """ValueError naming the argument and its allowed values (see `rollout`)."""
    from kvjax.cache.types import PARAM_SPECS
    from kvjax.validation import INT32_MAX, check_fields

    if not callable(policy):
        raise ValueError(f"policy must be callable (key, state, params) -> int32[A], got "
                         f"{type(policy).__name__}")
    for name, v in (("num_scenarios", num_scenarios), ("chunk_size", chunk_size),
                    ("micro_batch", micro_batch)):
        if v is None and name != "num_scenarios":
            continue
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or not 1 <= v <= INT32_MAX:
            raise ValueError(f"{name} must be an int in [1, {INT32_MAX}], got {v!r}")
    if isinstance(params, EnvParams):
        check_fields("EnvParams", params, PARAM_SPECS)  # also values set by tree_map & co.
    if np.shape(key) not in ((2,), ()):
        raise ValueError(f"key must be one PRNG key (shape (2,) or a typed key), got shape "
                         f"{np.shape(key)}")


def summarize_results(results: dict[str, Any], z: float = 1.96) -> dict[str, dict[str, float]]:
    """Per field: mean and the half-width of its normal-approximation 95% interval."""
    out = {}
    for k, v in results.items():
        if k == "trajectory" or k in ("tier", "regime"):
            continue
        x = np.asarray(v, np.float64)
        sem = x.std(ddof=1) / math.sqrt(x.size) if x.size > 1 else 0.0
        out[k] = {"mean": float(x.mean()), "ci95": float(z * sem)}
    return out


__all__ = [
    "default_mesh",
    "default_micro_batch",
    "env_for",
    "episode_until_truncated",
    "play_until_truncated",
    "episode",
    "normalize_params",
    "rollout",
    "episodes_trailing",
    "scenario_keys",
    "summarize_results",
    "to_trailing",
]
