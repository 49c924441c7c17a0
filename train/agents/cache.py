"""kv-cache-v0's PPO agent: `ActorCritic`'s autoregressive masked heads (int32 [max_actions]
actions) over fresh `episode_len`-step episodes, and its half of the train / evaluate CLIs."""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.cache import rewards
from kvjax.cache.env import KVCacheEnv
from kvjax.stats import mean_ci
from train.heldout import EVAL_SEED, run_policies
from train.networks import ActorCritic, dists

# Training difficulty: a kvjax tier, or "medium+hard" (half the envs each).
TRAIN_DIFFICULTIES = ("easy", "medium", "hard", "all", "medium+hard")


class KVCacheAgent:
    """kv-cache-v0: `ActorCritic`'s autoregressive masked heads (int32 [max_actions] actions)."""

    episodic = True
    return_label = "mean episode rubric total"

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

    # -- the trainer's env-specific steps ------------------------------------------------------
    def reset(self, keys, env_params, config):
        """Fresh episodes, scenario i on the tier `env_difficulties(config)[i]`."""
        difficulties = jnp.asarray(env_difficulties(config))
        return jax.vmap(lambda k, d: self.env.reset_env(k, env_params.replace(difficulty=d)))(
            keys, difficulties
        )

    def metrics(self, final_state) -> dict[str, Any]:
        """The rubric of every episode (all end with the update), per tier, and failures."""
        rub = jax.vmap(rewards.rubric, in_axes=(0, None))(final_state, self.env.default_params)
        tier = final_state.tier
        metrics = {f"rubric/{k}": v.mean() for k, v in rub.items()}
        metrics["return"] = rub["total"].mean()
        for i, name in enumerate(kvjax.DIFFICULTIES[:3]):
            m = tier == i
            metrics[f"return/{name}"] = jnp.where(
                jnp.any(m), jnp.sum(jnp.where(m, rub["total"], 0.0)) / jnp.maximum(m.sum(), 1),
                jnp.nan,
            )
        metrics["failures"] = final_state.counters.failures.mean().astype(jnp.float32)
        metrics["invalid_actions"] = final_state.counters.invalid_actions.sum().astype(
            jnp.float32)
        return metrics

    # -- the command lines ---------------------------------------------------------------------
    @staticmethod
    def make_env(config) -> KVCacheEnv:
        return KVCacheEnv()

    @staticmethod
    def run_name(config) -> str:
        return config.difficulty

    @staticmethod
    def add_train_options(ap: argparse.ArgumentParser) -> None:
        g = ap.add_argument_group("kv-cache-v0 (with --env kv-cache-v0)")
        g.add_argument("--difficulty", default=None, choices=TRAIN_DIFFICULTIES,
                       help="kv-cache-v0 tier(s) (default: hard)")

    @staticmethod
    def config_options(a: argparse.Namespace) -> dict[str, Any]:
        return {"difficulty": a.difficulty or "hard"}

    @staticmethod
    def add_eval_options(ap: argparse.ArgumentParser) -> None:
        g = ap.add_argument_group("kv-cache-v0 checkpoints")
        g.add_argument("--difficulty", nargs="+", default=None, choices=list(kvjax.DIFFICULTIES),
                       help="tiers to evaluate on (default: hard medium)")

    @staticmethod
    def eval_envs(a: argparse.Namespace, config) -> dict[Any, KVCacheEnv]:
        return {None: KVCacheEnv()}

    @staticmethod
    def evaluate_checkpoint(a: argparse.Namespace, config, net_params, envs) -> tuple[str, dict]:
        """Every baseline and the learned policy on the held-out scenarios of each tier."""
        from train.agents import learned_policy, make_agent

        env = envs[None]
        agent = make_agent(env, config.hidden, config.attention)
        pols = {"ppo": learned_policy(agent, net_params, greedy=not a.sample)}
        pols.update(baseline_policies(include_oracle=not a.no_oracle))
        res = evaluate(pols, a.difficulty or ["hard", "medium"], a.num_scenarios, a.eval_seed,
                       env)
        return table(res), summary(res)


