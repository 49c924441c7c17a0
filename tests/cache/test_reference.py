"""Parity of the JAX step (`env.step_env`, `dynamics.apply_actions`, `rubric`) with the plain
Python reference in `kvjax/cache/reference.py`, on thousands of random states and actions and on
whole episodes.

States come from one vmapped reset over many keys (all tiers, and per-scenario parameters that
push the queue, the watermark and the decode rate around), advanced a random number of steps with
random actions so they include CPU-resident, compressed, tool-paused and full-queue cases. The JAX
side runs as one jitted vmapped call; the reference runs in a loop. Coverage of the interesting
cases is asserted, so the parity claim cannot silently become vacuous.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvjax
from kvjax.cache import reference as ref
from kvjax.cache.dynamics import apply_actions
from kvjax.cache.types import EnvParams

N = 512  # scenarios per batch (one compile, reused by every test here)
TOL = 1e-5
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


# -- helpers ---------------------------------------------------------------------------------------
def batched_params(rng: np.random.Generator | None, n: int, **fixed: float) -> EnvParams:
    """Every EnvParams leaf batched (same dtypes, so one compile serves all). With `rng`,
    difficulty cycles over all tiers (and 'all') and a few engine parameters vary so queues fill,
    the watermark binds and decoding finishes early; `fixed` overrides leaves."""
    base = EnvParams()
    leaves = {k: np.full(n, v) for k, v in vars(base).items()}
    if rng is not None:
        leaves["difficulty"] = np.arange(n) % 4
        leaves["arrival_scale"] = rng.choice([0.5, 1.0, 1.0, 2.0, 4.0], n)
        leaves["max_wait_steps"] = rng.choice([2, 4, 4, 8], n)
        leaves["admit_watermark"] = rng.choice([0.8, 0.9, 0.9, 1.0], n)
        leaves["decode_tokens_per_step"] = rng.choice([1, 3, 3, 8], n)
    leaves.update({k: np.full(n, v) for k, v in fixed.items()})
    out = {}
    for k, v in leaves.items():
        is_float = isinstance(getattr(base, k), float)
        out[k] = jnp.asarray(v, jnp.float32 if is_float else jnp.int32)
    return EnvParams(**out)


def valid_ids(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """One uniformly drawn valid action id per row of a [n, 1 + 3S] mask."""
    return np.argmax(np.where(mask, rng.random(mask.shape), -1.0), axis=1).astype(np.int64)


def mixed_actions(rng: np.random.Generator, mask: np.ndarray, A: int) -> np.ndarray:
    """[n, A] ids: keep, valid ids, arbitrary in-range ids, out-of-range and negative ids."""
    n, n_ids = mask.shape
    cols = []
    for _ in range(A):
        kind = rng.choice(5, n, p=[0.2, 0.45, 0.15, 0.1, 0.1])
        junk = rng.choice([-1, -2, n_ids, n_ids + 1, 4 * n_ids, INT32_MIN, INT32_MAX], n)
        cols.append(
            np.select(
                [kind == 0, kind == 1, kind == 2, kind == 3],
                [0, valid_ids(rng, mask), rng.integers(0, n_ids, n), junk],
                rng.integers(-n_ids, 2 * n_ids, n),
            )
        )
    return np.stack(cols, axis=1).astype(np.int32)


def repeated_actions(rng: np.random.Generator, mask: np.ndarray, A: int) -> np.ndarray:
    """The same valid id A times (compress twice then invalid, evict then invalid ...), or an
    evict that follows a compress / swap of the same slot."""
    n = mask.shape[0]
    S = (mask.shape[1] - 1) // 3
    a = valid_ids(rng, mask)
    slot = (np.maximum(a, 1) - 1) % S
    other = 1 + rng.integers(1, 3, n) * S + slot  # compress or swap of the same slot
    evict = 1 + slot
    rows = np.where(
        (rng.random(n) < 0.5)[:, None],
        np.stack([a] * A, axis=1),
        np.stack([other, evict, other][:A], axis=1),
    )
    return rows.astype(np.int32)


def compare(ref_arrays: dict, jax_arrays: dict, what: str, path: str = "") -> None:
    """Every leaf equal (ints, bools) or within TOL (floats); names the first mismatches."""
    for k, r in ref_arrays.items():
        j = jax_arrays[k]
        p = f"{path}.{k}"
        if isinstance(r, dict):
            compare(r, j, what, p)
            continue
        r, j = np.asarray(r), np.asarray(j)
        assert r.shape == j.shape and r.dtype == j.dtype, (what, p, r.shape, j.shape, j.dtype)
        if np.issubdtype(r.dtype, np.floating):
            ok = np.isclose(r, j, rtol=TOL, atol=TOL)
        else:
            ok = r == j
        if not ok.all():
            bad = np.argwhere(~ok)[:5]
            pytest.fail(f"{what}: {p} differs at {bad.tolist()}: ref {r[~ok][:5]} jax {j[~ok][:5]}")


def compare_rubrics(ref_rubrics: list[dict], jax_rubric: dict, what: str) -> None:
    for k, v in jax_rubric.items():
        r = np.array([x[k] for x in ref_rubrics])
        j = np.asarray(v, np.float64)[: len(r)]
        np.testing.assert_allclose(r, j, rtol=TOL, atol=TOL, err_msg=f"{what}: rubric {k}")


def row(tree, i: int):
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def take(tree, n: int):
    return jax.tree_util.tree_map(lambda x: x[:n], tree)


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env():
    return kvjax.make("kv-cache-v0")[0]


@pytest.fixture(scope="module")
def fns(env):
    """The jitted, vmapped JAX functions (compiled once for batch N)."""
    cfg = env.config
    return dict(
        # Unbatched reset called per scenario: the vmapped generator compiles ~2x slower.
        reset=jax.jit(env.reset_env),
        step=jax.jit(jax.vmap(env.step_env, in_axes=(None, 0, 0, 0))),
        apply=jax.jit(jax.vmap(lambda s, a, p: apply_actions(s, a, p, cfg))),
        rubric=jax.jit(jax.vmap(kvjax.rubric)),
        select=jax.jit(
            lambda m, a, b: jax.tree_util.tree_map(
                lambda x, y: jnp.where(m.reshape(m.shape + (1,) * (x.ndim - 1)), x, y), a, b
            )
        ),
    )


@pytest.fixture(scope="module")
def world(env, fns):
    """N initial states, and N states each advanced 0..T steps with random actions."""
    rng = np.random.default_rng(1234)
    A, T = env.config.max_actions, env.config.episode_len
    params = batched_params(rng, N)
    host_params = jax.device_get(params)
    keys = jax.random.split(jax.random.PRNGKey(7), N)
    resets = jax.device_get([fns["reset"](keys[i], row(host_params, i)) for i in range(N)])
    obs0, init = jax.tree_util.tree_map(lambda *x: jnp.asarray(np.stack(x)), *resets)
    n_steps = rng.integers(0, T + 1, N)
    n_steps[:8] = T  # a few states past the last step (stepping on must stay defined)
    obs, state = obs0, init
    key = jax.random.PRNGKey(0)
    for t in range(T):
        mask = np.asarray(obs.action_mask)
        act = np.where(rng.random((N, A)) < 0.35, 0, mixed_actions(rng, mask, A))
        nobs, nstate, *_ = fns["step"](key, state, jnp.asarray(act, jnp.int32), params)
        obs, state = fns["select"](jnp.asarray(t < n_steps), (nobs, nstate), (obs, state))
    return dict(params=params, init=init, obs0=obs0, states=state, obs=obs)


@pytest.fixture(scope="module")
def ref_world(world):
    return ref.from_jax_batch(world["states"], world["params"])


# -- tests -----------------------------------------------------------------------------------------
def test_converters_round_trip(world, ref_world):
    """from_jax -> to_arrays reproduces the JAX state exactly (arrivals included); to_jax and
    from_jax invert each other; params come back as float32 values."""
    arrays = ref.state_arrays(world["states"])
    compare(ref.to_arrays_batch([s for s, _ in ref_world]), arrays, "round trip")
    s0, p0 = ref_world[3]
    one_ref, one_params = ref.from_jax(row(world["states"], 3), row(world["params"], 3))
    assert one_params == p0
    compare(ref.to_arrays(one_ref), ref.to_arrays(s0), "from_jax")
    compare(ref.to_arrays(ref.from_jax(ref.to_jax(s0), EnvParams())[0]), ref.to_arrays(s0),
            "to_jax")
    assert p0["admit_watermark"] == float(np.float32(world["params"].admit_watermark[3]))
    assert p0["swap_bandwidth"] == float(np.float32(50e9)) != 50e9
    with pytest.raises(ValueError, match="unbatched"):
        ref.from_jax(world["states"], EnvParams())


def test_states_cover_the_interesting_cases(env, world, ref_world):
    """The random states include every case the parity tests claim to cover."""
    P = env.config.max_pending
    slots = [s for st_, _ in ref_world for s in st_["slots"] if s is not None]
    assert sum(s["location"] == ref.CPU for s in slots) >= 20
    assert sum(s["precision"] == 1 for s in slots) >= 20
    assert sum(s["precision"] == 2 for s in slots) >= 20
    assert sum(s["tool_wait"] > 0 for s in slots) >= 20
    assert sum(s["location"] == ref.CPU and s["tool_wait"] > 0 for s in slots) >= 5
    assert sum(len(st_["pending"]) == P for st_, _ in ref_world) >= 5
    assert sum(st_["usage_peak"] > 1.0 for st_, _ in ref_world) >= 10
    times = [st_["time"] for st_, _ in ref_world]
    assert min(times) == 0 and max(times) == env.config.episode_len
    assert {st_["tier"] for st_, _ in ref_world} == {0, 1, 2}


def test_one_step_parity_on_random_states_and_actions(env, fns, world, ref_world):
    """4 x N (state, action) pairs: all valid, mixed with invalid / out-of-range / negative ids,
    repeated ids on one slot, keep-only. Every state field, the reward, the rubric and the next
    action mask agree; the transitions exercise every rule."""
    rng = np.random.default_rng(99)
    A = env.config.max_actions
    mask = np.asarray(world["obs"].action_mask)
    np.testing.assert_array_equal(mask, np.array([ref.action_mask(s) for s, _ in ref_world]))
    action_sets = {
        "valid": np.stack([valid_ids(rng, mask) for _ in range(A)], axis=1).astype(np.int32),
        "mixed": mixed_actions(rng, mask, A),
        "repeated": repeated_actions(rng, mask, A),
        "keep": np.zeros((N, A), np.int32),
    }
    seen = dict.fromkeys(ref.INT_COUNTERS, 0)
    key = jax.random.PRNGKey(0)
    for name, acts in action_sets.items():
        obs, nstate, reward, _, _, info = fns["step"](key, world["states"], jnp.asarray(acts),
                                                      world["params"])
        nexts = [
            ref.step(s, a.tolist(), p, env.config.max_seqs)
            for (s, p), a in zip(ref_world, acts, strict=True)
        ]
        compare(ref.to_arrays_batch(nexts), ref.state_arrays(nstate), f"step[{name}]")
        rubrics = [ref.rubric(s, p) for s, (_, p) in zip(nexts, ref_world, strict=True)]
        compare_rubrics(rubrics, fns["rubric"](nstate, world["params"]), f"step[{name}]")
        r_reward = np.array(
            [r["total"] - ref.total(s, p) for r, (s, p) in zip(rubrics, ref_world, strict=True)]
        )
        np.testing.assert_allclose(r_reward, np.asarray(reward), atol=TOL, rtol=0)
        np.testing.assert_array_equal(
            np.asarray(obs.action_mask), np.array([ref.action_mask(s) for s in nexts])
        )
        for k in seen:
            seen[k] += sum(s["counters"][k] > s0["counters"][k]
                           for s, (s0, _) in zip(nexts, ref_world, strict=True))
    # Each rule fired in many of the compared transitions.
    for k, n in seen.items():
        assert n >= 10, f"only {n} transitions exercised {k}"


def crowded(rng: np.random.Generator, state: dict) -> dict:
    """The state with all but 0-2 empty slots filled by small int4 sequences paused on a tool
    call on the CPU (they hold slots without memory), so admission is limited by free slots."""
    state = ref.copy_state(state)
    empty = [i for i, s in enumerate(state["slots"]) if s is None]
    for i in empty[rng.integers(0, 3):]:
        state["slots"][i] = dict(
            seq_id=100_000 + i, block_type=ref.CONTEXT, tokens=64, precision=2,
            location=ref.CPU, priority=50, eviction_value=0.5, output_len=10, remaining=5,
            last_access=state["time"] - 1, tool_period=3, tool_wait_len=2, tool_tokens=16,
            tool_countdown=3, tool_wait=2, arrival_step=-100 - i,
        )
    return state


def test_admission_limited_by_free_slots(env, fns, world, ref_world):
    """Crowded states (hand-filled via to_jax_batch): the k-th admitted request goes to the k-th
    free slot and admission stops when the free slots run out; JAX and reference agree."""
    rng = np.random.default_rng(11)
    states = [crowded(rng, s) for s, _ in ref_world]
    jstate = ref.to_jax_batch(states)
    acts = mixed_actions(rng, np.array([ref.action_mask(s) for s in states]),
                         env.config.max_actions)
    _, nstate, reward, *_ = fns["step"](jax.random.PRNGKey(0), jstate, jnp.asarray(acts),
                                        world["params"])
    nexts = [ref.step(s, a.tolist(), p) for s, (_, p), a in zip(states, ref_world, acts,
                                                                  strict=True)]
    compare(ref.to_arrays_batch(nexts), ref.state_arrays(nstate), "crowded")
    r = [ref.total(b, p) - ref.total(a, p) for a, b, (_, p) in zip(states, nexts, ref_world,
                                                                     strict=True)]
    np.testing.assert_allclose(r, np.asarray(reward), atol=TOL, rtol=0)
    slot_bound = 0
    for a, b, (_, p), act in zip(states, nexts, ref_world, acts, strict=True):
        queued = {q["seq_id"] for q in a["pending"]}
        admitted = [s["seq_id"] for s in b["slots"] if s is not None and s["seq_id"] in queued]
        free = ref.apply_actions(a, act.tolist(), p)["slots"].count(None)
        slot_bound += 0 < free == len(admitted) < len(a["pending"])
    assert slot_bound >= 10


def blank(template: dict, budget_tokens: float) -> dict:
    """`template` with every slot empty, no pending request and the given budget (a float32
    value: budget_tokens / 65536 must be exact)."""
    state = ref.copy_state(template)
    state["slots"] = [None] * len(state["slots"])
    state["pending"] = []
    state["memory_budget"] = budget_tokens / 65536.0
    assert ref.f32(state["memory_budget"]) == state["memory_budget"]
    return state


def test_float32_boundaries(env, fns, ref_world):
    """Hand-built states on the float32 thresholds, with exact expected outcomes.

    Admission: with admit_watermark 0.95 and a budget of 34511.578125 tokens, float32 puts the
    watermark at 32786.0 while float64 puts it at 32785.99922 - a 32,786-token request is
    admitted (as JAX does), and a float64 reference would refuse it. Headroom, pressure and
    efficiency: a lone paused sequence of X tokens under a 50,000-token budget sits exactly on
    usage 0.8 / 0.85 / 0.95 / 1.0."""
    template = ref_world[0][0]
    t = template["time"]
    B1 = 34511.578125
    assert 0.95 * B1 < 32786 <= ref.f32(ref.f32(0.95) * B1)
    cases = []  # (state, expected admitted, expected headroom score, pressure, efficiency)
    for d in range(-4, 4):
        state = blank(template, B1)
        state["pending"] = [dict(
            seq_id=999, block_type=ref.GENERATION, tokens=32786 + d, output_len=5,
            priority=30, tool_period=0, tool_wait_len=0, tool_tokens=0, arrival_step=t - 1,
        )]
        cases.append((state, d <= 0, None, None, None))
    grid = [
        (39999, 1.0, 0, 0.2), (40000, 0.5, 0, 0.2), (42499, 0.5, 0, 0.2), (42500, 0.5, 0, 0.0),
        (47499, 0.5, 0, 0.0), (47500, 0.0, 0, 0.0), (47501, 0.0, 1, 0.0), (50000, 0.0, 1, 0.0),
        (50001, -0.5, 1, -0.2),
    ]
    for x, score, pressure, efficiency in grid:
        state = blank(template, 50000.0)
        state["slots"][0] = dict(
            seq_id=7, block_type=ref.CONTEXT, tokens=x, precision=0, location=ref.GPU,
            priority=50, eviction_value=0.5, output_len=10, remaining=5, last_access=t,
            tool_period=3, tool_wait_len=2, tool_tokens=16, tool_countdown=2, tool_wait=3,
            arrival_step=-5,
        )
        cases.append((state, None, score, pressure, efficiency))
    states = [c[0] for c in cases]
    states += [states[-1]] * (N - len(states))  # pad to the compiled batch size
    params = batched_params(None, N, admit_watermark=0.95)
    jstates = ref.to_jax_batch(states)
    p = ref.from_jax_batch(take(jstates, 1), take(params, 1))[0][1]
    _, nstate, *_ = fns["step"](jax.random.PRNGKey(0), jstates, jnp.zeros((N, 3), jnp.int32),
                                params)
    nexts = [ref.step(s, [0, 0, 0], p) for s in states]
    compare(ref.to_arrays_batch(nexts), ref.state_arrays(nstate), "boundaries")
    for (s0, admitted, score, pressure, efficiency), s1 in zip(cases, nexts, strict=False):
        if admitted is not None:
            assert (s1["slots"][0] is not None and s1["slots"][0]["seq_id"] == 999) == admitted
        else:
            assert s1["counters"]["headroom"] - s0["counters"]["headroom"] == score
            assert s1["time_above_0_95"] - s0["time_above_0_95"] == pressure
            assert ref.rubric(s1, p)["memory_efficiency"] == pytest.approx(efficiency)
            assert s1["counters"]["preemptions"] - s0["counters"]["preemptions"] == (score < 0)


def test_apply_actions_parity(env, fns, world, ref_world):
    """Phase 1 alone (time does not advance) matches the reference's apply_actions."""
    rng = np.random.default_rng(5)
    acts = mixed_actions(rng, np.asarray(world["obs"].action_mask), env.config.max_actions)
    out = fns["apply"](world["states"], jnp.asarray(acts), world["params"])
    nexts = [ref.apply_actions(s, a.tolist(), p) for (s, p), a in zip(ref_world, acts,
                                                                        strict=True)]
    compare(ref.to_arrays_batch(nexts), ref.state_arrays(out), "apply_actions")
    assert all(a["time"] == s["time"] for a, (s, _) in zip(nexts, ref_world, strict=True))


