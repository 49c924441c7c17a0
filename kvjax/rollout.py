"""Batched rollout engine: whole episodes for many scenarios as one jitted program, for any
kvjax environment.

    rollout(policy, key, num_scenarios, params, env=None, *, chunk_size=None,
            return_trajectory=False, progress=True, mesh=None) -> dict[str, np.ndarray]

Each scenario `i` gets its own key `jax.random.fold_in(key, i)` (split into a reset key and a
policy key; the policy's key at step t is `fold_in(policy_key, t)`: `scenario_keys`), so results
do not depend on the chunk size or on how many devices share the batch. One chunk runs
`jit(lax.map over micro-batches of env.episodes(policy, key, micro_batch, params))`: the env
package says what an episode is (kvjax/cache/rollout.py: `episode_len` steps, or the
batch-trailing layout for `@batch_polymorphic` policies; kvjax/serve/rollout.py: until the
clock reaches the horizon) and what each returns (numpy arrays of shape [num_scenarios] per
field). Chunks are padded to a fixed size (one compile per policy, env class, config and size;
`params` are traced), and a tqdm bar tracks them. A chunk's micro-batches are sharded over a
1-D `jax.sharding.Mesh` of all devices (`mesh=None`: every device of every process; after
`jax.distributed.initialize()` each process feeds its own part with
`jax.make_array_from_process_local_data` and the results are gathered).
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

from kvjax import registry
from kvjax.base import normalize_params
from kvjax.stats import Z95, mean_ci

DEFAULT_CHUNK = 4096
DEFAULT_MICRO, DEFAULT_MICRO_ACCEL = 1024, 16384
# Batch-trailing micro-batches on CPU: small enough that a step's arrays stay in L2 (value_aware
# on a 2-core EPYC: 256 ahead of 512 and 1024 in one same-process A/B, 128-1024 within noise in
# another).
DEFAULT_MICRO_TRAILING = 256
BATCH_AXIS = "batch"
MIN_MICRO_PER_DEVICE = 2  # see rollout(): one per device compiles a different loop


def scenario_keys(key: chex.PRNGKey, index: chex.Array) -> tuple[chex.Array, chex.Array]:
    """(reset key, policy key) of scenario `index` (independent of batching)."""
    k = jax.random.fold_in(key, index)
    k_reset, k_policy = jax.random.split(k)
    return k_reset, k_policy


@functools.lru_cache(maxsize=64)
def _compiled(policy, env_class: type, cfg: Any, return_trajectory: bool, mesh: Mesh | None):
    """jit of: indices [n, micro] -> lax.map over the n micro-batches of `env.episodes`.

    Keyed by the env's class and static config, not the env object, so every env made from the
    same config shares one program. Every micro-batch runs the same [micro]-shaped program
    whatever the chunk size and device count, so results are bit-identical across them (XLA
    may otherwise vectorise float sums differently for different batch shapes). With a mesh,
    `shard_map` gives each device its own micro-batches (a 1-D mesh over the batch axis)."""
    env = env_class(cfg)

    def local(key, idx, params):
        return jax.lax.map(
            lambda i: env.episodes(policy, key, i, params, return_trajectory), idx
        )

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
    DEFAULT_MICRO_ACCEL on accelerators, and at the env's own cap (`env.max_micro_batch`, e.g.
    kv-serve-v0's [S, S] order matrices that should stay in a core's cache). Depends on nothing
    else, so results do not depend on the device count."""
    if jax.default_backend() != "cpu":
        cap = DEFAULT_MICRO_ACCEL
    elif getattr(policy, "batch_polymorphic", False):
        cap = DEFAULT_MICRO_TRAILING
    else:
        cap = DEFAULT_MICRO
    env_cap = env.max_micro_batch(jax.default_backend()) if env is not None else None
    if env_cap:
        cap = max(1, min(cap, env_cap))
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
    params: Any,
    env: Any = None,
    *,
    chunk_size: int | None = None,
    return_trajectory: bool = False,
    progress: bool = True,
    mesh: Mesh | None = None,
    micro_batch: int | None = None,
) -> dict[str, Any]:
    """Run `num_scenarios` whole episodes of `policy` and return per-scenario results (numpy).

    `policy(key, state, params) -> action` (see `kvjax.make_policy`); `env=None` is the default
    env (kv-cache-v0 with its default config; kvjax.registry.DEFAULT_ENV_ID). Scenarios run in
    micro-batches of `micro_batch` (default: `default_micro_batch(num_scenarios, policy)`), the
    unit of vectorisation; a chunk (default 4096 scenarios, rounded up to a whole number of
    micro-batches per device) is one device call, which bounds memory; the last is padded.
    `mesh`: a 1-D Mesh over the batch axis (default: all devices). For a given micro-batch size,
    results are bit-identical for any chunk size and device count."""
    env = env or registry.make(registry.DEFAULT_ENV_ID)[0]
    check_rollout_args(policy, key, num_scenarios, params, env, chunk_size, micro_batch)
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
    fn = _compiled(policy, type(env), env.config, bool(return_trajectory),
                   mesh if n_dev > 1 else None)
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
    from kvjax.validation import INT32_MAX

    if not callable(policy):
        raise ValueError(f"policy must be callable (key, state, params) -> action, got "
                         f"{type(policy).__name__}")
    for name, v in (("num_scenarios", num_scenarios), ("chunk_size", chunk_size),
                    ("micro_batch", micro_batch)):
        if v is None and name != "num_scenarios":
            continue
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or not 1 <= v <= INT32_MAX:
            raise ValueError(f"{name} must be an int in [1, {INT32_MAX}], got {v!r}")
    env.check_params(params)
    if np.shape(key) not in ((2,), ()):
        raise ValueError(f"key must be one PRNG key (shape (2,) or a typed key), got shape "
                         f"{np.shape(key)}")


def summarize_results(results: dict[str, Any], z: float = Z95) -> dict[str, dict[str, float]]:
    """Per numeric field: mean and the half-width of its normal-approximation 95% interval
    (`kvjax.stats.mean_ci`); trajectories and labels (`tier`, `regime`) are left out."""
    out = {}
    for k, v in results.items():
        if k == "trajectory" or k in ("tier", "regime"):
            continue
        mean, ci95 = mean_ci(v, z)
        out[k] = {"mean": mean, "ci95": ci95}
    return out


__all__ = [
    "default_mesh",
    "default_micro_batch",
    "normalize_params",
    "rollout",
    "scenario_keys",
    "summarize_results",
]
