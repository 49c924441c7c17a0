"""kv-serve-v0's gymnax-style API: structure, determinism, no retracing, invariants, errors."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.serve import actions, engine, metrics, observations
from kvjax.serve.types import EMPTY, TOOL, ServeConfig

SMALL = dict(max_requests=16, max_segments=4, iterations_per_step=8)


@pytest.fixture(scope="module")
def small():
    return kvjax.make(
        "kv-serve-v0", preset="toy", load=1.2, horizon=4.0, gpu_pool_tokens=32768, config=SMALL
    )


def random_action(env, key, state, params):
    """Random priorities and commands, half of the commands drawn among the valid ones."""
    k1, k2, k3 = jax.random.split(key, 3)
    a = env.action_space(params).sample(k1)
    mask = actions.command_mask(state, params, env.config)
    valid = jax.random.categorical(
        k2, jnp.where(mask, 0.0, -jnp.inf), shape=(env.config.max_commands,)
    )
    use = jax.random.bernoulli(k3, 0.5, (env.config.max_commands,))
    a["commands"] = jnp.where(use, valid, a["commands"]).astype(jnp.int32)
    return a


def rollout(env, params, key, steps, policy="random"):
    _, s0 = env.reset_env(key, params)

    def body(s, k):
        a = random_action(env, k, s, params) if policy == "random" else env.noop_action()
        obs, s2, r, term, trunc, info = env.step_env(k, s, a, params)
        mem = engine.memory(s2, params)
        return s2, dict(
            r=r, s=s2, free=mem["free"], cpu=mem["cpu_used"], obs=obs, cpu_pool=mem["cpu_pool"]
        )

    return s0, jax.lax.scan(body, s0, jax.random.split(key, steps))


def test_reset_and_step_have_identical_structure_and_dtypes(small):
    env, p = small
    obs0, s0 = env.reset(jax.random.PRNGKey(0), p)
    obs1, s1, r, term, trunc, info = env.step(jax.random.PRNGKey(1), s0, env.noop_action(), p)
    for a, b in ((obs0, obs1), (s0, s1), (obs0, info["final_observation"])):
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape
    assert r.dtype == jnp.float32 and term.dtype == jnp.bool_ and trunc.dtype == jnp.bool_
    assert bool(env.observation_space(p).contains(obs1._asdict()))
    assert bool(env.action_space(p).contains(env.noop_action()))


def test_invariants_hold_on_random_episodes(small):
    env, p = small
    keys = jax.random.split(jax.random.PRNGKey(4), 16)
    s0, (final, tr) = jax.jit(jax.vmap(lambda k: rollout(env, p, k, 60)))(keys)
    assert int(tr["free"].min()) >= 0
    assert np.all(np.asarray(tr["cpu"]) <= np.asarray(tr["cpu_pool"]))
    for leaf in jax.tree_util.tree_leaves((tr["obs"], tr["s"])):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert bool(jnp.all(jnp.isfinite(leaf)))
    m = tr["s"].metrics
    in_table = jnp.sum(tr["s"].requests.status != EMPTY, axis=-1)
    np.testing.assert_array_equal(m.arrived, m.finished + in_table + m.timed_out)
    assert bool(jnp.all(m.good <= m.finished))
    clocks = np.asarray(tr["s"].clock)
    assert np.all(np.diff(clocks, axis=1) >= 0) and np.all(clocks > 0)
    for f in ("computed", "generated", "prompt", "cpu_blocks", "recomputed", "hit_tokens"):
        assert int(getattr(tr["s"].requests, f).min()) >= 0, f
    # What the random actions exercise (so the invariants were tested under pressure).
    assert int(final.metrics.preemptions.sum()) > 0
    assert int(final.metrics.agent_preemptions.sum()) > 0
    assert int(final.metrics.offloads.sum()) > 0
    assert int(final.metrics.invalid_commands.sum()) > 0
    assert int(final.metrics.hit_tokens.sum()) > 0
    # The return is the final score.
    np.testing.assert_allclose(
        np.asarray(tr["r"]).sum(1), np.asarray(metrics.score(final, p)), rtol=1e-5, atol=1e-6
    )


def test_episodes_are_deterministic_and_vmap_matches_single(small):
    env, p = small
    keys = jax.random.split(jax.random.PRNGKey(9), 4)
    batched = jax.jit(jax.vmap(lambda k: rollout(env, p, k, 20)[1][0]))(keys)
    again = jax.jit(jax.vmap(lambda k: rollout(env, p, k, 20)[1][0]))(keys)
    single = jax.jit(lambda k: rollout(env, p, k, 20)[1][0])(keys[2])
    chex.assert_trees_all_equal(batched, again)
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda x: x[2], batched), single, rtol=1e-6)
    assert int(batched.metrics.finished[0]) != int(batched.metrics.finished[1]) or int(
        batched.next_index[0]
    ) != int(batched.next_index[1])


def test_no_retracing_across_params_and_steps():
    # config engine=None: the engine is a traced param, so swapping it below switches rules
    # (an env made for one engine traces only its rules and ignores a traced params.engine).
    env, p = kvjax.make(
        "kv-serve-v0",
        preset="toy",
        load=1.2,
        horizon=4.0,
        gpu_pool_tokens=32768,
        config={**SMALL, "engine": None},
    )

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(key, state, action, params):
        return env.step(key, state, action, params)

    _, s = env.reset(jax.random.PRNGKey(0), p)
    params = [p, p.replace(arrival_rate=jnp.float32(3.0)), p.replace(engine=jnp.int32(2))]
    params = [jax.tree_util.tree_map(jnp.asarray, q) for q in params]
    for q in params:
        for _ in range(3):
            s = step(jax.random.PRNGKey(1), s, env.noop_action(), q)[1]


def test_auto_reset_at_the_horizon_keeps_the_final_observation():
    env, p = kvjax.make("kv-serve-v0", preset="toy", load=0.5, horizon=0.5, config=SMALL)
    step = jax.jit(env.step)
    _, s = env.reset(jax.random.PRNGKey(0), p)
    for _ in range(200):
        obs, s2, r, term, trunc, info = step(jax.random.PRNGKey(5), s, env.noop_action(), p)
        if bool(trunc):
            assert float(s2.clock) == 0.0 and int(s2.steps) == 0
            assert float(info["final_observation"].globals[0]) >= 1.0  # time / horizon
            return
        s = s2
    pytest.fail("the episode never reached its horizon")


def test_invalid_commands_are_counted_noops(small):
    env, p = small
    _, s = env.reset(jax.random.PRNGKey(0), p)
    a = env.noop_action()
    a["commands"] = jnp.array(
        [actions.encode_command("preempt", 3, env.config), env.config.num_command_ids + 5],
        jnp.int32,
    )  # empty row, range
    a["request_priority"] = a["request_priority"].at[0].set(99)
    s2 = actions.apply(s, a, p, env.config)
    assert int(s2.metrics.invalid_commands) == 3
    chex.assert_trees_all_equal(s2.replace(metrics=s.metrics), s)


def test_command_encoding_round_trips():
    cfg = ServeConfig(max_requests=5, max_segments=3)
    ids = set()
    for kind, n in (
        ("offload", 5),
        ("preempt", 5),
        ("pin", 3),
        ("drop", 3),
        ("reserve", len(cfg.reserve_levels)),
    ):
        for t in range(n):
            i = actions.encode_command(kind, t, cfg)
            assert actions.decode_command(i, cfg) == (kind, t)
            ids.add(i)
    assert ids == set(range(1, cfg.num_command_ids))
    with pytest.raises(ValueError, match="allowed"):
        actions.encode_command("evict", 0, cfg)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        actions.encode_command("offload", 5, cfg)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(preset="a100"), "toy"),
        (dict(engine="tgi"), "sglang"),
        (dict(kv_dtype="int4"), "fp8"),
        (dict(load=0.0), "load"),
        (dict(load=math.nan), "load"),
        (dict(workload="nope"), "synthetic-conv"),
        (dict(horizon=-1.0), "horizon"),
        (dict(arrival_rate=math.inf), "arrival_rate"),
        (dict(max_num_seqs=2.5), "max_num_seqs"),
        (dict(prefix_share=1.5), "prefix_share"),
        (dict(bogus=1), "allowed"),
        (dict(config=dict(max_requests=0)), "max_requests"),
        (dict(config=dict(slots=3)), "allowed"),
        (dict(difficulty="hard"), "tiers"),
    ],
)
def test_bad_arguments_raise_a_clear_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kvjax.make("kv-serve-v0", **kwargs)


def test_bad_action_shape_is_rejected(small):
    env, p = small
    _, s = env.reset(jax.random.PRNGKey(0), p)
    with pytest.raises(ValueError, match="commands"):
        env.step_env(None, s, {**env.noop_action(), "commands": jnp.zeros(7, jnp.int32)}, p)
    with pytest.raises(ValueError, match="keys"):
        env.step_env(None, s, jnp.zeros(3, jnp.int32), p)


@pytest.fixture(scope="module", params=["agentic", "mooncake-synthetic"])
def other_workload(request):
    extra = dict(gpu_pool_tokens=65536, horizon=40.0, tool_gap_median=1.0)
    if request.param != "agentic":
        extra.pop("tool_gap_median")
    return request.param, *kvjax.make(
        "kv-serve-v0",
        preset="toy",
        workload=request.param,
        load=1.0,
        config=dict(SMALL, max_segments=16),
        **extra,
    )


def test_invariants_and_structure_on_agentic_and_trace_workloads(other_workload):
    name, env, p = other_workload
    obs0, s0 = env.reset(jax.random.PRNGKey(0), p)
    obs1, s1, *_ = env.step(jax.random.PRNGKey(1), s0, env.noop_action(), p)
    assert jax.tree_util.tree_structure((obs0, s0)) == jax.tree_util.tree_structure((obs1, s1))
    keys = jax.random.split(jax.random.PRNGKey(5), 8)
    _, (final, tr) = jax.jit(jax.vmap(lambda k: rollout(env, p, k, 80)))(keys)
    assert int(tr["free"].min()) >= 0
    s = tr["s"]
    m, req, seg = s.metrics, s.requests, s.segments
    in_system = jnp.sum((req.status != EMPTY) & (req.status != TOOL), axis=-1)
    np.testing.assert_array_equal(m.arrived, m.finished + in_system + m.timed_out)
    # the segment tree: a resident segment's parent is resident and shorter
    parent = np.asarray(seg.parent)
    resident = np.asarray(seg.valid & seg.on_gpu)
    has = resident & (parent >= 0)
    p_res = np.take_along_axis(resident, np.maximum(parent, 0), axis=-1)
    p_tok = np.take_along_axis(np.asarray(seg.tokens), np.maximum(parent, 0), axis=-1)
    assert np.all(p_res[has]) and np.all(p_tok[has] < np.asarray(seg.tokens)[has])
    assert int(final.metrics.hit_tokens.sum()) > 0
    if name == "agentic":
        assert bool(jnp.any(req.status == TOOL))
        # a call waiting for its tool shows only the flag, its priority and its prefix flag
        obs = tr["obs"].requests
        tool = np.asarray(req.status == TOOL)
        hidden = [i for i in range(obs.shape[-1]) if i not in observations.TOOL_VISIBLE]
        assert np.all(np.asarray(obs)[tool][:, hidden] == 0)
        assert np.all(np.asarray(obs)[tool][:, observations.REQUEST_FEATURES.index("in_tool")] == 1)
