"""The LLM session layer (kvjax.cache.llm.session): tool validation, turn/step order, JSON round
trip, and parity of policy play through the tool interface with the batched JAX rollout.

Never imports verifiers."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from trees import trees_equal

import kvjax
from kvjax.cache import reference
from kvjax.cache.llm.session import (
    Session,
    ToolResult,
    compiled,
    play_policy,
    policy_calls,
    scenario_keys,
)
from kvjax.cache.types import EnvConfig

S = EnvConfig().max_seqs
T = EnvConfig().episode_len


def ident(kind: str, slot: int) -> int:
    return kvjax.encode_action(kind, slot, S)


def same_tree(a, b) -> bool:
    return trees_equal(a, b)


@pytest.fixture(scope="module")
def fresh() -> Session:
    """Hard scenario 0 of seed 42: initial residents sit in slots 0..n with seq_id == slot
    (slot 0 the system prompt)."""
    return Session.new("hard", seed=42, index=0)


def clone(session: Session) -> Session:
    return Session(session.state, session.params, session.config)


def test_new_uses_the_rollout_key_scheme(fresh):
    assert fresh.time == 0 and not fresh.done and fresh.steps_left == T
    # scenario i of seed s: fold_in(PRNGKey(s), i), split into (reset key, policy key)
    k_reset, k_policy = scenario_keys(42, 0)
    k = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(42), 0))
    assert np.array_equal(k_reset, k[0]) and np.array_equal(k_policy, k[1])
    state = fresh.state
    assert int(state.tier) == 2  # hard
    ids = np.asarray(state.slots.seq_id)[np.asarray(state.slots.active)]
    assert ids.tolist() == list(range(len(ids)))  # seq_id == slot for the initial residents


def test_bad_difficulty_and_index_raise_value_error():
    with pytest.raises(ValueError, match="allowed: .*'easy'"):
        Session.new("extreme")
    with pytest.raises(ValueError, match="non-negative"):
        Session.new("easy", index=-1)
    with pytest.raises(ValueError, match="seed must be an int"):
        Session.new("easy", seed="42")


def test_valid_calls_buffer_action_ids_in_order(fresh):
    s = clone(fresh)
    assert s.evict(3).ok and s.compress(0).ok and s.swap_to_cpu(5).ok
    assert s.buffer == [ident("evict", 3), ident("compress", 0), ident("swap_to_cpu", 5)]
    assert s.buffer == [4, 33, 70]  # 1 + k * 32 + slot
    assert same_tree(s.state, fresh.state)  # buffered only: nothing applied before end_turn
    r = s.keep()  # keep uses no action
    assert r.ok and len(s.buffer) == 3


def test_invalid_calls_return_errors_and_change_nothing(fresh):
    s = clone(fresh)
    assert s.evict(2).ok
    cases = [
        (("evict", '{"seq_id": 2}'), "already evicted this step"),
        (("evict", '{"seq_id": 999}'), r"no sequence 999 in the cache; evict accepts seq_id in \["),
        (("compress", {"seq_id": "5"}), "seq_id must be an integer, got str"),
        (("compress", {"seq_id": 5.0}), "seq_id must be an integer, got float"),
        (("compress", {"seq_id": True}), "seq_id must be an integer, got bool"),
        (("swap_to_cpu", '{"seq_id": 5'), "arguments are not valid JSON"),
        (("swap_to_cpu", "[5]"), "arguments must be a JSON object"),
        (("swap_to_cpu", {"seq": 5}),
         r"got arguments \['seq'\]; usage: swap_to_cpu\(seq_id: int\)"),
        (("keep", {"seq_id": 1}), r"usage: keep\(\) with no arguments"),
        (("flush", {}),
         r"unknown tool 'flush'; tools: \['keep', 'evict', 'compress', 'swap_to_cpu'\]"),
        ((None, {}), "unknown tool None"),
    ]
    for (name, args), pattern in cases:
        state, buffer = s.state, list(s.buffer)
        r = s.call(name, args)
        assert isinstance(r, ToolResult) and not r.ok and r.text.startswith("error:"), (name, r)
        assert __import__("re").search(pattern, r.text), (pattern, r.text)
        assert s.state is state and s.buffer == buffer
    # the allowed list names the active sequences minus the one evicted this step
    r = s.call("evict", {"seq_id": 999})
    allowed = json.loads(r.text.split("accepts seq_id in ")[1])
    active = np.asarray(fresh.state.slots.seq_id)[np.asarray(fresh.state.slots.active)]
    assert allowed == sorted(set(active.tolist()) - {2})


def test_precision_location_and_action_budget_rules(fresh):
    s = clone(fresh)
    assert s.compress(4).ok and s.compress(4).ok  # fp16 -> int8 -> int4 within one step
    r = s.compress(4)
    assert not r.ok and "already int4" in r.text
    assert 4 not in json.loads(r.text.split("compress accepts seq_id in ")[1])
    s.end_turn()
    assert int(s.state.slots.precision[4]) == 2 and s.buffer == []
    assert "already int4" in s.compress(4).text  # int4 persists into the next step
    assert s.swap_to_cpu(6).ok
    r = s.swap_to_cpu(6)  # later calls see the earlier ones of the same step
    assert not r.ok and "already on the CPU" in r.text
    r = s.compress(6)
    assert not r.ok and "on the CPU" in r.text
    assert s.evict(7).ok and s.evict(8).ok
    r = s.evict(9)  # a 4th action
    assert not r.ok and "at most 3 actions per step" in r.text
    assert s.buffer == [ident("swap_to_cpu", 6), ident("evict", 7), ident("evict", 8)]


def test_end_turn_plays_the_padded_buffer_like_the_reference_oracle(fresh):
    """The step agrees with kvjax.cache.reference (pure Python, no compile) on
    [evict 3, swap 1, 0]."""
    s = clone(fresh)
    s.evict(3)
    s.swap_to_cpu(1)
    reward = s.end_turn()
    action = [ident("evict", 3), ident("swap_to_cpu", 1), 0]
    assert s.actions == [action] and s.buffer == [] and s.time == 1
    ref_state, ref_params = reference.from_jax(fresh.state, fresh.params)
    after = reference.step(ref_state, action, ref_params, S)
    expect = reference.rubric(after, ref_params)
    got = s.rubric()
    for k in expect:
        assert got[k] == pytest.approx(expect[k], abs=1e-5), k
    assert reward == pytest.approx(expect["total"] - reference.total(ref_state, ref_params),
                                   abs=1e-5)
    live = np.asarray(s.state.slots.seq_id)[np.asarray(s.state.slots.active)]
    assert 3 not in live.tolist() and int(s.state.counters.evictions) == 1
    got_c = reference.state_arrays(s.state)["counters"]
    for k, v in reference.to_arrays(after)["counters"].items():
        assert np.allclose(got_c[k], v, rtol=1e-6, atol=1e-6), k


def test_message_without_tool_calls_plays_the_rest_as_keep(fresh):
    s = clone(fresh)
    s.play_message([("evict", {"seq_id": 3}), ("bogus", "{}")])
    assert s.time == 1
    assert s.play_message([]) == []
    assert s.done and s.time == T
    assert s.actions[1:] == [[0, 0, 0]] * (T - 1)
    assert sum(s.rewards) == pytest.approx(s.rubric()["total"], abs=1e-5)
    r = s.evict(1)
    assert not r.ok and "episode is over" in r.text
    with pytest.raises(ValueError, match="episode is over"):
        s.end_turn()


def test_json_round_trip_is_exact_and_plain(fresh):
    s = clone(fresh)
    s.play_message([("compress", {"seq_id": 1}), ("swap_to_cpu", {"seq_id": 2})])
    s.evict(3)  # a buffered, unplayed action travels too
    text = json.dumps(s.to_json())  # plain JSON, no numpy / jax objects
    back = Session.from_json(json.loads(text))
    assert same_tree(back.state, s.state) and back.buffer == s.buffer == [ident("evict", 3)]
    assert back.actions == s.actions and back.rewards == s.rewards
    assert back.observation_text() == s.observation_text()
    back.end_turn()
    s.end_turn()
    assert same_tree(back.state, s.state)
    with pytest.raises(ValueError, match="version"):
        Session.from_json({"state": {}})
    bad = json.loads(text)
    bad["state"]["slots"]["tokens"] = [1, 2, 3]
    with pytest.raises(ValueError, match="shape"):
        Session.from_json(bad)


def test_observation_text_is_the_summary(fresh):
    text = fresh.observation_text()
    head, body = text.split("\n", 1)
    assert head.startswith(f"Step 1 of {T}.") and "up to 3" in head
    assert json.loads(body) == kvjax.summarize(fresh.state, fresh.params)


def test_policy_calls_name_the_slots_sequences(fresh):
    a = np.array([ident("evict", 2), 0, ident("compress", 0)])
    assert policy_calls(a, fresh.state, fresh.config) == [
        ("evict", {"seq_id": 2}), ("compress", {"seq_id": 0})]
    assert policy_calls(np.zeros(3, int), fresh.state, fresh.config) == [("keep", {})]


def test_compiled_once_per_config():
    assert compiled(EnvConfig()) is compiled(EnvConfig())


def _policy_and_rollout():
    policies = pytest.importorskip("kvjax.cache.policies")
    rollout = pytest.importorskip("kvjax.rollout")
    return policies, rollout


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
def test_policy_through_the_tool_interface_matches_the_batched_rollout(difficulty):
    """20 scenarios per tier: a baseline policy played as tool calls scores what the batched
    rollout gives for the same scenarios (rollout key = PRNGKey(seed))."""
    policies, rollout = _policy_and_rollout()
    env, params = kvjax.make("kv-cache-v0", difficulty=difficulty)
    policy = policies.make_policy("value_aware", env)
    n, seed = 20, 7
    batch = rollout.rollout(policy, jax.random.PRNGKey(seed), n, params, env, progress=False)
    acted = 0
    for i in range(n):
        assert np.array_equal(scenario_keys(seed, i)[0],
                              rollout.scenario_keys(jax.random.PRNGKey(seed), i)[0])
        s = Session.new(difficulty, seed, i)
        out = play_policy(s, policy, scenario_keys(seed, i)[1])
        assert out["total"] == pytest.approx(float(batch["total"][i]), abs=1e-6)
        for k in kvjax.COMPONENTS:
            assert out[k] == pytest.approx(float(batch[k][i]), abs=1e-6), (i, k)
        for k in kvjax.METRICS:  # raw sums (tokens ~ 600): float32 resolution, so relative
            assert out[k] == pytest.approx(float(batch[k][i]), rel=1e-6, abs=1e-6), (i, k)
        c = s.state.counters
        for f in ("evictions", "compressions", "swaps", "preemptions", "completed"):
            assert int(getattr(c, f)) == int(batch[f][i]), (i, f)
        assert int(c.invalid_actions) == int(batch["invalid_actions"][i]) == 0
        acted += sum(a != 0 for step in s.actions for a in step)
    assert acted > 0  # the policy did act through the tools


def test_stochastic_policy_uses_the_rollouts_step_keys():
    """The random policy draws from its key every step: through the tools it reproduces the
    batched rollout only if the step keys are `fold_in(policy_key, t)` as there."""
    policies, rollout = _policy_and_rollout()
    env, params = kvjax.make("kv-cache-v0", difficulty="hard")
    policy = policies.make_policy("random", env)
    n, seed = 4, 3
    batch = rollout.rollout(policy, jax.random.PRNGKey(seed), n, params, env, progress=False)
    for i in range(n):
        s = Session.new("hard", seed, i)
        out = play_policy(s, policy, scenario_keys(seed, i)[1])
        assert out["total"] == pytest.approx(float(batch["total"][i]), abs=1e-6)
        c = s.state.counters
        for f in ("evictions", "compressions", "swaps", "preemptions", "completed"):
            assert int(getattr(c, f)) == int(batch[f][i]), (i, f)
        assert sum(a != 0 for step in s.actions for a in step) > 0


def _eval_llm(argv: list[str]) -> int:
    import argparse

    from kvjax.cache.llm import add_eval_llm_parser, cmd_eval_llm

    parser = argparse.ArgumentParser(prog="kvjax")
    add_eval_llm_parser(parser.add_subparsers(dest="command", required=True))
    return cmd_eval_llm(parser.parse_args(["eval-llm", *argv]))


def test_eval_llm_policy_path_prints_the_session_scores(capsys, fresh):
    assert _eval_llm(["--policy", "keep", "--difficulty", "hard", "-n", "1"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    s = clone(fresh)  # hard scenario 0 of seed 42, played as keep() throughout
    s.finish()
    assert lines[0]["task"] == "hard-42-0" and lines[0]["reward"] == s.rubric()["total"]
    assert lines[-1] == {"policy": "keep", "difficulty": "hard",
                         "mean_reward": s.rubric()["total"], "n": 1}


def test_eval_llm_bad_input_exits_2(capsys):
    assert _eval_llm(["--difficulty", "hard"]) == 2
    assert "--model and --base-url are required" in capsys.readouterr().err
    assert _eval_llm(["--policy", "keep", "-m", "x", "--base-url", "http://h/v1"]) == 2
    with pytest.raises(SystemExit) as e:  # rejected by the parser (type positive_int)
        _eval_llm(["--policy", "keep", "-n", "0"])
    assert e.value.code == 2 and "-n" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _eval_llm(["--policy", "nope"])
    assert e.value.code == 2 and "allowed: ['keep'" in capsys.readouterr().err