def test_whole_episodes_step_by_step(env, fns, world):
    """48 episodes from reset to truncation, random (partly invalid) actions: states and per-step
    rewards agree at every step, and each return equals the final rubric total (JAX and ref)."""
    n_ref = 48
    rng = np.random.default_rng(2024)
    A, T, S = env.config.max_actions, env.config.episode_len, env.config.max_seqs
    params, obs, state = world["params"], world["obs0"], world["init"]
    refs = ref.from_jax_batch(take(state, n_ref), take(params, n_ref))
    states = [s for s, _ in refs]
    jax_rewards, ref_rewards = [], []
    key = jax.random.PRNGKey(0)
    for t in range(T):
        acts = mixed_actions(rng, np.asarray(obs.action_mask), A)
        obs, state, reward, _, trunc, _ = fns["step"](key, state, jnp.asarray(acts), params)
        nexts = [ref.step(s, a.tolist(), p, S)
                 for s, (_, p), a in zip(states, refs, acts[:n_ref], strict=True)]
        ref_rewards.append([ref.total(b, p) - ref.total(a, p)
                            for a, b, (_, p) in zip(states, nexts, refs, strict=True)])
        jax_rewards.append(np.asarray(reward))
        states = nexts
        compare(ref.to_arrays_batch(states), ref.state_arrays(take(state, n_ref)),
                f"episode step {t}")
        assert bool(np.all(np.asarray(trunc))) == (t == T - 1)
    jr, rr = np.stack(jax_rewards), np.array(ref_rewards)  # [T, N], [T, n_ref]
    np.testing.assert_allclose(rr, jr[:, :n_ref], atol=TOL, rtol=0)
    final = fns["rubric"](state, params)
    np.testing.assert_allclose(jr.sum(axis=0), np.asarray(final["total"]), atol=1e-5)
    compare_rubrics([ref.rubric(s, p) for s, (_, p) in zip(states, refs, strict=True)], final,
                    "final")
    np.testing.assert_allclose(rr.sum(axis=0), [ref.total(s, p) for s, (_, p) in
                                                zip(states, refs, strict=True)], atol=1e-9)
    assert np.abs(jr).sum() > 0  # the rewards are not trivially zero


