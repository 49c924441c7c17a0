"""`KVCacheEnv`: the gymnax-1.0-style environment around the pure dynamics."""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from kvjax import spaces
from kvjax.base import Environment
from kvjax.cache import dynamics, observations, rewards, scenarios
from kvjax.cache import rollout as cache_rollout
from kvjax.cache.types import (
    ACTION_KINDS,
    DIFFICULTIES,
    PARAM_SPECS,
    EnvConfig,
    EnvParams,
    EnvState,
)
from kvjax.validation import batch_layout, check_fields, check_single


class KVCacheEnv(Environment):
    """GPU KV-cache pressure in LLM serving, one scenario per state (vmap for batches).

    Observation: `observations.Observation` - per-slot features [S, 19], global features [12]
        and `action_mask` [1 + 3S] (see observations.SLOT_FEATURES / GLOBAL_FEATURES).
    Action: int32 [max_actions]; each entry 0 = keep, 1 + k * S + slot for k in
        (evict, compress, swap_to_cpu); applied in order within the step. An entry that names
        nothing valid (empty slot, already int4, already swapped, out of range) is a counted no-op.
    Reward: the change of the weighted rubric total (rewards.rubric), so an episode's return is
        its final rubric total.
    Termination: never; episodes are truncated after `episode_len` steps. `step` auto-resets
        and keeps the pre-reset observation in `info["final_observation"]`.
    """

    def __init__(self, config: EnvConfig | None = None, **overrides: int):
        cfg = config or EnvConfig()
        if overrides:
            allowed = {f for f in EnvConfig.__dataclass_fields__}
            unknown = set(overrides) - allowed
            if unknown:
                raise ValueError(f"unknown config {sorted(unknown)}; allowed: {sorted(allowed)}")
            cfg = EnvConfig(**{**cfg.__dict__, **overrides})
        for name, value in cfg.__dict__.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if cfg.max_arrivals > cfg.max_pending:
            raise ValueError("max_arrivals must be <= max_pending")
        self.config = cfg

    # -- parameters and spaces ---------------------------------------------------------------
    @property
    def default_params(self) -> EnvParams:
        return EnvParams()

    @property
    def name(self) -> str:
        return "kv-cache-v0"

    @property
    def num_actions(self) -> int:
        return self.config.num_action_ids

    def action_space(self, params: EnvParams | None = None) -> spaces.MultiDiscrete:
        return spaces.MultiDiscrete(self.num_actions, (self.config.max_actions,))

    def observation_space(self, params: EnvParams | None = None) -> spaces.Dict:
        S = self.config.max_seqs
        return spaces.Dict(
            {
                "slots": spaces.Box(-np.inf, np.inf, (S, len(observations.SLOT_FEATURES))),
                "globals": spaces.Box(-np.inf, np.inf, (len(observations.GLOBAL_FEATURES),)),
                "action_mask": spaces.Box(0, 1, (self.num_actions,), jnp.bool_),
            }
        )

    # -- core API ----------------------------------------------------------------------------
    def reset_env(self, key: chex.PRNGKey, params: EnvParams) -> tuple[Any, EnvState]:
        _, state = self._reset_state(key, params)
        return self.get_obs(state, params), state

    def step_env(
        self, key: chex.PRNGKey, state: EnvState, action: chex.Array, params: EnvParams
    ) -> tuple[Any, EnvState, chex.Array, chex.Array, chex.Array, dict[str, Any]]:
        """One step without auto-reset (key unused: the scenario holds its own future).

        `state` is one scenario (`jax.vmap` this for a batch) or a whole batch in the
        batch-trailing layout (slots [S, n], ..., `action` [max_actions, n]; what the rollout
        engine steps for `@batch_polymorphic` policies): the same action check, dynamics,
        reward and info either way. For a batch-trailing state the observation is the
        batch-leading one `jax.vmap(step_env)` would return (the state stays trailing)."""
        check_single(state, "env.step_env", trailing_ok=True,
                     hint="map it over the batch with jax.vmap, e.g. "
                     "jax.vmap(env.step_env, in_axes=(0, 0, 0, None))")
        action = self._check_action(action, jnp.shape(state.time))
        next_state = dynamics.step_dynamics(state, action, params, self.config)
        reward = rewards.total(next_state, params) - rewards.total(state, params)
        obs = self.get_obs(next_state, params)
        truncated = next_state.time >= self.config.episode_len
        info = {
            "final_observation": obs,
            "invalid_actions": next_state.counters.invalid_actions
            - state.counters.invalid_actions,
            "failures": next_state.counters.failures - state.counters.failures,
        }
        return obs, next_state, reward, jnp.zeros_like(truncated), truncated, info

    def step(
        self,
        key: chex.PRNGKey,
        state: EnvState,
        action: chex.Array,
        params: EnvParams | None = None,
    ) -> tuple[Any, EnvState, chex.Array, chex.Array, chex.Array, dict[str, Any]]:
        """`step_env`, then auto-reset at the episode's end (gymnax's contract, as
        `base.Environment.step`), with the same results and two savings: the state is picked
        first and observed once (`info["final_observation"]`, the pre-reset observation, is
        computed only if it is used), and under `jax.vmap` a batch in which no scenario is done
        skips the reset and the pick (`_auto_reset`)."""
        params = self.default_params if params is None else params
        check_single(state, "env.step", hint="map it over the batch with jax.vmap, e.g. "
                     "jax.vmap(env.step, in_axes=(0, 0, 0, None))")
        _, state_st, reward, terminated, truncated, info = self.step_env(key, state, action, params)
        self._reset_state(key, params)  # the key check, eagerly
        state = _auto_reset(self.config)(terminated | truncated, key, state_st, params)
        return self.get_obs(state, params), state, reward, terminated, truncated, info

    def _reset_state(self, key: chex.PRNGKey, params: EnvParams) -> tuple[None, EnvState]:
        if jnp.shape(key) not in ((2,), ()):
            raise ValueError(
                f"env.reset_env takes one PRNG key (shape (2,) or a typed key), got shape "
                f"{jnp.shape(key)}; for a batch use jax.vmap(env.reset_env, in_axes=(0, None))"
            )
        return None, scenarios.generate(key, params, self.config)

    def get_obs(self, state: EnvState, params: EnvParams) -> observations.Observation:
        """`observations.observe`; for a batch-trailing state, per scenario, batch-leading."""
        if batch_layout(state) == "trailing":
            return jax.vmap(observations.observe, in_axes=(-1, None))(state, params)
        return observations.observe(state, params)

    def _check_action(self, action: chex.Array, batch: tuple[int, ...] = ()) -> chex.Array:
        """Shape ([max_actions, *batch]: `batch` is () for one scenario) and dtype checks; an
        id outside [0, num_actions) - including one that int32 cannot hold (a numpy int64
        2**32 + 1 would otherwise wrap to 1) - becomes -1, a counted invalid no-op, before the
        cast to int32."""
        n = self.num_actions
        if not isinstance(action, jax.Array):  # host values: range-check before any cast
            host = np.asarray(action)
            if host.dtype.kind in "iu":
                bad = (host < 0) | (host >= n)
                action = np.where(bad, -1, host).astype(np.int32)
            else:
                action = host
        action = jnp.asarray(action)
        A = self.config.max_actions
        if action.shape != (A, *batch):
            raise ValueError(
                f"action must have shape {(A, *batch)} (max_actions entries of "
                f"0..{self.num_actions - 1}), got shape {tuple(action.shape)}"
            )
        if not jnp.issubdtype(action.dtype, jnp.integer):
            raise ValueError(f"action must be an integer array, got dtype {action.dtype}")
        if action.dtype.itemsize > 4 or jnp.issubdtype(action.dtype, jnp.unsignedinteger):
            action = jnp.where((action < 0) | (action >= n), -1, action)  # before the cast
        return action.astype(jnp.int32)

    # -- action helpers ----------------------------------------------------------------------
    def encode_action(self, kind: str | int, slot: int = 0) -> int:
        """('evict', 3) -> action id. kind is one of ACTION_KINDS."""
        return encode_action(kind, slot, self.config.max_seqs)

    def decode_action(self, action_id: int) -> tuple[str, int]:
        return decode_action(action_id, self.config.max_seqs)

    # -- the rollout engine ------------------------------------------------------------------
    def episodes(self, policy, key, index, params, return_trajectory=False) -> dict[str, Any]:
        """`episode_len` steps per scenario of the micro-batch `index` (kvjax/cache/rollout.py)."""
        return cache_rollout.episodes(policy, self, key, index, params, return_trajectory)

    def check_params(self, params: EnvParams) -> None:
        """ValueError unless `params` is an EnvParams whose concrete values are in range (also
        values set by tree_map & co., which construction does not see)."""
        if not isinstance(params, EnvParams):
            raise ValueError(f"params must be EnvParams for {self.name}, got "
                             f"{type(params).__name__}")
        check_fields("EnvParams", params, PARAM_SPECS)


