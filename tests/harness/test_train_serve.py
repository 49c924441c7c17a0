"""PPO on kv-serve-v0: the serve agent (train/agents/) and the trainer's continuing rollouts."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trees import trees_equal

import kvjax
from kvjax.serve import actions
from kvjax.serve.observations import (
    GLOBAL_FEATURES,
    REQUEST_FEATURES,
    SEGMENT_FEATURES,
    ServeObservation,
)
from train import checkpoint
from train.agents import ServeAgent, make_agent
from train.ppo import (
    PPOConfig,
    load_checkpoint,
    load_policy,
    make_policy,
    make_trainer,
    save_checkpoint,
    save_policy,
)

# Short episodes (horizon 2 s, ~10 steps) so that a two-update run crosses an auto-reset.
SERVE = dict(horizon=2.0, gpu_pool_tokens=40000)
CFG = PPOConfig(env="kv-serve-v0", preset="toy", workload="synthetic", load=0.9,
                serve_params=SERVE, num_envs=8, num_steps=8, num_minibatches=2,
                update_epochs=1, total_steps=8 * 8 * 2, hidden=8, lr=3e-3, anneal_lr=False)


@functools.cache
def _env():
    env, _ = kvjax.make("kv-serve-v0", preset="toy", load=0.9, **SERVE)
    return env


@functools.cache
def _agent_params():
    agent = ServeAgent(_env(), hidden=8)
    obs, _ = _env().reset_env(jax.random.PRNGKey(0), _env().default_params)
    return agent, agent.init(jax.random.PRNGKey(1), obs)


def _hand_obs(req_rows=(0, 3, 5), seg_rows=(1,), time_frac=0.5):
    """A toy-shaped observation: requests in `req_rows` (running, waiting, in a tool gap in
    turn), valid segments `seg_rows`, everything else empty (all zeros)."""
    cfg = _env().config
    S, G = cfg.max_requests, cfg.max_segments
    req = np.zeros((S, len(REQUEST_FEATURES)), np.float32)
    flags = ("running", "waiting", "in_tool")
    for i, r in enumerate(req_rows):
        req[r, REQUEST_FEATURES.index(flags[i % 3])] = 1.0
        req[r, REQUEST_FEATURES.index("prompt_k")] = 0.5 + r
    seg = np.zeros((G, len(SEGMENT_FEATURES)), np.float32)
    for g in seg_rows:
        seg[g, SEGMENT_FEATURES.index("valid")] = 1.0
        seg[g, SEGMENT_FEATURES.index("tokens_k")] = 2.0
    glob = np.zeros(len(GLOBAL_FEATURES), np.float32)
    glob[GLOBAL_FEATURES.index("time_frac")] = time_frac
    glob[GLOBAL_FEATURES.index("used")] = 0.7
    return ServeObservation(jnp.asarray(req), jnp.asarray(seg), jnp.asarray(glob),
                            jnp.ones((cfg.num_command_ids,), bool))


def _manual_terms(logits, rows, a):
    logp = jax.nn.log_softmax(logits)
    lp = sum(float(logp[r, a[r]]) for r in rows)
    ent = sum(float(-(jnp.exp(logp[r]) * logp[r]).sum()) for r in rows)
    return lp, ent


def test_serve_agent_samples_and_scores_only_existing_rows():
    agent, params = _agent_params()
    cfg, L = _env().config, _env().config.priority_levels
    obs = _hand_obs()
    act, logp, ent, v = jax.jit(agent.sample)(params, obs, jax.random.PRNGKey(3))
    assert act["request_priority"].shape == (cfg.max_requests,)
    assert act["segment_priority"].shape == (cfg.max_segments,)
    np.testing.assert_array_equal(act["commands"], np.zeros(cfg.max_commands))
    for k in ("request_priority", "segment_priority", "commands"):
        assert act[k].dtype == jnp.int32
    # Empty rows are left alone; existing rows take a value in 0..L.
    empty_r = np.setdiff1d(np.arange(cfg.max_requests), [0, 3, 5])
    np.testing.assert_array_equal(np.asarray(act["request_priority"])[empty_r], 0)
    np.testing.assert_array_equal(np.asarray(act["segment_priority"])[[0, *range(2, 8)]], 0)
    assert np.all((np.asarray(act["request_priority"]) >= 0)
                  & (np.asarray(act["request_priority"]) <= L))
    # log-prob and entropy are sums over the existing rows' categoricals only.
    lr, ls, v2 = agent.network.apply(params, obs)
    lp_r, en_r = _manual_terms(lr, [0, 3, 5], np.asarray(act["request_priority"]))
    lp_s, en_s = _manual_terms(ls, [1], np.asarray(act["segment_priority"]))
    assert float(logp) == pytest.approx(lp_r + lp_s, rel=1e-5)
    assert float(ent) == pytest.approx(en_r + en_s, rel=1e-5)
    assert float(v) == float(v2)
    # evaluate() agrees with sample(); an empty row's action is ignored, an existing one's not.
    lp_e, ent_e, v_e = agent.evaluate(params, obs, act)
    assert float(lp_e) == pytest.approx(float(logp), rel=1e-6)
    assert float(ent_e) == pytest.approx(float(ent), rel=1e-6)
    other = dict(act, request_priority=act["request_priority"].at[7].set(3))
    assert float(agent.evaluate(params, obs, other)[0]) == float(lp_e)
    other = dict(act, request_priority=act["request_priority"].at[3].add(1) % (L + 1))
    assert float(agent.evaluate(params, obs, other)[0]) != float(lp_e)


def test_serve_agent_empty_tables_final_value_and_row_permutations():
    agent, params = _agent_params()
    # No rows: the action is all zeros (the engine default) with log-prob and entropy 0.
    act, logp, ent, _ = agent.sample(params, _hand_obs((), ()), jax.random.PRNGKey(0))
    assert all(int(jnp.abs(x).sum()) == 0 for x in act.values())
    assert float(logp) == 0.0 and float(ent) == 0.0
    # The value of a final observation (the clock at the horizon) is exactly 0.
    assert float(agent.value(params, _hand_obs(time_frac=1.0))) == 0.0
    assert float(agent.value(params, _hand_obs(time_frac=0.5))) != 0.0
    # Permutation-equivariant: permuting the request rows permutes their logits and leaves
    # the value unchanged.
    obs = _hand_obs()
    perm = np.random.default_rng(0).permutation(obs.requests.shape[0])
    lr, ls, v = agent.network.apply(params, obs)
    lr_p, ls_p, v_p = agent.network.apply(params, obs._replace(requests=obs.requests[perm]))
    np.testing.assert_allclose(lr_p, lr[perm], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ls_p, ls, rtol=1e-5, atol=1e-6)
    assert float(v_p) == pytest.approx(float(v), rel=1e-5, abs=1e-6)


def test_greedy_serve_policy_plays_only_valid_actions():
    """States from 12 random-policy steps of 16 scenarios: the greedy (and the sampling)
    policy's actions are in range, zero on empty rows, and apply without invalid commands."""
    from kvjax.serve.policies import make_policy as serve_policy
    from kvjax.serve.types import EMPTY

    env = _env()
    p = env.default_params
    _, params = _agent_params()
    cfg8 = dataclasses.replace(CFG, hidden=8)
    rnd = serve_policy("random", env)

    @jax.jit
    def states(key):
        keys = jax.random.split(key, 16)
        _, st = jax.vmap(env.reset_env, in_axes=(0, None))(keys, p)

        def body(st, k):
            a = jax.vmap(rnd, in_axes=(0, 0, None))(jax.random.split(k, 16), st, p)
            _, st, *_ = jax.vmap(env.step_env, in_axes=(0, 0, 0, None))(keys, st, a, p)
            return st, None

        return jax.lax.scan(body, st, jax.random.split(key, 12))[0]

    st = states(jax.random.PRNGKey(5))
    L = env.config.priority_levels
    for greedy in (True, False):
        pol = make_policy(params, cfg8, greedy=greedy, env=env)
        act = jax.jit(jax.vmap(pol, in_axes=(0, 0, None)))(jax.random.split(
            jax.random.PRNGKey(1), 16), st, p)
        rp, sp = np.asarray(act["request_priority"]), np.asarray(act["segment_priority"])
        assert rp.min() >= 0 and rp.max() <= L and sp.min() >= 0 and sp.max() <= L
        assert np.all(rp[np.asarray(st.requests.status) == EMPTY] == 0)
        assert np.all(sp[~np.asarray(st.segments.valid)] == 0)
        after = jax.vmap(actions.apply, in_axes=(0, 0, None, None))(st, act, p, env.config)
        np.testing.assert_array_equal(after.metrics.invalid_commands,
                                      st.metrics.invalid_commands)


