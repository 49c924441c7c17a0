"""kvjax behind gymnax's interface (needs the `gymnax` extra; registered by `import kvjax`).

* `kv-cache-v0`: `kvjax.KVCacheEnv` itself (structured observation, `max_actions` action ids
  per step), with `difficulty` as a make() argument:
  `env, params = gymnax.make("kv-cache-v0", difficulty="hard")`.
* `kv-cache-flat-v0` (`KVCacheFlatEnv`): a `gymnax.environments.environment.Environment` for
  stock single-action agents (PureJaxRL and gymnax's wrappers):

  - action: `spaces.Discrete(1 + 3 * max_seqs)`, one action id per step (0 = keep, else
    `1 + kind * max_seqs + slot`, see `kvjax.encode_action`); the step's other action entries
    are keep. An id that names nothing valid is a counted no-op, as in kv-cache-v0.
  - observation: `spaces.Box` float32 vector of `flat_size(config)` =
    `max_seqs * 19 + 12 + (1 + 3 * max_seqs)` entries: the per-slot features (row-major,
    `observations.SLOT_FEATURES`), the global features (`GLOBAL_FEATURES`) and, last, the
    action mask as 0/1 (`num_actions` entries; also `info["action_mask"]` as bool).
  - reward: the change of the rubric total (the episode return is the final rubric total);
    never terminated, truncated after `episode_len` steps (gymnax's `step` auto-resets and
    returns the pre-reset observation in `info["final_observation"]`).

The PureJaxRL wrapper stack runs with only the name changed:
`LegacyStepAPIWrapper(LogWrapper(FlattenObservationWrapper(gymnax.make("kv-cache-flat-v0")[0])))`
(tests/cache/test_gymnax_env.py runs a PureJaxRL-style PPO loop on it).
"""

from __future__ import annotations

from typing import Any

import chex
import jax.numpy as jnp
from gymnax.environments import environment, spaces

from kvjax.cache import observations
from kvjax.cache.env import KVCacheEnv, difficulty_index
from kvjax.cache.types import EnvConfig, EnvParams, EnvState


def flat_size(config: EnvConfig) -> int:
    """Length of a kv-cache-flat-v0 observation vector."""
    return (
        config.max_seqs * len(observations.SLOT_FEATURES)
        + len(observations.GLOBAL_FEATURES)
        + config.num_action_ids
    )


def flatten_observation(obs: observations.Observation) -> chex.Array:
    """Observation -> [slots.ravel(), globals, action_mask as 0/1] (float32, 1-D)."""
    return jnp.concatenate(
        [obs.slots.reshape(-1), obs.globals, obs.action_mask.astype(jnp.float32)]
    ).astype(jnp.float32)


class TieredKVCacheEnv(KVCacheEnv):
    """`KVCacheEnv` whose `default_params` carry a difficulty (what gymnax.make returns)."""

    def __init__(self, difficulty: str = "all", config: EnvConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self._difficulty = difficulty_index(difficulty)

    @property
    def default_params(self) -> EnvParams:
        return EnvParams(difficulty=self._difficulty)


class KVCacheFlatEnv(environment.Environment):
    """kv-cache-v0 with one Discrete action per step and a flat Box observation."""

    def __init__(self, difficulty: str = "all", config: EnvConfig | None = None, **overrides):
        super().__init__()
        self.core = TieredKVCacheEnv(difficulty, config, **overrides)
        self.config = self.core.config

    @property
    def default_params(self) -> EnvParams:
        return self.core.default_params

    @property
    def name(self) -> str:
        return "kv-cache-flat-v0"

    @property
    def num_actions(self) -> int:
        return self.config.num_action_ids

    def action_space(self, params: EnvParams | None = None) -> spaces.Discrete:
        return spaces.Discrete(self.num_actions)

    def observation_space(self, params: EnvParams | None = None) -> spaces.Box:
        return spaces.Box(-jnp.inf, jnp.inf, (flat_size(self.config),), jnp.float32)

    def reset_env(self, key: chex.PRNGKey, params: EnvParams) -> tuple[chex.Array, EnvState]:
        obs, state = self.core.reset_env(key, params)
        return flatten_observation(obs), state

    def step_env(
        self, key: chex.PRNGKey, state: EnvState, action: Any, params: EnvParams
    ) -> tuple[chex.Array, EnvState, chex.Array, chex.Array, dict[str, Any]]:
        action = jnp.asarray(action)
        if action.shape != ():
            raise ValueError(
                f"kv-cache-flat-v0 takes one action id per step (a scalar in "
                f"[0, {self.num_actions})), got shape {action.shape}"
            )
        ids = (
            jnp.zeros((self.config.max_actions,), jnp.int32)
            .at[0]
            .set(
                jnp.where((action >= 0) & (action < self.num_actions), action, -1).astype(jnp.int32)
            )
        )
        obs, nxt, reward, terminated, _, info = self.core.step_env(key, state, ids, params)
        info = {
            "invalid_actions": info["invalid_actions"],
            "failures": info["failures"],
            "action_mask": obs.action_mask,
        }
        return flatten_observation(obs), nxt, reward, terminated, info

    def is_truncated(self, state: EnvState, params: EnvParams) -> chex.Array:
        return state.time >= self.config.episode_len

    def is_terminated(self, state: EnvState, params: EnvParams) -> chex.Array:
        return jnp.bool_(False)

    def get_obs(self, state: EnvState, params: EnvParams | None = None, key=None) -> chex.Array:
        return flatten_observation(observations.observe(state, params or self.default_params))


def make_env(env_id: str, **kwargs: Any):
    """The factory behind `gymnax.make(env_id, **kwargs)` (kwargs: difficulty, config
    overrides)."""
    if env_id == "kv-cache-v0":
        return TieredKVCacheEnv(**kwargs)
    if env_id == "kv-cache-flat-v0":
        return KVCacheFlatEnv(**kwargs)
    raise ValueError(f"unknown env id {env_id!r}; allowed: ['kv-cache-v0', 'kv-cache-flat-v0']")


__all__ = ["KVCacheFlatEnv", "TieredKVCacheEnv", "flat_size", "flatten_observation", "make_env"]