@functools.cache
def _auto_reset(cfg: EnvConfig):
    """`(done, key, state, params) -> where(done, generate(key, params), state)`.

    For one scenario the reset is drawn and picked branch-free, as gymnax does. Under
    `jax.vmap` (a custom batching rule) the batch's reset and pick run only when some scenario
    is done (`lax.cond` on `any(done)`): episodes are truncated at `episode_len` and never
    terminate early, so a batch whose scenarios were reset together (PureJaxRL's setup) resets
    on one step in `episode_len` and otherwise passes the state through. Results are the same
    either way (the done scenarios get `generate(key, params)`, the others keep their state);
    nested vmaps batch the rule's `cond` into a select, which is the plain form again."""

    def plain(done, key, state, params):
        fresh = scenarios.generate(key, params, cfg)
        return jax.tree_util.tree_map(lambda a, b: jnp.where(done, a, b), fresh, state)

    fn = jax.custom_batching.custom_vmap(plain)

    @fn.def_vmap
    def rule(axis_size, in_batched, done, key, state, params):
        def batched(x, b):
            return x if b else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x))

        done_b, key_b, state_b, params_b = in_batched
        done, key = batched(done, done_b), batched(key, key_b)
        state = jax.tree_util.tree_map(batched, state, state_b)
        p_axes = jax.tree_util.tree_map(lambda b: 0 if b else None, params_b)
        run = jax.vmap(plain, in_axes=(0, 0, 0, p_axes))
        out = jax.lax.cond(jnp.any(done), lambda: run(done, key, state, params), lambda: state)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return fn