def test_rubric_is_zero_before_the_first_step(world, ref_world):
    """Every component is 0 at reset, so the return telescopes to the final total."""
    init = ref.from_jax_batch(take(world["init"], 16), take(world["params"], 16))
    for s, p in init:
        r = ref.rubric(s, p)
        assert all(r[k] == 0.0 for k in (*ref.COMPONENTS, "total"))


def test_run_episode_keep_and_random(world):
    """The speed-baseline helper plays to truncation; its return is the final total; it does
    not mutate its input state."""
    (s, p), = ref.from_jax_batch(take(world["init"], 1), take(world["params"], 1))
    before = ref.to_arrays(s)
    for policy in (ref.keep_policy(), ref.random_valid_policy(seed=3)):
        out = ref.run_episode(s, p, policy, max_seqs=len(s["slots"]))
        assert out["steps"] == len(s["arrivals"]) == out["state"]["time"]
        assert out["return"] == pytest.approx(out["rubric"]["total"], abs=1e-9)
    compare(ref.to_arrays(s), before, "purity")
    pairs = ref.from_jax_batch(take(world["init"], 4), take(world["params"], 4))
    timing = ref.time_episodes(pairs, ref.keep_policy())
    assert timing["episodes"] == 4 and timing["steps"] == 4 * len(s["arrivals"])
    assert timing["mean_return"] == pytest.approx(
        np.mean([ref.run_episode(a, b, ref.keep_policy())["return"] for a, b in pairs])
    )
    with pytest.raises(ValueError, match="max_seqs"):
        ref.step(s, [0], p, max_seqs=len(s["slots"]) + 1)