# -- evaluation (python -m train.evaluate) ----------------------------------------------------
def baseline_policies(include_oracle: bool = True) -> dict[str, Any]:
    """name -> policy from kvjax.cache.policies (oracle last, when included)."""
    from kvjax.cache import policies

    names = [n for n in policies.POLICY_NAMES if include_oracle or n != "oracle"]
    return {n: policies.POLICIES[n] for n in names}


def evaluate(
    policies: dict[str, Any], difficulties: list[str], num_scenarios: int,
    eval_seed: int = EVAL_SEED, env: KVCacheEnv | None = None, progress: bool = True,
) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """-> results[difficulty][policy] = rollout dict of per-scenario arrays."""
    env = env or KVCacheEnv()
    return {
        diff: run_policies(
            policies, env, env.default_params.replace(difficulty=kvjax.difficulty_index(diff)),
            num_scenarios, eval_seed, progress, label=f"{diff:6s} ")
        for diff in difficulties
    }


def table(results: dict[str, dict[str, dict[str, np.ndarray]]], learned: str = "ppo") -> str:
    """Markdown comparison: mean total +- 95% CI, failures, and the learned policy's paired
    difference to the best non-oracle baseline (and to the oracle)."""
    lines = []
    for diff, res in results.items():
        n = len(next(iter(res.values()))["total"])
        baselines = [p for p in res if p not in (learned, "oracle")]
        best = max(baselines, key=lambda p: res[p]["total"].mean()) if baselines else None
        lines += [f"### {diff} ({n} held-out scenarios)", "",
                  "| policy | rubric total (mean ± 95% CI) | failures / episode | invalid |",
                  "|---|---|---|---|"]
        order = sorted(res, key=lambda p: -res[p]["total"].mean())
        for p in order:
            m, h = mean_ci(res[p]["total"])
            f, _ = mean_ci(res[p]["total_failures_metric"])
            tag = " (learned)" if p == learned else (" (reads the future)" if p == "oracle" else "")
            tag += " (best baseline)" if p == best else ""
            inv = int(np.sum(res[p].get("invalid_actions", 0)))
            lines.append(f"| {p}{tag} | {m:.4f} ± {h:.4f} | {f:.3f} | {inv} |")
        lines.append("")
        if learned in res:
            for ref in [best, "oracle"]:
                if ref is None or ref not in res:
                    continue
                d, h = mean_ci(res[learned]["total"] - res[ref]["total"])
                win = float(np.mean(res[learned]["total"] > res[ref]["total"]))
                lines.append(f"- {learned} − {ref}: {d:+.4f} ± {h:.4f} (paired 95% CI); "
                             f"{learned} better on {100 * win:.1f}% of scenarios")
            lines.append("")
    return "\n".join(lines)


def summary(results: dict[str, dict[str, dict[str, np.ndarray]]]) -> dict[str, Any]:
    """JSON-ready means and intervals of every rubric field."""
    out: dict[str, Any] = {}
    for diff, res in results.items():
        out[diff] = {}
        for p, r in res.items():
            out[diff][p] = {k: dict(zip(("mean", "ci95"), mean_ci(v), strict=True))
                            for k, v in r.items() if np.ndim(v) == 1}
    return out


def env_difficulties(config) -> np.ndarray:
    """The tier of each of the config's `num_envs` envs (medium+hard: alternating)."""
    if config.difficulty == "medium+hard":
        return np.where(np.arange(config.num_envs) % 2 == 0, 1, 2).astype(np.int32)
    return np.full(config.num_envs, kvjax.difficulty_index(config.difficulty), np.int32)


__all__ = [
    "TRAIN_DIFFICULTIES",
    "KVCacheAgent",
    "baseline_policies",
    "env_difficulties",
    "evaluate",
    "summary",
    "table",
]