def encode_action(kind: str | int, slot: int, max_seqs: int) -> int:
    """Action id for (kind, slot): keep -> 0, else 1 + (kind - 1) * max_seqs + slot."""
    k = ACTION_KINDS.index(kind) if isinstance(kind, str) and kind in ACTION_KINDS else kind
    if not isinstance(k, int) or not 0 <= k < len(ACTION_KINDS):
        raise ValueError(f"unknown action kind {kind!r}; allowed: {list(ACTION_KINDS)}")
    if k == 0:
        return 0
    if not 0 <= int(slot) < max_seqs:
        raise ValueError(f"slot must be in [0, {max_seqs}), got {slot}")
    return 1 + (k - 1) * max_seqs + int(slot)


def decode_action(action_id: int, max_seqs: int) -> tuple[str, int]:
    """Inverse of encode_action: id -> (kind name, slot); keep -> ('keep', -1)."""
    n = 1 + 3 * max_seqs
    if not 0 <= int(action_id) < n:
        raise ValueError(f"action id must be in [0, {n}), got {action_id}")
    if action_id == 0:
        return "keep", -1
    k, slot = divmod(int(action_id) - 1, max_seqs)
    return ACTION_KINDS[k + 1], slot


def make(difficulty: str = "all", **config: Any) -> tuple[KVCacheEnv, EnvParams]:
    """`env, params = make(difficulty="medium", max_seqs=16)` (kvjax.make("kv-cache-v0", ...)):
    config overrides of EnvConfig, the tier as a param."""
    env = KVCacheEnv(**config)
    return env, env.default_params.replace(difficulty=difficulty_index(difficulty))


def difficulty_index(difficulty: str | int) -> int:
    """'easy'|'medium'|'hard'|'all' -> 0..3."""
    if isinstance(difficulty, str) and difficulty in DIFFICULTIES:
        return DIFFICULTIES.index(difficulty)
    raise ValueError(f"unknown difficulty {difficulty!r}; allowed: {list(DIFFICULTIES)}")