@pytest.fixture(scope="module")
def fixed_states(world, ref_world):
    """Eight fixed, diverse states (queue full, CPU-resident, compressed, tool-paused ...)."""
    picks = []
    tests = [
        lambda s: len(s["pending"]) == s["max_pending"],
        lambda s: any(x is not None and x["location"] == ref.CPU for x in s["slots"]),
        lambda s: any(x is not None and x["precision"] == 2 for x in s["slots"]),
        lambda s: any(x is not None and x["tool_wait"] > 0 for x in s["slots"]),
        lambda s: s["usage_peak"] > 1.0,
        lambda s: any(x is not None and x["location"] == ref.CPU and x["tool_wait"] == 0
                      and x["remaining"] > 0 for x in s["slots"]),  # stalled on the CPU
        lambda s: s["time"] == 0,
        lambda s: s["tier"] == 0,
    ]
    for pred in tests:
        picks.append(next(i for i, (s, _) in enumerate(ref_world) if pred(s) and i not in picks))
    return picks


action_id = st.one_of(
    st.integers(0, 96), st.integers(-4, 200), st.sampled_from([INT32_MIN, INT32_MAX])
)


class Case(dict):
    """Fixture bundle with a short repr (hypothesis prints the arguments of a failing example)."""

    def __repr__(self) -> str:
        return f"Case(states {self['idx'].tolist()})"