def test_serve_checkpoints_round_trip(tmp_path):
    trainer = make_trainer(CFG)
    runner = jax.jit(trainer.init)(jax.random.PRNGKey(0))
    assert trainer.agent.episodic is False and runner.env.obs.requests.shape[0] == 8
    path = str(tmp_path / "ckpt.msgpack")
    save_checkpoint(path, runner, CFG)
    cfg, loaded = load_checkpoint(path)
    assert cfg == CFG and cfg.serve_params == SERVE
    assert trees_equal(loaded, runner, check_dtype=True)
    ppath = str(tmp_path / "policy.msgpack")
    save_policy(ppath, runner.train_state.params, CFG)
    cfg2, params = load_policy(ppath)
    assert cfg2 == CFG and trees_equal(params, runner.train_state.params, check_dtype=True)
    # A kv-cache-v0 network's weights are refused for the serve network.
    kv = make_trainer(PPOConfig(num_envs=64, num_minibatches=2, hidden=8))
    with pytest.raises(ValueError, match="expected"):
        checkpoint.restore(kv.init(jax.random.PRNGKey(0)).train_state.params,
                           checkpoint.read(ppath)[2])


@pytest.mark.slow
def test_tiny_serve_training_runs_and_is_deterministic():
    """Two updates of 8 envs x 8 steps (episodes of ~10 steps: the second update crosses the
    auto-reset): finite losses, episodes ended and counted, no invalid command, parameters
    changed - and the same seed gives bit-identical parameters and env carry."""
    trainer = make_trainer(CFG)
    assert trainer.num_updates == 2 and trainer.steps_per_update == 64
    train = jax.jit(lambda k: trainer.run(trainer.init(k), 2))
    r1, m1 = train(jax.random.PRNGKey(0))
    r2, m2 = train(jax.random.PRNGKey(0))
    assert trees_equal(r1, r2, check_dtype=True)
    r0 = jax.jit(trainer.init)(jax.random.PRNGKey(0))
    assert not trees_equal(r0.train_state.params, r1.train_state.params)
    m = jax.device_get(m1)
    for k in ("pg_loss", "v_loss", "entropy", "approx_kl"):
        assert np.all(np.isfinite(m[k])), k
    assert m["episodes"].sum() >= 8  # every env ended an episode by step 16
    ret = m["return"][np.isfinite(m["return"])]
    assert ret.size and np.all((ret >= 0) & (ret <= 1.5))
    np.testing.assert_array_equal(m["invalid_actions"], 0.0)
    assert int(r1.update) == 2


