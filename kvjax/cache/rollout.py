"""kv-cache-v0's episodes for the rollout engine (kvjax.rollout): `episode_len` policy + step
steps per scenario (`lax.scan`), vmapped over a micro-batch, or stepped in the batch-trailing
layout for `@batch_polymorphic` policies (`episodes_trailing`: faster on CPU, the same maths).

Results per scenario: every rubric component, the four metrics and `total`
(`kvjax.cache.rewards.rubric` of the final state), plus `tier`, `regime` and EXTRA_FIELDS; with
`return_trajectory=True` also `trajectory`: a dict of [n, T, ...] arrays - `action` [.., A],
`reward`, `usage_peak`, `failures`, `pending` (queue length after the step).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from kvjax.cache.rewards import rubric
from kvjax.cache.types import EnvParams, EnvState
from kvjax.rollout import scenario_keys

EXTRA_FIELDS = ("invalid_actions", "completed", "evictions", "compressions", "swaps",
                "preemptions", "queue_timeouts", "queue_overflows")


def episodes(policy, env, key: chex.PRNGKey, index: chex.Array, params: EnvParams,
             return_trajectory: bool = False) -> dict[str, Any]:
    """The episodes of the micro-batch `index` [n]: batch-trailing for a batch-polymorphic
    policy, else `episode` under vmap."""
    if getattr(policy, "batch_polymorphic", False):
        return episodes_trailing(policy, env, key, index, params, return_trajectory)
    return jax.vmap(
        lambda i: episode(policy, env, key, i, params, return_trajectory)
    )(index)


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
    policy, env, key: chex.PRNGKey, index: chex.Array, params: EnvParams,
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


def to_trailing(tree):
    """Batch-leading pytree [n, ...] -> the dynamics' batch-trailing layout [..., n]."""
    return jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, 0, -1), tree)


def episodes_trailing(
    policy, env, key: chex.PRNGKey, index: chex.Array, params: EnvParams,
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
