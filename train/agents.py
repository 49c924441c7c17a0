"""The env-specific half of PPO: one small agent object per kvjax env.

An agent holds the network and everything that depends on the env's action space; the trainer
(train/ppo.py) only calls these methods, on unbatched observations (it vmaps them):

- `init(key, obs) -> params`
- `sample(params, obs, key, greedy=False) -> (action, log_prob, entropy, value)`
- `evaluate(params, obs, action) -> (log_prob, entropy, value)`: the PPO loss's terms for a
  stored action
- `value(params, obs) -> value`
- `observe(state, env_params) -> obs`: what a policy built from trained weights sees

and `episodic` says how the trainer collects data: True (kv-cache-v0: every episode has
`episode_len` steps, so each update plays whole fresh episodes), False (kv-serve-v0: episodes
end when the clock reaches the horizon, so the envs keep running across updates with
`env.step`'s auto-reset, PureJaxRL style).

Log-probabilities and entropies are sums over the independent parts of an action (heads, rows).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

import kvjax
from kvjax.cache.env import KVCacheEnv
from kvjax.serve.env import ServeEnv
from train.networks import (
    ActorCritic,
    ServeActorCritic,
    dists,
    exponentials,
    request_rows,
    segment_rows,
)

ENV_IDS = ("kv-cache-v0", "kv-serve-v0")


class KVCacheAgent:
    """kv-cache-v0: `ActorCritic`'s autoregressive masked heads (int32 [max_actions] actions)."""

    episodic = True

    def __init__(self, env: KVCacheEnv, hidden: int = 16, attention: bool = False):
        self.env = env
        self.network = ActorCritic(max_actions=env.config.max_actions, hidden=hidden,
                                   attention=attention)

    def init(self, key, obs):
        return self.network.init(key, obs, jnp.zeros((self.env.config.max_actions,), jnp.int32))

    def sample(self, params, obs, key, greedy: bool = False):
        return self.network.apply(params, obs, key, greedy, method=ActorCritic.sample)

    def evaluate(self, params, obs, action):
        logits, v = self.network.apply(params, obs, action)
        d = dists(logits)
        return d.log_prob(action).sum(-1), d.entropy().sum(-1), v

    def value(self, params, obs):
        return self.network.apply(params, obs, method=ActorCritic.encode)[2]

    def observe(self, state, env_params):
        return kvjax.observe(state, env_params)


def _row_terms(logits: chex.Array, on: chex.Array, a: chex.Array):
    """Sum over existing rows (`on`) of the log-probability of `a` under per-row categoricals
    `logits` [n, levels], and of their entropies; rows that do not exist contribute 0."""
    logp = jax.nn.log_softmax(logits)
    chosen = jnp.take_along_axis(logp, a[:, None], axis=-1)[:, 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.sum(jnp.where(on, chosen, 0.0)), jnp.sum(jnp.where(on, entropy, 0.0))


class ServeAgent:
    """kv-serve-v0: a priority value 0..L per request row and per segment row, each an
    independent categorical (`ServeActorCritic`'s per-row heads); commands are always noop.

    Only rows that hold something are acted on: the action of an empty row is 0 (leave) and it
    adds nothing to the log-probability or the entropy, so PPO's ratios and the entropy bonus
    count real decisions only. Commands are left out (a documented choice: 1 + 2S + 2G + 4 ids
    per command slot, most of them masked, for levers the priorities already cover - the
    engine's preemption victims and prefix eviction order)."""

    episodic = False

    def __init__(self, env: ServeEnv, hidden: int = 32):
        self.env = env
        self.network = ServeActorCritic(levels=env.config.priority_levels + 1, hidden=hidden)

    def init(self, key, obs):
        return self.network.init(key, obs)

    def _action(self, a_req, a_seg):
        cfg = self.env.config
        return dict(request_priority=a_req, segment_priority=a_seg,
                    commands=jnp.zeros((cfg.max_commands,), jnp.int32))

    def sample(self, params, obs, key, greedy: bool = False):
        lr, ls, v = self.network.apply(params, obs)
        on_r, on_s = request_rows(obs), segment_rows(obs)
        S = lr.shape[0]
        if greedy:
            picks = jnp.argmax(jnp.concatenate([lr, ls]), axis=-1)
        else:  # the exponential race on kvjax's counter hash, as ActorCritic.sample
            logits = jnp.concatenate([lr, ls])
            picks = jnp.argmax(jax.nn.softmax(logits) / exponentials(key, logits.shape), -1)
        a_req = jnp.where(on_r, picks[:S], 0).astype(jnp.int32)
        a_seg = jnp.where(on_s, picks[S:], 0).astype(jnp.int32)
        (lp_r, en_r), (lp_s, en_s) = _row_terms(lr, on_r, a_req), _row_terms(ls, on_s, a_seg)
        return self._action(a_req, a_seg), lp_r + lp_s, en_r + en_s, v

    def evaluate(self, params, obs, action):
        lr, ls, v = self.network.apply(params, obs)
        lp_r, en_r = _row_terms(lr, request_rows(obs), action["request_priority"])
        lp_s, en_s = _row_terms(ls, segment_rows(obs), action["segment_priority"])
        return lp_r + lp_s, en_r + en_s, v

    def value(self, params, obs):
        return self.network.apply(params, obs)[2]

    def observe(self, state, env_params):
        return self.env.get_obs(state, env_params)


def make_agent(env, hidden: int = 16, attention: bool = False):
    """The agent for `env` (a KVCacheEnv or a ServeEnv)."""
    if isinstance(env, KVCacheEnv):
        return KVCacheAgent(env, hidden, attention)
    if isinstance(env, ServeEnv):
        if attention:
            raise ValueError("attention is only available for kv-cache-v0")
        return ServeAgent(env, hidden)
    raise ValueError(f"no PPO agent for {type(env).__name__}; allowed envs: {list(ENV_IDS)}")
