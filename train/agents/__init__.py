"""The env-specific half of PPO: one agent class per kvjax env (train/agents/cache.py,
train/agents/serve.py), found through the env's registry entry (`Harness.ppo_agent`).

An agent holds the network and everything that depends on the env's action space; the trainer
(train/ppo.py) only calls these methods, on unbatched observations (it vmaps them):

- `init(key, obs) -> params`
- `sample(params, obs, key, greedy=False) -> (action, log_prob, entropy, value)`
- `evaluate(params, obs, action) -> (log_prob, entropy, value)`: the PPO loss's terms for a
  stored action
- `value(params, obs) -> value`
- `observe(state, env_params) -> obs`: what a policy built from trained weights sees
- `reset(keys, env_params, config) -> (obs, state)`: a batch of fresh episodes
- `metrics(final) -> dict`: what one update logs about its episodes (the final states of an
  episodic agent, the running envs' `EnvCarry` otherwise)

and `episodic` says how the trainer collects data: True (kv-cache-v0: every episode has
`episode_len` steps, so each update plays whole fresh episodes), False (kv-serve-v0: episodes
end when the clock reaches the horizon, so the envs keep running across updates with
`env.step`'s auto-reset, PureJaxRL style). The class also carries the env's half of the
command lines: `make_env(config)`, `run_name(config)`, `return_label`, its `python -m train.ppo`
options (`add_train_options`, `config_options`) and its `python -m train.evaluate` options and
evaluation (`add_eval_options`, `evaluate_checkpoint`).

Log-probabilities and entropies are sums over the independent parts of an action (heads, rows).
"""

from __future__ import annotations

import importlib
from typing import Any

from kvjax import registry


def agent_class(env_id: str) -> type:
    """The agent class of a registered env (ValueError naming the registered ids)."""
    module, name = registry.harness(env_id).ppo_agent.split(":")
    return getattr(importlib.import_module(module), name)


def make_agent(env: Any, hidden: int = 16, attention: bool = False):
    """The agent for `env` (any registered kvjax env with a PPO agent)."""
    env_id = getattr(env, "name", None)
    if env_id not in registry.env_ids():
        raise ValueError(f"no PPO agent for {type(env).__name__}; allowed envs: "
                         f"{list(registry.env_ids())}")
    return agent_class(env_id)(env, hidden, attention)


def learned_policy(agent, net_params, greedy: bool = True):
    """A kvjax policy `policy(key, state, params) -> action` from trained weights: it observes
    the state as the env does and samples the agent's action (greedy: the most likely action of
    each head / row)."""

    def policy(key, state, params):
        return agent.sample(net_params, agent.observe(state, params), key, greedy)[0]

    return policy


def __getattr__(name: str):  # the agent classes by name, imported on first use
    if name in ("KVCacheAgent", "ServeAgent"):
        module = "cache" if name == "KVCacheAgent" else "serve"
        return getattr(importlib.import_module(f"train.agents.{module}"), name)
    raise AttributeError(f"module 'train.agents' has no attribute {name!r}")


__all__ = ["KVCacheAgent", "ServeAgent", "agent_class", "learned_policy", "make_agent"]
