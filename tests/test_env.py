"""Core environment contract: API, determinism, batching, invariants, hand-built dynamics."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import trees_equal
from hypothesis import given, settings
from hypothesis import strategies as st

import kvjax
from kvjax import dynamics, rewards, scenarios
from kvjax.types import CPU, GPU

ENV, PARAMS = kvjax.make("kv-cache-v0", difficulty="all")
CFG = ENV.config
S, A, T = CFG.max_seqs, CFG.max_actions, CFG.episode_len
KEY = jax.random.PRNGKey(0)
# Hand-built cases: 1,000 fp16 tokens of KV at budget 1.0 (kv_cache_bytes in bytes).
SMALL = PARAMS.replace(kv_cache_bytes=1000.0 * 131072.0, max_wait_steps=2)

reset = jax.jit(ENV.reset_env)
step = jax.jit(ENV.step_env)
vreset = jax.jit(jax.vmap(ENV.reset_env, in_axes=(0, None)))
vstep = jax.jit(jax.vmap(ENV.step_env, in_axes=(0, 0, 0, None)))


def keep() -> jnp.ndarray:
    return jnp.zeros((A,), jnp.int32)


def act(*ops: tuple[str, int]) -> jnp.ndarray:
    ids = [ENV.encode_action(k, s) for k, s in ops] + [0] * (A - len(ops))
    return jnp.asarray(ids, jnp.int32)


def random_valid(key, state):
    logits = jnp.where(kvjax.action_mask(state), 0.0, -jnp.inf)
    return jax.random.categorical(key, logits, shape=(A,)).astype(jnp.int32)


@pytest.fixture(scope="module")
def batch():
    keys = jax.random.split(KEY, 64)
    obs, state = vreset(keys, PARAMS)
    actions = jax.vmap(random_valid)(keys, state)
    return keys, state, actions


def tree_equal(a, b, atol=0.0) -> bool:
    return trees_equal(a, b, atol=atol)


# -- API and batching ---------------------------------------------------------------------------


def test_jit_and_eager_agree(batch):
    keys, state, actions = batch
    one = jax.tree_util.tree_map(lambda x: x[3], state)
    eager = ENV.step_env(keys[3], one, actions[3], PARAMS)
    jitted = step(keys[3], one, actions[3], PARAMS)
    assert tree_equal(eager, jitted, atol=1e-6)


def test_vmap_equals_loop_of_single_steps(batch):
    keys, state, actions = batch
    out = vstep(keys, state, actions, PARAMS)
    for i in range(64):
        one = jax.tree_util.tree_map(lambda x, i=i: x[i], state)
        single = step(keys[i], one, actions[i], PARAMS)
        batched = jax.tree_util.tree_map(lambda x, i=i: x[i], out)
        assert tree_equal(batched[1], single[1])  # the state is bit-identical
        assert tree_equal(batched, single, atol=1e-6)  # float features up to rounding


def test_same_key_same_trajectory_and_different_keys_differ():
    def trajectory(key):
        _, s = reset(key, PARAMS)
        out = []
        for t in range(T):
            k = jax.random.fold_in(key, t)
            _, s, r, *_ = step(k, s, random_valid(k, s), PARAMS)
            out.append((s, r))
        return out

    a, b = trajectory(jax.random.PRNGKey(7)), trajectory(jax.random.PRNGKey(7))
    assert tree_equal(a, b)
    c = trajectory(jax.random.PRNGKey(8))
    assert not tree_equal(a[-1][0].slots.tokens, c[-1][0].slots.tokens)


def test_no_retracing():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def traced_step(key, state, action):
        return ENV.step(key, state, action, PARAMS)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def traced_reset(key):
        return ENV.reset(key, PARAMS)

    _, s = traced_reset(KEY)
    for t in range(T + 3):  # crosses an auto-reset
        k = jax.random.fold_in(KEY, t)
        _, s = traced_reset(k)[0], traced_step(k, s, random_valid(k, s))[1]
    chex.clear_trace_counter()


def test_reset_and_step_give_identical_structure_and_dtypes():
    obs0, s0 = reset(KEY, PARAMS)
    obs1, s1, r, term, trunc, info = ENV.step(KEY, s0, keep(), PARAMS)
    for a, b in [(obs0, obs1), (s0, s1), (obs0, info["final_observation"])]:
        chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
    assert r.dtype == jnp.float32 and term.dtype == jnp.bool_ and trunc.dtype == jnp.bool_
    assert ENV.observation_space(PARAMS).contains(
        {"slots": obs0.slots, "globals": obs0.globals, "action_mask": obs0.action_mask}
    )


def test_auto_reset_keeps_final_observation():
    _, s = reset(KEY, PARAMS)
    for t in range(T):
        obs, s_next, r, term, trunc, info = ENV.step(jax.random.fold_in(KEY, t), s, keep(), PARAMS)
        if t < T - 1:
            assert not bool(trunc) and int(s_next.time) == t + 1
        s_prev, s = s, s_next
    assert bool(trunc) and not bool(term)
    assert int(s.time) == 0  # auto-reset happened
    expected_final = ENV.step_env(KEY, s_prev, keep(), PARAMS)[0]
    assert tree_equal(info["final_observation"], expected_final)
    assert tree_equal(obs, ENV.get_obs(s, PARAMS))


def test_spaces_sample_and_contains():
    space = ENV.action_space(PARAMS)
    a = space.sample(KEY)
    assert a.shape == (A,) and bool(space.contains(a))
    assert not bool(space.contains(jnp.array([0, 0, ENV.num_actions], jnp.int32)))
    assert not bool(space.contains(jnp.zeros((A + 1,), jnp.int32)))
    obs_space = ENV.observation_space(PARAMS)
    assert bool(obs_space.contains(obs_space.sample(KEY)))


def test_action_encoding_round_trips():
    for kind in kvjax.ACTION_KINDS[1:]:
        for slot in (0, 5, S - 1):
            assert ENV.decode_action(ENV.encode_action(kind, slot)) == (kind, slot)
    assert ENV.encode_action("keep") == 0 and ENV.decode_action(0) == ("keep", -1)


# -- bad input ----------------------------------------------------------------------------------


def test_bad_arguments_raise_value_errors_naming_allowed_values():
    with pytest.raises(ValueError, match="easy.*medium.*hard.*all"):
        kvjax.make("kv-cache-v0", difficulty="extreme")
    with pytest.raises(ValueError, match="kv-cache-v0"):
        kvjax.make("kv-cache-v1")
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        ENV.step_env(KEY, reset(KEY, PARAMS)[1], jnp.zeros((4,), jnp.int32), PARAMS)
    with pytest.raises(ValueError, match="integer"):
        ENV.step_env(KEY, reset(KEY, PARAMS)[1], jnp.zeros((A,), jnp.float32), PARAMS)
    with pytest.raises(ValueError, match="keep.*evict.*compress.*swap_to_cpu"):
        ENV.encode_action("drop", 1)
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        ENV.encode_action("evict", S)
    with pytest.raises(ValueError, match="max_seqs"):
        kvjax.KVCacheEnv(max_slots=4)
    with pytest.raises(ValueError, match="allowed"):
        scenarios.build(CFG, SMALL, slots={0: dict(size=3)})


# -- invariants under random play ---------------------------------------------------------------


def check_invariants(state, params) -> None:
    s = jax.device_get(state.slots)
    active = np.asarray(s.active)
    factor = 0.5 ** np.asarray(s.precision, np.float64)
    on_gpu = active & (np.asarray(s.location) == GPU)
    used = float(np.sum(np.where(on_gpu, np.asarray(s.tokens) * factor, 0.0)))
    budget = float(state.memory_budget) * float(params.kv_cache_bytes / params.kv_bytes_per_token)
    # Memory used equals the sum over GPU-resident sequences, and usage is that over the budget.
    assert float(scenarios.gpu_tokens(state.slots)) == pytest.approx(used, rel=1e-6)
    assert float(scenarios.usage(state, params)) == pytest.approx(used / budget, rel=1e-6)
    # After a step the engine has preempted down to the budget; usage_peak is the pre-preemption
    # value and is not clamped.
    if int(state.time) > 0:
        assert used <= budget * (1 + 1e-6)
    for leaf in jax.tree_util.tree_leaves(state):
        arr = np.asarray(leaf)
        if arr.dtype.kind == "f":
            assert np.all(np.isfinite(arr))
    for name in ("tokens", "remaining", "tool_wait", "tool_countdown", "precision"):
        assert np.all(np.asarray(getattr(s, name))[active] >= 0), name
    assert np.all(np.asarray(s.precision)[active] <= 2)
    assert np.all(np.asarray(s.seq_id)[~active] == -1)
    ids = np.asarray(s.seq_id)[active]
    assert len(set(ids.tolist())) == len(ids)
    c = jax.device_get(state.counters)
    for name, value in vars(c).items():
        if name != "headroom":  # the headroom score is -0.5 for a step above the budget
            assert np.asarray(value) >= 0, name
    assert int(c.failures) == int(c.preemptions) + int(c.queue_overflows) + int(c.queue_timeouts)
    q = jax.device_get(state.pending)
    n = int(np.sum(q.valid))
    assert np.all(np.asarray(q.valid)[:n]) and not np.any(np.asarray(q.valid)[n:])
    assert np.all(np.diff(np.asarray(q.arrival_step)[:n]) >= 0)  # FIFO


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    difficulty=st.sampled_from([0, 1, 2, 3]),
    raw=st.lists(st.integers(-5, 1 + 3 * S + 5), min_size=A * T, max_size=A * T),
)
def test_random_episodes_keep_invariants(seed, difficulty, raw):
    params = PARAMS.replace(difficulty=difficulty)
    _, s = reset(jax.random.PRNGKey(seed), params)
    check_invariants(s, params)
    total = 0.0
    invalid = 0
    for t in range(T):
        a = jnp.asarray(raw[t * A : (t + 1) * A], jnp.int32)
        invalid += sum(1 for x in raw[t * A : (t + 1) * A] if not 0 <= x < 1 + 3 * S)
        _, s, r, term, trunc, info = step(KEY, s, a, params)
        total += float(r)
        check_invariants(s, params)
        assert bool(trunc) == (t == T - 1) and not bool(term)
    # Out-of-range ids are always counted no-ops (in-range ones may be invalid too).
    assert int(s.counters.invalid_actions) >= invalid
    assert total == pytest.approx(float(kvjax.rubric(s, params)["total"]), abs=1e-5)


def test_empty_slots_are_inert(batch):
    keys, state, actions = batch
    noise = jax.random.randint(KEY, state.slots.tokens.shape, 1, 999)
    empty = ~state.slots.active

    def scramble(x):
        if x.dtype == jnp.bool_:
            return x
        return jnp.where(empty, (noise % 3).astype(x.dtype) if x.dtype == jnp.int32 else 0.5, x)

    dirty = state.replace(
        slots=jax.tree_util.tree_map(scramble, state.slots).replace(
            active=state.slots.active, seq_id=state.slots.seq_id
        )
    )
    clean_out = vstep(keys, state, actions, PARAMS)
    dirty_out = vstep(keys, dirty, actions, PARAMS)
    # Observations, rewards and every active row agree.
    assert tree_equal(clean_out[0], dirty_out[0])
    assert tree_equal(clean_out[2], dirty_out[2])
    c_slots, d_slots = clean_out[1].slots, dirty_out[1].slots
    assert np.array_equal(c_slots.active, d_slots.active)
    m = np.asarray(c_slots.active)
    for f in ("tokens", "precision", "location", "remaining", "seq_id", "tool_wait"):
        c_f, d_f = np.asarray(getattr(c_slots, f)), np.asarray(getattr(d_slots, f))
        assert np.array_equal(c_f[m], d_f[m])


def test_usage_is_not_clamped_at_reset():
    _, s = vreset(jax.random.split(KEY, 512), PARAMS.replace(difficulty=2))
    u = jax.vmap(scenarios.usage, in_axes=(0, None))(s, PARAMS)
    assert float(u.max()) > 1.0  # hard scenarios can start above their budget
    assert np.allclose(np.asarray(u), np.asarray(s.usage_peak))


def test_keep_only_fails_more_on_hard_than_easy():
    def episode(key, params):
        _, s = ENV.reset_env(key, params)
        s = jax.lax.fori_loop(0, T, lambda t, s: dynamics.step_dynamics(s, keep(), params, CFG), s)
        return s.counters.failures

    run = jax.jit(jax.vmap(episode, in_axes=(0, None)))
    keys = jax.random.split(jax.random.PRNGKey(1), 1024)
    easy = np.asarray(run(keys, PARAMS.replace(difficulty=0)))
    hard = np.asarray(run(keys, PARAMS.replace(difficulty=2)))
    assert hard.mean() > easy.mean() + 3 * np.sqrt(hard.var() / 1024 + easy.var() / 1024)


def test_tiers_draw_their_documented_budgets():
    for tier, (lo, hi) in enumerate(zip(scenarios.BUDGET_LO, scenarios.BUDGET_HI, strict=True)):
        _, s = vreset(jax.random.split(KEY, 256), PARAMS.replace(difficulty=tier))
        b = np.asarray(s.memory_budget)
        assert b.min() >= lo - 1e-6 and b.max() <= hi + 1e-6
        assert np.all(np.asarray(s.tier) == tier)
        assert set(np.unique(np.asarray(s.regime)).tolist()) == set(scenarios.TIER_REGIMES[tier])
    _, s = vreset(jax.random.split(KEY, 256), PARAMS)  # "all" mixes tiers per scenario
    assert set(np.unique(np.asarray(s.tier)).tolist()) == {0, 1, 2}


# -- hand-built cases with exact outcomes --------------------------------------------------------


def one_step(state, action, params=SMALL):
    return step(KEY, state, action, params)


def test_evict_frees_memory_and_scores_the_eviction():
    s = scenarios.build(CFG, SMALL, slots={
        0: dict(block_type=0, tokens=100, output_len=0, priority=100),
        1: dict(block_type=4, tokens=300, priority=0, output_len=20),
        2: dict(block_type=1, tokens=200, priority=80, output_len=20),
    })  # fmt: skip
    _, s1, r, *_ = one_step(s, act(("evict", 1), ("evict", 2)))
    c = s1.counters
    assert not bool(s1.slots.active[1]) and not bool(s1.slots.active[2])
    assert int(s1.slots.seq_id[1]) == -1
    assert int(c.evictions) == 2 and int(c.high_value_lost) == 1 and int(c.risky_evictions) == 1
    assert float(c.eviction_value_sum) == pytest.approx(1.0 + 0.2)
    # The system prompt does not decode; nothing else is left, so no tokens.
    assert float(c.raw_tokens) == 0.0
    assert float(scenarios.gpu_tokens(s1.slots)) == 100.0
    rub = kvjax.rubric(s1, SMALL)
    assert float(rub["eviction_quality"]) == pytest.approx(0.6 - 0.25)
    assert float(rub["risky_eviction_penalty"]) == pytest.approx(-0.25)
    assert float(rub["headroom_bonus"]) == pytest.approx(1.0 / T)  # peak 0.1 < 0.8
    assert float(rub["memory_efficiency"]) == pytest.approx(0.2)
    assert float(r) == pytest.approx(float(rub["total"]), abs=1e-6)


def test_compress_halves_memory_twice_then_is_invalid():
    s = scenarios.build(CFG, SMALL, slots={0: dict(block_type=3, tokens=400, output_len=100)})
    _, s1, *_ = one_step(s, act(("compress", 0), ("compress", 0), ("compress", 0)))
    assert int(s1.slots.precision[0]) == 2
    assert int(s1.counters.compressions) == 2 and int(s1.counters.invalid_actions) == 1
    # 403 tokens (3 decoded) at int4 = 100.75 fp16-token equivalents.
    assert int(s1.slots.tokens[0]) == 403
    assert float(scenarios.gpu_tokens(s1.slots)) == pytest.approx(403 * 0.25)
    # Reasoning at int4 keeps half of each token's value.
    assert float(s1.counters.tokens) == pytest.approx(3 * 0.5)
    assert float(s1.counters.raw_tokens) == 3.0


def test_swap_to_cpu_frees_gpu_adds_latency_and_stalls():
    s = scenarios.build(CFG, SMALL.replace(admit_watermark=0.0), slots={
        0: dict(block_type=2, tokens=500, output_len=50),
        1: dict(block_type=2, tokens=100, output_len=50),
    })  # fmt: skip
    _, s1, *_ = one_step(s, act(("swap_to_cpu", 0), ("swap_to_cpu", 0)), SMALL.replace(
        admit_watermark=0.0))  # fmt: skip
    assert int(s1.slots.location[0]) == CPU
    assert int(s1.counters.swaps) == 1 and int(s1.counters.invalid_actions) == 1
    assert float(scenarios.gpu_tokens(s1.slots)) == 103.0  # slot 1 decoded 3 tokens
    transfer = 500 * 131072.0 / 50e9
    # The swapped sequence is ready but on the CPU (watermark 0 blocks swap-in): it stalls.
    assert float(s1.counters.latency) == pytest.approx(transfer + 0.1, rel=1e-5)
    assert int(s1.slots.remaining[0]) == 50  # no progress on the CPU
    # With room again, the engine swaps it back in (transfer again) and it decodes.
    _, s2, *_ = one_step(s1, keep())
    assert int(s2.slots.location[0]) == GPU and int(s2.counters.swap_ins) == 1
    assert float(s2.counters.latency) == pytest.approx(2 * transfer + 0.1, rel=1e-5)
    assert int(s2.slots.remaining[0]) == 47


def test_invalid_actions_are_counted_no_ops():
    s = scenarios.build(CFG, SMALL, slots={0: dict(tokens=100, location=CPU)})
    bad = jnp.asarray([ENV.encode_action("evict", 5), 1 + 3 * S, -3], jnp.int32)
    _, s1, *_ = one_step(s, bad)
    _, s_keep, *_ = one_step(s, keep())
    assert int(s1.counters.invalid_actions) == 3
    assert tree_equal(s1.slots, s_keep.slots)
    _, s2, *_ = one_step(s, act(("swap_to_cpu", 0), ("compress", 0)))  # already on the CPU
    assert int(s2.counters.invalid_actions) == 2


def test_forced_preemption_takes_newest_non_system_first():
    s = scenarios.build(CFG, SMALL, slots={
        0: dict(block_type=0, tokens=300, output_len=0, priority=100, arrival_step=-50),
        1: dict(block_type=2, tokens=300, arrival_step=-10),
        2: dict(block_type=2, tokens=300, arrival_step=-5),
        3: dict(block_type=1, tokens=200, arrival_step=-3),
    })  # fmt: skip
    # 1,100 tokens on a 1,000 budget, +9 decoded: preempt slot 3 (newest) and stop (909 fits).
    _, s1, *_ = one_step(s, keep())
    assert np.asarray(s1.slots.active)[:4].tolist() == [True, True, True, False]
    c = s1.counters
    assert int(c.preemptions) == 1 and int(c.failures) == 1 and int(c.high_value_lost) == 1
    assert float(s1.usage_peak) == pytest.approx(1109 / 1000)
    assert int(s1.time_above_0_95) == 1
    rub = kvjax.rubric(s1, SMALL)
    assert float(rub["memory_efficiency"]) == pytest.approx(-0.2)
    assert float(rub["headroom_bonus"]) == pytest.approx(-0.5 / T)
    assert float(rub["failure_penalty"]) == pytest.approx(-0.15)


def test_admission_is_fifo_into_free_slots_up_to_the_watermark():
    s = scenarios.build(
        CFG, SMALL,
        slots={0: dict(tokens=500, output_len=100), 2: dict(tokens=100, output_len=100)},
        pending=[dict(tokens=200, seq_id=11), dict(tokens=300, seq_id=12),
                 dict(tokens=50, seq_id=13)],
    )  # fmt: skip
    # Room = 0.9 * 1000 - 600 = 300: the first (200) fits, the second (300) does not and blocks
    # the third (FIFO, no skipping).
    _, s1, *_ = one_step(s, keep())
    assert int(s1.slots.seq_id[1]) == 11 and int(s1.slots.tokens[1]) == 203
    assert int(s1.slots.remaining[1]) == 7 and int(s1.slots.last_access[1]) == 0
    assert np.asarray(s1.pending.seq_id)[:2].tolist() == [12, 13]
    assert int(s1.pending_queue_growth) == -1


def test_queue_timeouts_and_overflow_are_failures():
    full = [dict(tokens=900, arrival_step=-1)] * CFG.max_pending
    s = scenarios.build(
        CFG, SMALL, slots={0: dict(tokens=850, output_len=100)}, pending=full,
        arrivals={0: [dict(tokens=10)] * 3},
    )  # fmt: skip
    _, s1, *_ = one_step(s, keep())
    # Nothing fits; waits are 1 (< 2): no timeouts yet, but the 3 arrivals overflow.
    assert int(s1.counters.queue_overflows) == 3 and int(s1.counters.queue_timeouts) == 0
    _, s2, *_ = one_step(s1, keep())
    assert int(s2.counters.queue_timeouts) == CFG.max_pending
    assert int(s2.counters.failures) == 3 + CFG.max_pending
    assert int(jnp.sum(s2.pending.valid)) == 0


def test_tool_calls_pause_then_append_their_result():
    s = scenarios.build(CFG, SMALL, slots={
        0: dict(block_type=1, tokens=100, output_len=30, tool_period=1, tool_wait_len=2,
                tool_tokens=40, tool_countdown=1),
    })  # fmt: skip
    _, s1, *_ = one_step(s, keep())  # decodes 3, then calls the tool
    assert int(s1.slots.tool_wait[0]) == 2 and int(s1.slots.tokens[0]) == 103
    _, s2, *_ = one_step(s1, keep())  # paused: no progress
    assert int(s2.slots.tool_wait[0]) == 1 and int(s2.slots.remaining[0]) == 27
    _, s3, *_ = one_step(s2, keep())  # the tool returns: +40 tokens, not yet decoding
    assert int(s3.slots.tool_wait[0]) == 0 and int(s3.slots.tokens[0]) == 143
    _, s4, *_ = one_step(s3, keep())
    assert int(s4.slots.remaining[0]) == 24 and int(s4.slots.tool_wait[0]) == 2


def test_completion_frees_the_slot():
    s = scenarios.build(CFG, SMALL, slots={0: dict(tokens=100, output_len=5, remaining=2)})
    _, s1, *_ = one_step(s, keep())
    assert not bool(s1.slots.active[0]) and int(s1.counters.completed) == 1
    assert float(s1.counters.raw_tokens) == 2.0


def test_rubric_is_zero_before_the_first_step():
    _, s = reset(KEY, PARAMS)
    rub = kvjax.rubric(s, PARAMS)
    assert all(float(v) == 0.0 for k, v in rub.items() if k in rewards.COMPONENTS)
    assert float(rub["total"]) == 0.0


def test_failure_penalty_matches_the_seed_formula():
    _, s = reset(KEY, PARAMS)
    for f, expected in [(1, -0.15), (2, -0.30), (3, -0.55), (5, -1.0)]:
        s = s.replace(counters=s.counters.replace(failures=jnp.int32(f)))
        assert float(kvjax.rubric(s, PARAMS)["failure_penalty"]) == pytest.approx(expected)


def test_summarize_has_the_seed_fields_and_is_json():
    _, s = reset(KEY, PARAMS)
    summary = kvjax.summarize(s, PARAMS)
    for field in ("memory_usage", "memory_budget", "episode_remaining", "time_above_0_95",
                  "pending_queue_growth", "cache_overview", "top_memory_entries",
                  "top_eviction_candidates", "pending_summary", "visible_seq_ids"):  # fmt: skip
        assert field in summary
    json.dumps(summary)
    assert summary["memory_usage"] == pytest.approx(float(scenarios.usage(s, PARAMS)), abs=1e-4)
    ids = set(np.asarray(s.slots.seq_id)[np.asarray(s.slots.active)].tolist())
    assert set(summary["visible_seq_ids"]) == ids
    values = [e["eviction_value"] for e in summary["top_eviction_candidates"]]
    assert values == sorted(values, reverse=True)
