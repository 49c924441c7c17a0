"""PPO trainer tests (CPU, small batches; compiled functions are shared via module fixtures)."""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trees import trees_equal

import kvjax
from kvjax.cache.dynamics import apply_actions
from kvjax.cache.env import KVCacheEnv
from train import checkpoint
from train.networks import ActorCritic, exponentials, next_mask, sample_categorical
from train.ppo import (
    PPOConfig,
    gae,
    load_checkpoint,
    load_policy,
    make_policy,
    make_train,
    make_trainer,
    save_checkpoint,
    save_policy,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# One update per `train` call; a constant learning rate (an annealed one would reach 0 within
# the single scheduled update) and no entropy bonus, so a few updates show learning.
CFG = PPOConfig(difficulty="easy", num_envs=64, total_steps=64 * 15, update_epochs=2,
                num_minibatches=2, lr=3e-3, anneal_lr=False, ent_coef=0.0, hidden=16)


def _tree_equal(a, b) -> bool:
    """Same structure (array leaves only) and bit-identical leaves of the same dtype."""
    return trees_equal(a, b, check_dtype=True)


@pytest.fixture(scope="module")
def trainer():
    return make_trainer(CFG)


@pytest.fixture(scope="module")
def update(trainer):
    return jax.jit(trainer.update)


@pytest.fixture(scope="module")
def runner0(trainer):
    return jax.jit(trainer.init)(jax.random.PRNGKey(0))


# -- pure pieces ---------------------------------------------------------------------------------

def test_gae_hand_computed():
    """Two envs, three steps; env 0 truncates at t=1 (bootstrap 0.5), env 1 terminates at t=1."""
    r = jnp.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    v = jnp.zeros((3, 2))
    nv = jnp.array([[0.0, 0.0], [0.5, 9.0], [0.0, 0.0]])
    term = jnp.array([[0, 0], [0, 1], [0, 0]], bool)
    trunc = jnp.array([[0, 0], [1, 0], [0, 0]], bool)
    adv, tgt = gae(r, v, nv, term, trunc, gamma=1.0, lam=1.0)
    # env 0: t=2 -> 1; t=1 -> 1 + 0.5 (bootstrapped, recursion cut); t=0 -> 1 + 1.5
    # env 1: t=2 -> 1; t=1 -> 1 (terminal: no bootstrap of 9.0); t=0 -> 2
    np.testing.assert_allclose(adv, [[2.5, 2.0], [1.5, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(tgt, adv)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="medium\\+hard"):
        PPOConfig(difficulty="nightmare")
    with pytest.raises(ValueError, match="num_envs"):
        PPOConfig(num_envs=0)
    with pytest.raises(ValueError, match="divisible"):
        make_trainer(PPOConfig(num_envs=10, num_minibatches=4))
    with pytest.raises(ValueError, match="allowed"):
        PPOConfig.from_dict({"bogus": 1})


@functools.cache
def _diverse_states(n: int):
    """States with compressed, swapped and evicted slots (a few random steps), jitted."""
    env = KVCacheEnv()
    params = env.default_params.replace(difficulty=2)
    S = env.config.max_seqs

    @jax.jit
    def make(key):
        keys = jax.random.split(key, n)
        _, st = jax.vmap(env.reset_env, in_axes=(0, None))(keys, params)

        def body(st, k):
            a = jax.random.randint(k, (n, 3), 0, 1 + 3 * S)
            _, st, *_ = jax.vmap(env.step_env, in_axes=(0, 0, 0, None))(keys, st, a, params)
            return st, None

        return jax.lax.scan(body, st, jax.random.split(jax.random.fold_in(key, 1), 3))[0]

    return env, params, make(jax.random.PRNGKey(7))


def test_next_mask_matches_the_dynamics():
    """The autoregressive mask update equals the env's validity after applying the prefix."""
    env, params, st = _diverse_states(128)
    S = env.config.max_seqs

    @jax.jit
    def check(st, key):
        obs = jax.vmap(kvjax.observe, in_axes=(0, None))(st, params)
        # A random valid first action of any kind, then the mask after it.
        noise = jax.random.normal(key, obs.action_mask.shape)
        a = jax.random.categorical(key, jnp.where(obs.action_mask, noise, -jnp.inf))
        prec = (obs.slots[:, :, 6] + 2 * obs.slots[:, :, 7]).astype(jnp.int32)
        got, _ = jax.vmap(next_mask, in_axes=(0, 0, 0, None))(obs.action_mask, prec, a, S)
        after = jax.vmap(lambda s, x: apply_actions(s, x[None], params, env.config))(st, a)
        return a, got, jax.vmap(kvjax.action_mask)(after)

    a, got, want = check(st, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(got, want)
    assert int(jnp.sum(a > 0)) > 32  # the check covered real actions, not only keep


def test_masked_heads_never_sample_invalid_actions():
    """Even with huge random logits, every sampled action vector is valid in sequence."""
    env, params, st = _diverse_states(128)
    net = ActorCritic(hidden=16)
    obs = jax.jit(jax.vmap(kvjax.observe, in_axes=(0, None)))(st, params)
    p = net.init(jax.random.PRNGKey(0), jax.tree_util.tree_map(lambda x: x[0], obs),
                 jnp.zeros(3, jnp.int32))
    p = jax.tree_util.tree_map(lambda x: 50.0 * x, p)  # extreme logits everywhere
    keys = jax.random.split(jax.random.PRNGKey(1), 128)

    @jax.jit
    def run(p, obs, st):
        acts, logp, ent, _ = jax.vmap(
            lambda o, k: net.apply(p, o, k, method=ActorCritic.sample))(obs, keys)
        after = jax.vmap(lambda s, a: apply_actions(s, a, params, env.config))(st, acts)
        mid = jax.vmap(lambda s, a: apply_actions(s, a[:2], params, env.config))(st, acts)
        logits, _ = jax.vmap(lambda o, a: net.apply(p, o, a))(obs, acts)
        return acts, logp, ent, after, jax.vmap(kvjax.action_mask)(mid), logits

    acts, logp, ent, after, valid2, logits = run(p, obs, st)
    assert int(jnp.sum(after.counters.invalid_actions - st.counters.invalid_actions)) == 0
    assert int(jnp.sum(acts > 0)) > 100
    assert bool(jnp.all(jnp.isfinite(logp))) and bool(jnp.all(jnp.isfinite(ent)))
    # Teacher forcing gives the same log-probabilities as sampling.
    lp = distrax.Categorical(logits=logits).log_prob(acts).sum(-1)
    np.testing.assert_allclose(lp, logp, rtol=1e-5, atol=1e-3)
    # Each head puts exactly zero probability on what is invalid at that point.
    probs = jax.nn.softmax(logits, axis=-1)
    valid0 = obs.action_mask
    assert float(jnp.max(jnp.where(valid0, 0.0, probs[:, 0]))) == 0.0
    # ... and for the last head, what is invalid after the first two actions.
    assert float(jnp.max(jnp.where(valid2, 0.0, probs[:, 2]))) == 0.0


def test_exponential_race_samples_the_categorical():
    """`sample_categorical` with `exponentials` noise draws each id with its probability
    (20,000 draws, every frequency within 5 standard errors) and never a masked one."""
    logits = jnp.array([0.3, -1.0, -1e9, 1.2, 0.0, -2.5])
    dist = distrax.Categorical(logits=logits)
    n = 20_000
    keys = jax.random.split(jax.random.PRNGKey(11), n)
    draws = jax.jit(jax.vmap(
        lambda k: sample_categorical(dist, exponentials(k, logits.shape))))(keys)
    freq = np.bincount(np.asarray(draws), minlength=logits.size) / n
    p = np.asarray(dist.probs)
    assert freq[2] == 0.0
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n) + 1e-12)
    e = np.asarray(exponentials(jax.random.PRNGKey(0), (100_000,)))
    assert e.min() > 0 and abs(e.mean() - 1.0) < 0.02 and abs(e.var() - 1.0) < 0.05


# -- training ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_vmapped_train_updates_and_differs_across_seeds():
    """jax.vmap(train) over two seeds: one PPO update each changes the parameters, the seeds end
    with different parameters, and no invalid action is ever played."""
    train = jax.jit(jax.vmap(make_train(CFG)))
    keys = jax.random.split(jax.random.PRNGKey(42), 2)
    out = train(keys)
    trainer = make_trainer(CFG)
    init = jax.vmap(trainer.init)(keys)
    p0, p1 = init.train_state.params, out["runner"].train_state.params
    for s in range(2):
        before = jax.tree_util.tree_map(lambda x, s=s: x[s], p0)
        after = jax.tree_util.tree_map(lambda x, s=s: x[s], p1)
        assert not _tree_equal(before, after)
    a = jax.tree_util.tree_map(lambda x: x[0], p1)
    b = jax.tree_util.tree_map(lambda x: x[1], p1)
    assert not _tree_equal(a, b)
    assert out["metrics"]["return"].shape == (2, 1)
    np.testing.assert_array_equal(out["metrics"]["invalid_actions"], 0.0)
    assert np.all(np.isfinite(np.asarray(out["metrics"]["v_loss"])))


def test_checkpoint_resume_round_trips_exactly(tmp_path, update, runner0):
    """2 updates straight == 1 update, save, load, 1 update (bit for bit)."""
    straight, _ = update(update(runner0)[0])
    one, _ = update(runner0)
    path = str(tmp_path / "ckpt.msgpack")
    save_checkpoint(path, one, CFG)
    cfg, loaded = load_checkpoint(path)
    assert cfg == CFG
    assert _tree_equal(loaded, one)
    # Re-attach to the fixture's runner structure (same static optimiser object: no retrace).
    loaded = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(one), jax.tree_util.tree_leaves(loaded))
    resumed, _ = update(loaded)
    assert _tree_equal(resumed, straight)
    # Policy-only checkpoints restore the network parameters exactly.
    ppath = str(tmp_path / "policy.msgpack")
    save_policy(ppath, one.train_state.params, CFG)
    cfg2, params = load_policy(ppath)
    assert cfg2 == CFG and _tree_equal(params, one.train_state.params)
    with pytest.raises(ValueError, match="train"):
        load_checkpoint(ppath)
    with pytest.raises(ValueError, match="allowed"):
        checkpoint.save(ppath, params, {}, kind="weights")


@pytest.mark.slow
def test_tiny_training_improves_over_untrained(update, runner0):
    """A few updates on easy raise the mean return of the (sampling) policy on a fixed easy
    scenario set (fixed keys: the score is deterministic)."""
    from kvjax.cache.rollout import episode

    env = KVCacheEnv()
    params = env.default_params.replace(difficulty=0)
    key = jax.random.PRNGKey(2024)

    @jax.jit
    def score(net_params):
        pol = make_policy(net_params, CFG, greedy=False, env=env)
        ep = jax.vmap(lambda i: episode(pol, env, key, i, params))(jnp.arange(64))
        return ep["total"].mean()

    before = float(score(runner0.train_state.params))
    r = runner0
    for _ in range(20):
        r, m = update(r)
    after = float(score(r.train_state.params))
    assert after > before + 0.02, (before, after)


def test_sharded_config_falls_back_on_one_device():
    """With one device the mesh is skipped; the flag is part of the config either way."""
    cfg = dataclasses.replace(CFG, shard=False)
    assert make_trainer(cfg).config.shard is False


SHARDING_SCRIPT = """
import dataclasses, json, sys, jax, numpy as np
from train.ppo import PPOConfig, make_trainer
assert len(jax.local_devices()) == 2
cfg = PPOConfig.from_dict(json.loads(sys.argv[1]))
t = make_trainer(dataclasses.replace(cfg, shard=True))
r, m = jax.jit(t.update)(t.init(jax.random.PRNGKey(0)))
print(json.dumps(dict(
    params=[np.asarray(v).ravel().tolist()
            for v in jax.tree_util.tree_leaves(r.train_state.params)],
    ret=float(m["return"]), invalid=float(m["invalid_actions"]),
)))
"""


@pytest.mark.slow
def test_data_parallel_matches_one_device(update, runner0):
    """Two forced host devices: the env batch sharded over a 1-D mesh gives the same episode
    returns (same scenarios, same actions; the mean only up to reduction order) and the same
    parameters up to float reduction order as the one-device update of the same seed."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(
        [sys.executable, "-c", SHARDING_SCRIPT, json.dumps(CFG.to_dict())], env=env,
        capture_output=True, text=True, timeout=600,
        cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    single, m = update(runner0)
    assert out["ret"] == pytest.approx(float(m["return"]), rel=1e-6)
    assert out["invalid"] == 0.0
    leaves = jax.tree_util.tree_leaves(single.train_state.params)
    assert len(leaves) == len(out["params"])
    for a, b in zip(leaves, out["params"], strict=True):
        np.testing.assert_allclose(np.asarray(a).ravel(), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_cli_bad_input_exits_2(tmp_path, capsys):
    from train import evaluate, ppo

    assert ppo.main(["--difficulty", "nightmare"]) == 2
    assert ppo.main(["--seeds", "0"]) == 2
    assert ppo.main(["--cpu-devices", "0"]) == 2
    capsys.readouterr()
    assert ppo.main(["--num-envs", "10", "--minibatches", "4", "--out", str(tmp_path)]) == 2
    assert "divisible" in capsys.readouterr().err
    assert evaluate.main([str(tmp_path / "missing.msgpack")]) == 2
    assert "missing.msgpack" in capsys.readouterr().err
    assert evaluate.main(["x", "--difficulty", "extreme"]) == 2


def test_parts_dense_is_dense_split_by_input_part():
    """PartsDense has nn.Dense's parameters (names, shapes, init draws), so checkpoints written
    before it load unchanged, and its split product equals Dense on the concatenated input."""
    import flax.linen as nn

    from train.networks import PartsDense

    a, b = jnp.arange(10.0).reshape(2, 5) / 7, jnp.arange(6.0).reshape(2, 3) / 5
    dense = nn.Dense(4)
    pd = dense.init(jax.random.PRNGKey(3), jnp.concatenate([a, b], -1))
    pp = PartsDense(4).init(jax.random.PRNGKey(3), 8, method=PartsDense.weights)
    assert _tree_equal(pd, pp)
    k, bias = PartsDense(4).apply(pp, 8, method=PartsDense.weights)
    np.testing.assert_allclose(a @ k[:5] + b @ k[5:] + bias,
                               dense.apply(pd, jnp.concatenate([a, b], -1)), rtol=1e-6)


def test_committed_checkpoint_loads_and_plays_valid_actions():
    import os

    path = os.path.join(ROOT,
                        "train", "checkpoints", "ppo_medium_hard.msgpack")
    cfg, params = load_policy(path)
    env, eparams, states = _diverse_states(64)
    policy = make_policy(params, cfg)
    acts = jax.jit(jax.vmap(policy, in_axes=(None, 0, None)))(
        jax.random.PRNGKey(0), states, eparams)
    before = states.counters.invalid_actions
    after = jax.vmap(apply_actions, in_axes=(0, 0, None, None))(
        states, acts, eparams, env.config).counters.invalid_actions
    np.testing.assert_array_equal(after, before)


@pytest.mark.slow
def test_bench_cli_prints_every_field(capsys):
    """`python -m train.bench` on a tiny config: one JSON line per config with the timing,
    throughput and load fields (values are not checked: timing is machine-dependent)."""
    import json

    from train import bench

    assert bench.main(["--configs", "16:8:1:2", "--updates", "1", "--repeats", "1",
                       "--difficulty", "easy"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert lines[0]["devices"] >= 1
    row = lines[1]
    for k in ("train_compile_s", "train_steps_per_s", "env_steps_per_s", "policy_steps_per_s",
              "rollout_steps_per_s", "learn_steps_per_s", "load_1min"):
        assert k in row, k
    assert (row["num_envs"], row["hidden"], row["epochs"], row["minibatches"]) == (16, 8, 1, 2)
    assert bench.main(["--configs", "16:8"]) == 2
    assert bench.main(["--configs", "16:8:1:2", "--cpu-devices", "0"]) == 2


# -- issue 15: checkpoints checked against the expected tree; arguments validated ------------

def _batched_checkpoint(path: str, trainer, seeds: int) -> None:
    """What `python -m train.ppo` writes: a seed-batched runner (vmap over seeds)."""
    runners = jax.jit(jax.vmap(trainer.init))(jax.random.split(jax.random.PRNGKey(0), seeds))
    save_checkpoint(path, runners, CFG)


def test_evaluate_reads_both_checkpoint_kinds_train_ppo_writes(tmp_path, trainer, capsys,
                                                               monkeypatch):
    # audit 5: train.evaluate could not read run/checkpoint.msgpack (seed-batched).
    from train import evaluate

    one, two = str(tmp_path / "one.msgpack"), str(tmp_path / "two.msgpack")
    _batched_checkpoint(one, trainer, 1)
    _batched_checkpoint(two, trainer, 2)
    cfg, params = load_policy(one)  # one seed: no index needed
    expect = jax.jit(trainer.init)(jax.random.split(jax.random.PRNGKey(0), 1)[0])
    assert cfg == CFG and _tree_equal(params, expect.train_state.params)
    cfg, params = load_policy(two, seed_index=1)
    expect = jax.jit(trainer.init)(jax.random.split(jax.random.PRNGKey(0), 2)[1])
    assert _tree_equal(params, expect.train_state.params)
    with pytest.raises(ValueError, match=r"2 seeds.*--seed-index.*\[0, 1\]"):
        load_policy(two)
    with pytest.raises(ValueError, match="seed-index"):
        load_policy(two, seed_index=2)
    # The CLI: several seeds without --seed-index is one line and exit 2 ...
    assert evaluate.main([two]) == 2
    err = capsys.readouterr().err
    assert "--seed-index" in err and len(err.strip().splitlines()) == 1
    # ... and with it (or a 1-seed file) the evaluation runs.
    from train.agents import cache as cache_agent

    monkeypatch.setattr(cache_agent, "baseline_policies", lambda include_oracle=True: {})
    out = tmp_path / "eval" / "table.md"
    assert evaluate.main([two, "--seed-index", "0", "--difficulty", "easy", "--num-scenarios",
                          "2", "--out", str(out)]) == 0
    assert "| ppo (learned)" in out.read_text() and out.with_suffix(".json").exists()


def test_restore_checks_shapes_and_resume_checks_the_seed_count(tmp_path, trainer, capsys):
    from train import ppo

    path = str(tmp_path / "ckpt.msgpack")
    _batched_checkpoint(path, trainer, 1)
    # audit 5: --resume ckpt --seeds 2 on a 1-seed checkpoint trained one seed, recorded 2.
    assert ppo.main(["--resume", path, "--seeds", "2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "1 seed(s)" in err and "--seeds 2" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="1 seeds, not 2 seeds"):
        load_checkpoint(path, seeds=2)
    # A checkpoint of another network shape is refused, not silently restored.
    with pytest.raises(ValueError, match="expected"):
        checkpoint.restore(make_trainer(dataclasses.replace(CFG, hidden=8)).init(
            jax.random.PRNGKey(0)).train_state.params,
            checkpoint.read(path)[2]["train_state"]["params"])
    (tmp_path / "junk.msgpack").write_bytes(b"\x00\x01 not msgpack")
    with pytest.raises(ValueError, match="not a"):
        load_policy(str(tmp_path / "junk.msgpack"))


@pytest.mark.parametrize("argv, says", [
    (["--lr", "nan"], "--lr"),  # audit 5: exited 0 with NaN weights
    (["--lr", "-1e-3"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--ent-coef", "-0.1"], "--ent-coef"),
    (["--time-limit", "nan"], "--time-limit"),
    (["--seed", str(2**32)], "--seed"),
    (["--seeds", "0"], "--seeds"),
    (["--total-steps", "1.5"], "--total-steps"),
    (["--difficulty", "nightmare"], "medium+hard"),
])
def test_ppo_cli_bad_arguments_one_line_exit_2(argv, says, capsys):
    from train import ppo

    assert ppo.main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_output_paths_are_checked_before_work(tmp_path, capsys):
    from train import evaluate, ppo

    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert ppo.main(["--out", str(a_file), "--total-steps", "960", "--num-envs", "64"]) == 2
    assert "--out" in capsys.readouterr().err
    # evaluate checks --out before it even reads the checkpoint (which does not exist here).
    assert evaluate.main([str(tmp_path / "missing.msgpack"), "--out",
                          str(a_file / "t.md")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert evaluate.main([str(tmp_path / "missing.msgpack"), "--eval-seed", "-1"]) == 2


def test_ppo_config_validates_hyperparameters():
    for bad in (dict(lr=math.nan), dict(lr=0.0), dict(gamma=1.5), dict(gae_lambda=-0.1),
                dict(clip_eps=0.0), dict(ent_coef=math.inf), dict(max_grad_norm=-1.0),
                dict(num_envs=2.5), dict(hidden=True), dict(anneal_lr="yes")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            dataclasses.replace(CFG, **bad)


@pytest.mark.parametrize("argv, says", [
    (["--updates", "0"], "--updates"),
    (["--cpu-devices", "-1"], "--cpu-devices"),
    (["--configs", "64:16:1:3"], "divisible"),  # was a traceback from inside the benchmark
    (["--configs", "64:16"], "num_envs:hidden:epochs:minibatches"),
    (["--configs", "64:16:1:4", "--difficulty", "x"], "medium+hard"),
])
def test_train_bench_cli_bad_arguments_one_line_exit_2(argv, says, capsys):
    from train import bench

    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
