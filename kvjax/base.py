"""The thin base every kvjax environment shares: gymnax 1.0's `reset` / `step` contract.

A subclass provides `default_params`, `reset_env(key, params) -> (obs, state)` and
`step_env(key, state, action, params) -> (obs, state, reward, terminated, truncated, info)`
with `info["final_observation"]`; the base adds the defaults for `params` and the auto-reset.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp


class Environment:
    """reset / step with auto-reset around a subclass's pure reset_env / step_env."""

    @property
    def default_params(self) -> Any:
        raise NotImplementedError

    def reset_env(self, key: chex.PRNGKey, params: Any):
        raise NotImplementedError

    def step_env(self, key: chex.PRNGKey, state: Any, action: Any, params: Any):
        raise NotImplementedError

    def reset(self, key: chex.PRNGKey, params: Any = None):
        return self.reset_env(key, self.default_params if params is None else params)

    def step(self, key: chex.PRNGKey, state: Any, action: Any, params: Any = None):
        """Step with auto-reset on episode end; `info["final_observation"]` is pre-reset."""
        params = self.default_params if params is None else params
        obs_st, state_st, reward, terminated, truncated, info = self.step_env(
            key, state, action, params
        )
        obs_re, state_re = self.reset_env(key, params)
        done = terminated | truncated

        def pick(a, b):
            return jax.tree_util.tree_map(lambda x, y: jnp.where(done, x, y), a, b)

        return pick(obs_re, obs_st), pick(state_re, state_st), reward, terminated, truncated, info
