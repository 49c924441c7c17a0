"""The quick loop (`make test-quick`): every module imports, and every registered env makes,
resets, steps, rolls out, trains one tiny PPO update and answers the CLI - on tiny configs, in
well under two minutes on two cores. `make test` runs these with everything else."""

import dataclasses
import importlib
import pkgutil

import jax
import numpy as np
import pytest

import kvjax
import train
from kvjax import cli, registry
from kvjax.rollout import rollout

pytestmark = pytest.mark.quick


def _modules(package) -> list[str]:
    return [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]


@pytest.mark.parametrize("name", _modules(kvjax) + _modules(train))
def test_every_module_imports(name):
    if name.endswith(".verifiers") or name.endswith("verifiers_tools"):
        pytest.importorskip("verifiers")
    importlib.import_module(name)


def test_every_registered_env_has_a_tiny_setting(tiny_settings):
    assert set(tiny_settings) == set(registry.env_ids())


def test_env_resets_steps_and_rolls_out(tiny_env):
    env_id, env, params = tiny_env
    key = jax.random.PRNGKey(0)
    obs, state = jax.jit(env.reset)(key, params)
    policy = kvjax.make_policy(registry.policy_names(env_id)[0], env)  # keep, engine_default
    action = policy(key, state, params)
    obs2, state2, reward, terminated, truncated, _ = jax.jit(env.step)(key, state, action, params)
    # identical pytree structure and dtypes from reset and step
    for a, b in ((obs, obs2), (state, state2)):
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
        assert [x.dtype for x in jax.tree_util.tree_leaves(a)] == [
            x.dtype for x in jax.tree_util.tree_leaves(b)
        ]
    assert np.isfinite(float(reward)) and not bool(terminated)
    res = rollout(policy, key, 2, params, env, progress=False)
    assert all(np.shape(v)[0] == 2 for v in res.values())


def test_one_tiny_ppo_update(tiny_env):
    from train.ppo import PPOConfig, make_trainer

    env_id, env, _ = tiny_env
    cfg = PPOConfig(env=env_id, num_envs=4, num_minibatches=2, num_steps=2, total_steps=8)
    trainer = make_trainer(dataclasses.replace(cfg, total_steps=trainer_steps(env, cfg)), env)
    runner, metrics = jax.jit(trainer.run, static_argnums=1)(trainer.init(jax.random.PRNGKey(0)), 1)
    assert int(runner.update) == 1 and np.isfinite(float(metrics["pg_loss"][0]))


def trainer_steps(env, cfg) -> int:
    """Env steps of exactly one update (an episodic agent's updates are whole episodes)."""
    from train.agents import make_agent

    steps = env.config.episode_len if make_agent(env).episodic else cfg.num_steps
    return steps * cfg.num_envs


def test_cli_answers_every_command(capsys):
    for command in ["demo", "eval", "bench", "leaderboard", *cli.env_commands()]:
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0
    assert "--preset" in capsys.readouterr().out
    assert cli.main(["eval", "--policy", "keep", "--env", "kv-serve-v0"]) == 2
    assert "kv-serve-v0" in capsys.readouterr().err
