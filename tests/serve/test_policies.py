"""The heuristic baselines of kv-serve-v0 (serve/baselines.py): valid actions over random
episodes, each rule on a hand-built state, jit / vmap without retracing."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.serve import actions, baselines, engine, offline, workload
from kvjax.serve.build import build_state
from kvjax.serve.policies import OFFLINE_POLICIES, SERVE_POLICY_NAMES, label, make_policy
from kvjax.serve.types import RUNNING, TOOL, WAITING

BASELINES = (
    "priority_by_role",
    "ttl_pin",
    "offload_largest_idle",
    "infercept",
    "belady_offline",
)
SMALL = dict(max_requests=16, max_segments=16)


def test_baselines_are_registered_and_bad_names_name_the_allowed():
    assert set(BASELINES) <= set(SERVE_POLICY_NAMES)
    env, _ = kvjax.make("kv-serve-v0", preset="toy", horizon=1.0, config=SMALL)
    with pytest.raises(ValueError, match="ttl_pin"):
        make_policy("belady", env)


# Small pools so that memory binds within a few simulated seconds and the rules act.
EPISODES = dict(
    agentic=dict(workload="agentic", load=3.0, gpu_pool_tokens=40_000),
    synthetic=dict(workload="synthetic", load=1.5, gpu_pool_tokens=16_000),
)

# Synthetic episodes have no tool gaps (ttl_pin, infercept emit nothing) and priority_by_role's
# agentic episode covers its rules: those three run with the slow tests (~15 s of compile each).
SLOW_CASES = {
    ("synthetic", "ttl_pin"),
    ("synthetic", "infercept"),
    ("synthetic", "priority_by_role"),
    ("synthetic", "belady_offline"),
}
CASES = [
    pytest.param(name, w, marks=[pytest.mark.slow] if (w, name) in SLOW_CASES else [])
    for w in EPISODES
    for name in BASELINES
]


@pytest.mark.parametrize(("name", "workload_name"), CASES)
def test_baselines_emit_only_valid_actions_over_random_episodes(name, workload_name):
    env, p = kvjax.make(
        "kv-serve-v0", preset="toy", horizon=20.0, config=SMALL, **EPISODES[workload_name]
    )
    cfg, L = env.config, env.config.priority_levels
    policy = make_policy(name, env)

    def body(state, key):
        a = policy(key, state, p)
        mask = actions.command_mask(state, p, cfg)
        ok = jnp.all(mask[a["commands"]] | (a["commands"] == 0))
        ok &= jnp.all((a["request_priority"] >= 0) & (a["request_priority"] <= L))
        ok &= jnp.all((a["segment_priority"] >= 0) & (a["segment_priority"] <= L))
        _, nxt, _, _, _, info = env.step_env(key, state, a, p)
        return nxt, (ok, info["invalid_commands"], jnp.sum(a["commands"] > 0), a)

    def episode(key):
        _, s = env.reset_env(key, p)
        return jax.lax.scan(body, s, jax.random.split(key, 80))

    final, (ok, invalid, acted, a) = jax.jit(jax.vmap(episode))(
        jax.random.split(jax.random.PRNGKey(1), 2)
    )
    for k, shape in dict(
        request_priority=(cfg.max_requests,),
        segment_priority=(cfg.max_segments,),
        commands=(cfg.max_commands,),
    ).items():
        assert a[k].dtype == jnp.int32 and a[k].shape[2:] == shape, k
    assert bool(np.all(ok))
    assert int(np.sum(invalid)) == 0 and int(np.sum(final.metrics.invalid_commands)) == 0
    if name in ("offload_largest_idle", "belady_offline") or (
        workload_name == "agentic" and name == "ttl_pin"
    ):
        assert int(np.sum(acted)) > 0  # the episodes exercise the rule
    if workload_name == "synthetic" and name in ("ttl_pin", "infercept"):
        assert int(np.sum(acted)) == 0  # no sessions, no tool gaps


# -- hand-built states -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def agentic():
    env, p = kvjax.make(
        "kv-serve-v0",
        preset="toy",
        workload="agentic",
        horizon=60.0,
        config=dict(max_requests=8, max_segments=8),
    )
    return env, p


def hist(session, turn, cfg):
    return int(workload.history_key(session, turn, cfg))


def tool_state(p, cfg, n_tool=1, **seg_over):
    """System prompt (row 0, 8,192 tokens) and histories of sessions 3, 4, 5 (rows 1-3, last
    accessed at 1, 3, 2 s) under it; sessions 3.. in a tool gap (the first `n_tool`), one
    request running on the system prompt."""
    segments = [dict(key=0, tokens=8192, on_gpu=True, last_access=0.5)]
    for s, t in ((3, 1.0), (4, 3.0), (5, 2.0)):
        segments.append(
            dict(key=hist(s, 0, cfg), parent=0, tokens=12288, on_gpu=True, last_access=t)
        )
    for g, over in seg_over.items():
        segments[int(g[1:])].update(over)
    requests = [dict(status=RUNNING, prompt=9000, computed=9000, attached=0, segment=0)]
    for s in range(n_tool):
        requests.append(
            dict(
                status=TOOL,
                index=3 + s,
                turn=1,
                prompt=14000,
                segment=hist(3 + s, 0, cfg),
                segment_up=0,
                prefix_len=12288,
                arrival=1e6,
            )
        )
    return build_state(p, cfg, requests, segments, clock=4.0)


def pins(cmds, cfg):
    return [actions.decode_command(int(c), cfg) for c in np.asarray(cmds) if int(c) != 0]


def test_ttl_pin_pins_exactly_the_history_of_a_tool_row_and_repins_before_the_ttl(agentic):
    env, p = agentic
    cfg = env.config
    pol = jax.jit(make_policy("ttl_pin", env))
    s = tool_state(p, cfg)
    assert pins(pol(None, s, p)["commands"], cfg) == [("pin", 1)]
    # Freshly pinned: nothing; less than half the TTL left: pinned again.
    s2 = tool_state(p, cfg, g1=dict(pinned_until=4.0 + float(p.pin_ttl)))
    assert pins(pol(None, s2, p)["commands"], cfg) == []
    s3 = tool_state(p, cfg, g1=dict(pinned_until=5.0))
    assert pins(pol(None, s3, p)["commands"], cfg) == [("pin", 1)]
    # Not cached (evicted): nothing to pin.
    s4 = tool_state(p, cfg, g1=dict(on_gpu=False))
    assert pins(pol(None, s4, p)["commands"], cfg) == []
    # Three sessions waiting, two commands: the most recently completed two (rows 2, 3).
    s5 = tool_state(p, cfg, n_tool=3)
    assert pins(pol(None, s5, p)["commands"], cfg) == [("pin", 2), ("pin", 3)]
    a = pol(None, s5, p)
    assert not np.any(np.asarray(a["request_priority"])) and not np.any(a["segment_priority"])


def offload_state(p, cfg, pool_tokens, segments=()):
    p = p.replace(gpu_pool_tokens=jnp.int32(pool_tokens))
    requests = [
        dict(status=RUNNING, prompt=2990, generated=10, computed=3000, target=3000),  # 188
        dict(status=RUNNING, prompt=6000, computed=5000, target=6000),  # prefilling, 313
        dict(status=RUNNING, prompt=1990, generated=10, computed=2000, target=2000),  # 125
        dict(status=WAITING, prompt=9000),
    ]
    return p, build_state(p, cfg, requests, segments=list(segments))


def test_offload_largest_idle_offloads_the_largest_decoding_request_under_pressure(agentic):
    env, p = agentic
    cfg = env.config
    pol = jax.jit(make_policy("offload_largest_idle", env))
    p1, s = offload_state(p, cfg, 10_400)  # 650 blocks, 626 held: 3.7% free
    assert int(engine.memory(s, p1)["free"]) == 24
    assert pins(pol(None, s, p1)["commands"], cfg) == [("offload", 0)]
    p2, s = offload_state(p, cfg, 131_072)  # plenty free: nothing
    assert pins(pol(None, s, p2)["commands"], cfg) == []
    # Little free but an evictable cached segment the engine can reclaim: nothing.
    p3, s = offload_state(p, cfg, 131_072, [dict(tokens=120_000, on_gpu=True)])
    assert int(engine.memory(s, p3)["free"]) == 66
    assert pins(pol(None, s, p3)["commands"], cfg) == []


def test_priority_by_role_sets_the_table_levels(agentic):
    env, p = agentic
    cfg = env.config
    high, mid, low = 4, 3, 1  # action values (level + 1) for L = 4
    assert [baselines.level(n, cfg) + 1 for n in ("high", "middle", "low")] == [high, mid, low]
    segments = [
        dict(key=0, tokens=8192, on_gpu=True),
        dict(key=1, tokens=8192, on_gpu=False),
        dict(key=hist(2, 0, cfg), parent=0, tokens=12288, on_gpu=True),
        dict(key=5, tokens=1024, on_gpu=True),  # neither role
    ]
    requests = [
        dict(status=RUNNING, prompt=9000, computed=9000, attached=0),
        dict(status=RUNNING, prompt=1000, computed=1000),
        dict(status=WAITING, prompt=500),
        dict(status=TOOL, prompt=14000, segment=hist(2, 0, cfg), arrival=1e6),
    ]
    s = build_state(p, cfg, requests, segments)
    a = jax.jit(make_policy("priority_by_role", env))(None, s, p)
    np.testing.assert_array_equal(a["segment_priority"], [high, high, mid, low, 0, 0, 0, 0])
    np.testing.assert_array_equal(a["request_priority"], [high, mid, low, low, 0, 0, 0, 0])
    assert not np.any(np.asarray(a["commands"]))
    # Applied, the levels are the table's.
    nxt = actions.apply(s, a, p, cfg)
    np.testing.assert_array_equal(nxt.segments.priority[:4], [3, 3, 2, 0])
    # Synthetic workload: the system prompts (keys < num_prefixes) are high.
    env2, p2 = kvjax.make("kv-serve-v0", preset="toy", horizon=1.0, config=SMALL)
    s2 = build_state(p2, env2.config, [], [dict(tokens=512, on_gpu=True)] * 4)
    a2 = make_policy("priority_by_role", env2)(None, s2, p2)
    np.testing.assert_array_equal(a2["segment_priority"][:5], [high] * 4 + [0])


def test_infercept_preserves_when_recompute_exceeds_the_memory_time_cost(agentic):
    env, p = agentic
    cfg = env.config
    pol = jax.jit(make_policy("infercept", env))
    # Idle pool: holding is free, recomputing 4,096 tokens is not -> preserve (pin).
    s = tool_state(p, cfg)
    c = baselines.infercept_costs(s, p, cfg)
    d, t0 = 4096.0, 8192.0
    rec = float(p.lin_b) * d + float(p.attn_prefill) * d * (t0 + d / 2)
    assert float(c["recompute"][1]) == pytest.approx(rec, rel=1e-5)
    assert bool(c["preserve"][1]) and not bool(c["want"][2])
    assert pins(pol(None, s, p)["commands"], cfg) == [("pin", 1)]
    # A small pool (2,098 blocks, 27% of it neither free nor evictable): holding 4,096 tokens
    # (12% of it) over the median gap costs more than recomputing them -> discard (nothing).
    p_full = p.replace(gpu_pool_tokens=jnp.int32(8192 + 3 * 4096 + 9000 + 4096))
    s_full = tool_state(p_full, cfg)
    c = baselines.infercept_costs(s_full, p_full, cfg)
    assert float(c["hold"][1]) > float(c["recompute"][1]) and not bool(c["preserve"][1])
    assert pins(pol(None, s_full, p_full)["commands"], cfg) == []


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_jit_and_vmap_without_retracing(name, agentic):
    env, p = agentic
    cfg = env.config
    pol = chex.assert_max_traces(make_policy(name, env), n=1)
    f = jax.jit(pol)
    s1, s2 = tool_state(p, cfg), tool_state(p, cfg, n_tool=3)
    a1 = f(jax.random.PRNGKey(0), s1, p)
    f(jax.random.PRNGKey(1), s2, p)
    batch = jax.tree_util.tree_map(lambda x, y: jnp.stack([x, y]), s1, s2)
    v = jax.vmap(make_policy(name, env), in_axes=(0, 0, None))(
        jax.random.split(jax.random.PRNGKey(0), 2), batch, p
    )
    for k in a1:
        np.testing.assert_array_equal(v[k][0], a1[k], err_msg=k)


# -- belady_offline (future-aware, offline) ------------------------------------------------------
def test_belady_offline_is_registered_and_labelled_offline(agentic):
    assert "belady_offline" in SERVE_POLICY_NAMES and OFFLINE_POLICIES == ("belady_offline",)
    assert label("belady_offline") == "belady_offline (offline: reads the future)"
    assert label("ttl_pin") == "ttl_pin"


def test_belady_offline_ranks_segments_by_next_use_and_requests_by_remaining_work(agentic):
    env, p = agentic
    cfg = env.config
    # System prompt (row 0) read now by a waiting request; session 4's history (row 2) read
    # when its tool returns at 10 s, session 3's (row 1) at 100 s; session 5's (row 3): no use
    # in sight (the stream never arrives). Two running requests, 50 and 5 tokens left.
    segments = [dict(key=0, tokens=8192, on_gpu=True)]
    for s in (3, 4, 5):
        segments.append(dict(key=hist(s, 0, cfg), parent=0, tokens=12288, on_gpu=True))
    requests = [
        dict(status=RUNNING, prompt=900, computed=900, generated=10, output_len=60),
        dict(status=RUNNING, prompt=900, computed=900, generated=10, output_len=15),
        dict(status=WAITING, prompt=9000, segment=0, prefix_len=8192),
        dict(status=TOOL, index=3, turn=1, prompt=14000, segment=hist(3, 0, cfg), arrival=100.0),
        dict(status=TOOL, index=4, turn=1, prompt=14000, segment=hist(4, 0, cfg), arrival=10.0),
    ]
    s = build_state(p, cfg, requests, segments, clock=4.0)
    use = np.asarray(offline.next_use(s, p, cfg))
    np.testing.assert_array_equal(use[:4], [4.0, 100.0, 10.0, np.inf])
    a = jax.jit(make_policy("belady_offline", env))(None, s, p)
    # soonest use -> level 3 (value 4) ... farthest -> level 1; no use -> level 0 (value 1)
    np.testing.assert_array_equal(a["segment_priority"], [4, 2, 3, 1, 0, 0, 0, 0])
    # fewest tokens left -> kept (level 3); the other is the first victim (level 1)
    np.testing.assert_array_equal(a["request_priority"], [2, 4, 0, 0, 0, 0, 0, 0])
    assert not np.any(np.asarray(a["commands"]))  # no memory pressure: no offload


def test_belady_offline_reads_the_stream_ahead_as_the_engine_draws_it():
    env, p = kvjax.make("kv-serve-v0", preset="toy", horizon=30.0, load=0.9)
    _, s = env.reset_env(jax.random.PRNGKey(3), p)
    use = np.asarray(offline.next_use(s, p, env.config))
    stream = workload.request_stream(s.seed, offline.LOOKAHEAD, p, env.config)
    for g in range(env.config.max_segments):
        reads = stream["segment"] == g
        want = stream["arrival"][reads].min() if g < int(p.num_prefixes) else np.inf
        np.testing.assert_allclose(use[g], want, rtol=1e-5)


@pytest.mark.slow
def test_belady_offline_hit_rate_beats_every_online_baseline_where_the_pool_binds():
    """toy, agentic, GPU pool 40,000 tokens, load 3, 20 s, 4 paired scenarios (the setting of
    serve/offline.py's docstring): mean hit rate >= every online baseline's."""
    from kvjax.rollout import rollout

    env, p = kvjax.make(
        "kv-serve-v0", preset="toy", horizon=20.0, config=SMALL, **EPISODES["agentic"]
    )
    hit = {}
    for name in ("engine_default", *BASELINES):
        res = rollout(make_policy(name, env), jax.random.PRNGKey(0), 4, p, env, progress=False)
        hit[name] = float(np.mean(res["hit_rate"]))
    assert int(np.sum(res["invalid_commands"])) == 0
    online = {k: v for k, v in hit.items() if k != "belady_offline"}
    assert hit["belady_offline"] >= max(online.values()), hit
