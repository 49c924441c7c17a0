"""kv-serve-v0's episodes for the rollout engine (kvjax.rollout): each runs until truncation
(the clock reaches the horizon; `lax.while_loop`, at most `max_steps` env steps) and returns
`env.metrics` (`kvjax.serve.episode_metrics`) of its final state."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from kvjax.rollout import scenario_keys


def episodes(
    policy, env, key: chex.PRNGKey, index: chex.Array, params, return_trajectory: bool = False
) -> dict[str, Any]:
    """The episodes of the micro-batch `index` [n], vmapped."""
    if return_trajectory:
        raise ValueError(
            f"return_trajectory is not supported for {env.name} (episodes "
            "have a variable number of steps)"
        )
    return jax.vmap(lambda i: episode_until_truncated(policy, env, key, i, params))(index)


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