def test_make_agent_and_config_reject_bad_input():
    with pytest.raises(ValueError, match="kv-serve-v0"):
        PPOConfig(env="kv-nope-v0")
    with pytest.raises(ValueError, match="serve_params"):
        PPOConfig(env="kv-serve-v0", serve_params={"horizon": "long"})
    with pytest.raises(ValueError, match="load"):
        PPOConfig(env="kv-serve-v0", load=0.0)
    with pytest.raises(ValueError, match="allowed"):
        make_trainer(dataclasses.replace(CFG, workload="nope"))
    with pytest.raises(ValueError, match="allowed envs"):
        make_agent(object())
    assert isinstance(make_agent(_env()), ServeAgent)


@pytest.mark.parametrize("argv, says", [
    (["--workload", "nope"], "allowed"),
    (["--preset", "huge"], "allowed"),
    (["--set", "horizon"], "NAME=NUMBER"),
    (["--set", "bogus=1"], "bogus"),
    (["--set", "horizon=-1"], "horizon"),
    (["--load", "0"], "--load"),
    (["--num-steps", "0"], "--num-steps"),
])
def test_ppo_cli_serve_bad_arguments_one_line_exit_2(argv, says, capsys, tmp_path):
    from train import ppo

    assert ppo.main(["--env", "kv-serve-v0", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o" / "config.json").exists()


def test_serve_table_pairs_against_the_engine_default():
    """Hand-made results of 3 windows: the paired differences and the win share are exact."""
    from kvjax.stats import mean_ci
    from train.agents.serve import serve_table

    def res(score):
        s = np.asarray(score, np.float64)
        return dict(score=s, goodput=10 * s, slo_attainment=s, hit_rate=s, p99_ttft=s,
                    preemptions_per_s=s, invalid_commands=np.zeros(3))

    out = serve_table({"engine_default": res([0.4, 0.5, 0.6]), "ppo": res([0.5, 0.5, 0.9]),
                       "priority_by_role": res([0.45, 0.6, 0.6])}, title="t ")
    d, h = mean_ci(np.array([0.1, 0.0, 0.3]))
    assert "| ppo (learned) | 0.6333 ± " in out and f"{d:+.4f} ± {h:.4f}" in out
    assert "- ppo − priority_by_role (best heuristic): score +0.0833" in out
    assert "ppo better on 66.7% of windows" in out  # 2 of 3 against either
    assert out.index("| ppo") < out.index("| priority_by_role") < out.index("| engine_default")


@pytest.mark.slow
def test_evaluate_cli_on_a_serve_checkpoint(tmp_path, monkeypatch):
    """train.evaluate rebuilds the training env from a kv-serve-v0 checkpoint and writes the
    paired table and its JSON (2 windows, ppo and engine_default only)."""
    import json

    from kvjax.serve.policies import make_policy as serve_policy
    from train import evaluate
    from train.agents import serve as serve_agent

    trainer = make_trainer(CFG)
    path = str(tmp_path / "policy.msgpack")
    save_policy(path, jax.jit(trainer.init)(jax.random.PRNGKey(0)).train_state.params, CFG)
    monkeypatch.setattr(serve_agent, "serve_baselines", lambda env, include_offline=True: {
        "engine_default": serve_policy("engine_default", env)})
    out = tmp_path / "eval.md"
    assert evaluate.main([path, "--num-scenarios", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "toy, synthetic, load 0.9 (2 held-out windows)" in text
    assert "| ppo (learned) |" in text and "- ppo − engine_default: score" in text
    js = json.loads(out.with_suffix(".json").read_text())
    assert set(js["load=0.9"]) == {"ppo", "engine_default"}
    assert evaluate.main([path, "--load", "0"]) == 2