@pytest.fixture(scope="module")
def case(fns, world, ref_world, fixed_states):
    return Case(step=fns["step"], world=world, refs=[ref_world[i] for i in fixed_states],
                idx=np.array(fixed_states))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seq=st.lists(st.lists(action_id, min_size=3, max_size=3), min_size=1, max_size=3))
def test_hypothesis_action_sequences(case, seq):
    """Drawn action sequences, applied to eight fixed diverse states, agree step by step."""
    state, params = case["world"]["states"], case["world"]["params"]
    refs, idx = case["refs"], case["idx"]
    states = [s for s, _ in refs]
    for action in seq:
        acts = jnp.broadcast_to(jnp.asarray(action, jnp.int32), (N, 3))
        _, state, reward, *_ = case["step"](jax.random.PRNGKey(0), state, acts, params)
        nexts = [ref.step(s, action, p) for s, (_, p) in zip(states, refs, strict=True)]
        sel = jax.tree_util.tree_map(lambda x: x[idx], ref.state_arrays(state))
        compare(ref.to_arrays_batch(nexts), sel, f"hypothesis {action}")
        r = [ref.total(b, p) - ref.total(a, p) for a, b, (_, p) in zip(states, nexts, refs,
                                                                         strict=True)]
        np.testing.assert_allclose(r, np.asarray(reward)[idx], atol=TOL, rtol=0)
        states = nexts
