"""The thin base every kvjax environment shares: gymnax 1.0's `reset` / `step` contract, and
what the rollout engine (kvjax.rollout) asks of an env.

A subclass provides `name`, `default_params`, `reset_env(key, params) -> (obs, state)` and
`step_env(key, state, action, params) -> (obs, state, reward, terminated, truncated, info)`
with `info["final_observation"]`; the base adds the defaults for `params` and the auto-reset.
For the rollout engine it also provides `episodes` (whole episodes of a micro-batch of
scenarios: its package's rollout.py) and may refine `check_params` and `max_micro_batch`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np


def normalize_params(params: Any) -> Any:
    """Every field of a params dataclass as a strongly typed array - bool, int32 or float32 by
    its default's type (by the value's type where the default is not a Python scalar) - so a
    jitted function sees one signature whatever Python numbers a caller passed (no
    retracing). One rule for every env's params."""

    def typed(value: Any, default: Any) -> Any:
        kind = default if isinstance(default, bool | int | float) else value
        if isinstance(kind, bool | np.bool_):
            return jnp.asarray(value, jnp.bool_)
        if isinstance(kind, int | np.integer):
            return jnp.asarray(value, jnp.int32)
        if isinstance(kind, float | np.floating):
            return jnp.asarray(value, jnp.float32)
        return jnp.asarray(value)

    return params.replace(
        **{f.name: typed(getattr(params, f.name), f.default) for f in dataclasses.fields(params)}
    )


class Environment:
    """reset / step with auto-reset around a subclass's pure reset_env / step_env."""

    @property
    def name(self) -> str:
        raise NotImplementedError

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

    # -- what the rollout engine asks ------------------------------------------------------------
    def episodes(
        self,
        policy,
        key: chex.PRNGKey,
        index: chex.Array,
        params: Any,
        return_trajectory: bool = False,
    ) -> dict:
        """Whole episodes of `policy` for the scenarios `index` [n] (one micro-batch), scenario
        i from `kvjax.rollout.scenario_keys(key, i)`: a dict of per-scenario [n] results."""
        raise NotImplementedError

    def check_params(self, params: Any) -> None:
        """ValueError naming a field of concrete `params` outside its allowed range."""

    def max_micro_batch(self, backend: str) -> int | None:
        """The largest micro-batch worth vectorising on `backend` (None: no env-specific cap)."""
        return None
