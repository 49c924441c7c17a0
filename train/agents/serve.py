"""kv-serve-v0's PPO agent: a priority value per request row and per segment row (per-row
categorical heads), in envs that keep running across updates, and its half of the train /
evaluate CLIs."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.serve.env import ServeEnv
from kvjax.stats import mean_ci
from kvjax.validation import positive_int, real_arg
from train.heldout import run_policies
from train.networks import ServeActorCritic, exponentials, request_rows, segment_rows


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
    return_label = "mean episode score (goodput / offered)"

    def __init__(self, env: ServeEnv, hidden: int = 32, attention: bool = False):
        if attention:
            raise ValueError("attention is only available for kv-cache-v0")
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

    # -- the trainer's env-specific steps ------------------------------------------------------
    def reset(self, keys, env_params, config):
        return jax.vmap(self.env.reset_env, in_axes=(0, None))(keys, env_params)

    def metrics(self, carry) -> dict[str, Any]:
        """The mean return (= score) of the episodes that ended in this update (NaN if none
        did), and the invalid commands so far in the running episodes."""
        n = carry.ended.sum()
        return {
            "return": jnp.where(n > 0, carry.ended_return.sum() / jnp.maximum(n, 1), jnp.nan),
            "episodes": n.astype(jnp.float32),
            "invalid_actions": carry.state.metrics.invalid_commands.sum().astype(jnp.float32),
        }

    # -- the command lines ---------------------------------------------------------------------
    @staticmethod
    def make_env(config) -> ServeEnv:
        """kvjax.make("kv-serve-v0", preset=, workload=, load=, **serve_params) (its arguments
        validated there)."""
        env, _ = kvjax.make("kv-serve-v0", preset=config.preset, workload=config.workload,
                            load=config.load, **config.serve_params)
        return env

    @staticmethod
    def run_name(config) -> str:
        return f"serve-{config.workload}"

    @staticmethod
    def add_train_options(ap: argparse.ArgumentParser) -> None:
        from train.ppo import PPOConfig

        g = ap.add_argument_group("kv-serve-v0 (with --env kv-serve-v0)")
        g.add_argument("--preset", default=None,
                       help=f"deployment (default: {PPOConfig.preset})")
        g.add_argument("--workload", default=None,
                       help=f"request stream (default: {PPOConfig.workload})")
        g.add_argument("--load", type=real_arg(0.0, lo_open=True), default=None,
                       help=f"offered load as a fraction of the preset's capacity (default: "
                            f"{PPOConfig.load})")
        g.add_argument("--set", nargs="+", default=None, metavar="NAME=NUMBER",
                       help="ServeParams overrides, e.g. horizon=60 gpu_pool_tokens=40000")
        g.add_argument("--num-steps", type=positive_int, default=None,
                       help=f"env steps per env per update (default: {PPOConfig.num_steps})")

    @staticmethod
    def config_options(a: argparse.Namespace) -> dict[str, Any]:
        from kvjax.serve.env import parse_overrides
        from train.ppo import PPOConfig

        return {"preset": a.preset or PPOConfig.preset,
                "workload": a.workload or PPOConfig.workload,
                "load": a.load or PPOConfig.load,
                "serve_params": parse_overrides(a.set or []),
                "num_steps": a.num_steps or PPOConfig.num_steps}

    @staticmethod
    def add_eval_options(ap: argparse.ArgumentParser) -> None:
        g = ap.add_argument_group("kv-serve-v0 checkpoints")
        g.add_argument("--load", type=real_arg(0.0, lo_open=True), nargs="+", default=None,
                       help="offered loads to evaluate at (default: the training load)")

    @staticmethod
    def eval_envs(a: argparse.Namespace, config) -> dict[Any, ServeEnv]:
        """The training env at each load to evaluate at (ValueError for a bad one)."""
        from train.ppo import make_env

        return {load: make_env(dataclasses.replace(config, load=load))
                for load in a.load or [config.load]}

    @staticmethod
    def evaluate_checkpoint(a: argparse.Namespace, config, net_params, envs) -> tuple[str, dict]:
        """The learned policy and every kv-serve-v0 policy on the same held-out windows of the
        training env, at each load."""
        from train.agents import learned_policy, make_agent

        parts, js = [], {}
        for load, env in envs.items():
            agent = make_agent(env, config.hidden, config.attention)
            pols = {"ppo": learned_policy(agent, net_params, greedy=not a.sample)}
            pols.update(serve_baselines(env, include_offline=not a.no_oracle))
            res = run_policies(pols, env, env.default_params, a.num_scenarios, a.eval_seed)
            parts.append(serve_table(
                res, title=f"{config.preset}, {config.workload}, load {load:g} "))
            js[f"load={load:g}"] = serve_summary(res)
        return "\n".join(parts), js


# -- evaluation (python -m train.evaluate) ----------------------------------------------------
SERVE_REFERENCE = "engine_default"
SERVE_FUTURE_AWARE = ("belady_offline",)  # reads true output lengths / next uses: labelled


def serve_baselines(env, include_offline: bool = True) -> dict[str, Any]:
    """name -> policy for every kv-serve-v0 policy of SERVE_POLICY_NAMES."""
    from kvjax.serve.policies import SERVE_POLICY_NAMES, make_policy

    names = [n for n in SERVE_POLICY_NAMES if include_offline or n not in SERVE_FUTURE_AWARE]
    return {n: make_policy(n, env) for n in names}


def serve_table(res: dict[str, Any], learned: str = "ppo", title: str = "") -> str:
    """Markdown: per policy the mean (± 95% CI) score, goodput, SLO attainment, hit rate,
    p99 TTFT, preemptions/s and invalid commands, and the paired differences of score and
    goodput against engine_default; then the learned policy against the best heuristic."""
    n = len(next(iter(res.values()))["score"])
    ref = res.get(SERVE_REFERENCE)
    lines = [f"### {title}({n} held-out windows)", "",
             "| policy | score | Δ score vs default (paired) | goodput req/s | Δ goodput vs "
             "default (paired) | SLO attainment | hit rate | p99 TTFT s | preemptions/s | "
             "invalid |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in sorted(res, key=lambda p: -res[p]["score"].mean()):
        r = res[p]
        tag = (" (learned)" if p == learned else
               " (reads the future)" if p in SERVE_FUTURE_AWARE else "")
        cells = [f"{p}{tag}", "{:.4f} ± {:.4f}".format(*mean_ci(r["score"]))]
        cells.append("{:+.4f} ± {:.4f}".format(*mean_ci(r["score"] - ref["score"]))
                     if ref is not None and p != SERVE_REFERENCE else "-")
        cells.append("{:.3f} ± {:.3f}".format(*mean_ci(r["goodput"])))
        cells.append("{:+.3f} ± {:.3f}".format(*mean_ci(r["goodput"] - ref["goodput"]))
                     if ref is not None and p != SERVE_REFERENCE else "-")
        cells += [f"{r['slo_attainment'].mean():.3f}", f"{r['hit_rate'].mean():.3f}",
                  f"{r['p99_ttft'].mean():.2f}", f"{r['preemptions_per_s'].mean():.2f}",
                  f"{int(np.sum(r['invalid_commands']))}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    heur = [p for p in res if p not in (learned, SERVE_REFERENCE, "random",
                                        *SERVE_FUTURE_AWARE)]
    best = max(heur, key=lambda p: res[p]["score"].mean()) if heur else None
    if learned in res:
        for other in [p for p in (SERVE_REFERENCE, best) if p in res]:
            d, h = mean_ci(res[learned]["score"] - res[other]["score"])
            win = float(np.mean(res[learned]["score"] > res[other]["score"]))
            lines.append(f"- {learned} − {other}{' (best heuristic)' if other == best else ''}"
                         f": score {d:+.4f} ± {h:.4f} (paired 95% CI); {learned} better on "
                         f"{100 * win:.1f}% of windows")
        lines.append("")
    return "\n".join(lines)


def serve_summary(res: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready means and intervals of every episode metric, per policy."""
    return {p: {k: dict(zip(("mean", "ci95"), mean_ci(v), strict=True))
                for k, v in r.items() if np.ndim(v) == 1} for p, r in res.items()}


__all__ = [
    "SERVE_FUTURE_AWARE",
    "SERVE_REFERENCE",
    "ServeAgent",
    "serve_baselines",
    "serve_summary",
    "serve_table",
]
