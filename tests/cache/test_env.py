"""kvjax.cache.env: the API contract, determinism, batching, bad input and invariants under random
play (hand-built dynamics: test_dynamics.py; scenarios, rubric, summary: their own modules)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trees import trees_equal

import kvjax
from kvjax.cache import scenarios
from kvjax.cache.types import GPU

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


def test_vmapped_auto_reset_equals_gymnax_select_form():
    """Under vmap, env.step resets and picks only when some scenario is done (a custom batching
    rule); its outputs equal the base class's branch-free form (reset every step, pick both
    the state and the observation) on synchronised and desynchronised batches, and under a
    nested vmap. States exactly; floats to float32 rounding (different programs may fuse
    sums differently)."""
    from kvjax.base import Environment

    n = 32
    space = ENV.action_space(PARAMS)
    fast = jax.jit(jax.vmap(ENV.step, in_axes=(0, 0, 0, None)))
    plain = jax.jit(jax.vmap(lambda k, s, a: Environment.step(ENV, k, s, a, PARAMS)))
    nested = jax.jit(jax.vmap(jax.vmap(ENV.step, in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, None)))
    _, s = vreset(jax.random.split(KEY, n), PARAMS)
    resets = 0
    for t in range(2 * T + 3):
        keys = jax.random.split(jax.random.fold_in(KEY, t), n)
        a = jax.vmap(space.sample)(keys)
        got, want = fast(keys, s, a, PARAMS), plain(keys, s, a)
        assert trees_equal(got, want, atol=1e-5)  # integers and bools exactly
        two = jax.tree_util.tree_map(lambda x: x.reshape((2, n // 2) + x.shape[1:]), (keys, s, a))
        flat = jax.tree_util.tree_map(lambda x: x.reshape((n,) + x.shape[2:]),
                                      nested(*two, PARAMS))
        assert trees_equal(flat, want, atol=1e-5)
        resets += int(jnp.sum(got[4]))
        s = got[1]
        if t == 5:  # desynchronise: half the batch restarts
            _, fresh = vreset(jax.random.split(jax.random.PRNGKey(9), n), PARAMS)
            half = jnp.arange(n) < n // 2
            s = jax.tree_util.tree_map(
                lambda x, y, h=half: jnp.where(h.reshape((n,) + (1,) * (x.ndim - 1)), x, y),
                fresh, s)
    assert resets == 3 * n // 2  # half the batch truncates at steps 14 and 29, half at 20


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
