"""The verifiers v1 adapter end to end, offline: the documented `vf-eval kv_cache_eviction ...`
command line, parsed by verifiers' own CLI config and run with its own `run_eval` against a
stdlib OpenAI-compatible server on 127.0.0.1 that plays scripted assistant turns.

Skips cleanly when the `verifiers` extra is not installed."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import sys

import pytest

vf = pytest.importorskip("verifiers.v1")

from fake_openai import FakeOpenAI, Turn  # noqa: E402

from kvjax.cache.llm.session import Session  # noqa: E402

N_TASKS = 2  # task 0 stops early (after 3 messages), task FULL_INDEX plays all 15
SEED = 42


# -- the scripted model ------------------------------------------------------------------------
def observation(messages: list[dict]) -> dict:
    """The latest cache summary in the conversation (the prompt or a tool result)."""
    for m in reversed(messages):
        c = m.get("content")
        if isinstance(c, str) and "Cache state:\n{" in c:
            return json.loads(c.split("Cache state:\n", 1)[1].splitlines()[0])
    raise AssertionError("no observation in the conversation")


FULL_INDEX = 1  # the task the script plays to the end; the others stop early


@functools.cache
def _full_first() -> str:
    return json.dumps(Session.new("hard", SEED, FULL_INDEX).summary(), sort_keys=True)


def full_episode(first: dict) -> bool:
    """Whether the conversation is task FULL_INDEX (recognised by its first observation)."""
    return json.dumps(first, sort_keys=True) == _full_first()


def script(n: int, first: dict, obs: dict) -> list[tuple[str, str]]:
    """The tool calls of assistant message `n` given the first and the latest observation."""
    safe = [e["seq_id"] for e in obs["top_eviction_candidates"]]
    big = [e["seq_id"] for e in obs["top_memory_entries"]]
    if n == 0:  # several calls in one message, with every kind of mistake
        return [
            ("evict", json.dumps({"seq_id": safe[0]})),
            ("evict", '{"seq_id": '),  # malformed JSON
            ("compress", json.dumps({"seq_id": 99999})),  # unknown seq_id
            ("swap_to_cpu", json.dumps({"seq_id": safe[1]})),
            ("keep", "{}"),  # no action
            ("compress", json.dumps({"seq_id": big[0]})),
            ("evict", json.dumps({"seq_id": safe[2]})),  # a 4th action
        ]
    if n == 1:
        return [("compress", '{"seq_id": "abc"}'), ("flush", "{}"), ("keep", "{}")]
    if not full_episode(first) and n == 3:
        return []  # early stop: the remaining steps are played as keep()
    if obs["memory_usage"] > 0.95:
        return [("compress", json.dumps({"seq_id": big[0]}))]
    return [("keep", "{}")]


def reply(messages: list[dict]) -> Turn:
    n = sum(m["role"] == "assistant" for m in messages)
    first = observation(messages[:2])
    calls = script(n, first, observation(messages))
    return Turn("Acting on the cache." if calls else "Done.", tuple(calls))


def replay(index: int) -> tuple[Session, list[list]]:
    """The same script played directly on a Session: what the evaluation must report."""
    s = Session.new("hard", SEED, index)
    first = s.summary()
    results, n = [], 0
    while not s.done:
        calls = script(n, first, s.summary())
        results.append(s.play_message(calls))
        if not calls:
            break
        n += 1
    return s, results


# -- the run -----------------------------------------------------------------------------------
@contextlib.contextmanager
def offline_harness(tmp):
    """Offline: the null harness would `uv sync` its chat program's dependencies (openai,
    mcp, ...) from the package index; they are verifiers' own, so run it with this
    interpreter instead (test-only)."""
    from verifiers.v1.harnesses.utils.launch import CHAT_PROGRAM_SOURCE
    from verifiers.v1.runtimes import subprocess as vf_subprocess

    with pytest.MonkeyPatch.context() as mp:
        scripts = tmp / "scripts"
        scripts.mkdir()
        mp.setattr(vf_subprocess.SubprocessRuntime, "scripts_dir", str(scripts))
        path = scripts / f"{hashlib.sha256(CHAT_PROGRAM_SOURCE.encode()).hexdigest()}.py"
        path.write_text(CHAT_PROGRAM_SOURCE)
        mp.setitem(vf_subprocess.SubprocessRuntime._interpreters, str(path), sys.executable)
        mp.setattr(vf_subprocess, "CACHE_DIR", tmp / "cache")
        mp.setenv("KVJAX_FAKE_KEY", "not-a-secret")
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Parse the documented command line with vf-eval's own config parser, then run it
    in-process with `run_eval` against the fake server (offline)."""
    from kvjax.cache.llm.verifiers import eval_argv, eval_config, evaluate

    tmp = tmp_path_factory.mktemp("vf")
    with offline_harness(tmp), FakeOpenAI(reply) as server:

        # python -m kvjax.cache.llm.verifiers (= kvjax eval-llm) builds the documented command
        # vf-eval kv_cache_eviction -m fake-model --client.base-url URL --client.api-key-var
        #   KVJAX_FAKE_KEY -n 2 -r 1 --env.taskset.difficulty hard ... --no-push
        # and runs it with verifiers' run_eval.
        args = ["-m", "fake-model", "--base-url", server.base_url, "--api-key-var",
                "KVJAX_FAKE_KEY", "--difficulty", "hard", "-n", str(N_TASKS),
                "--seed", str(SEED), "--output-dir", str(tmp / "out")]
        episodes = evaluate(args)
        config = eval_config(eval_argv("fake-model", server.base_url, "KVJAX_FAKE_KEY", "hard",
                                       N_TASKS, SEED, str(tmp / "out")))
        yield config, episodes, server.requests, tmp / "out"


def test_documented_command_resolves_to_the_local_kvjax_env(run):
    from kvjax.cache.llm.verifiers import KVCacheEnvConfig, KVCacheTasksetConfig

    config, _, _, _ = run
    assert isinstance(config.env, KVCacheEnvConfig)
    assert isinstance(config.env.taskset, KVCacheTasksetConfig)
    assert config.env.taskset.difficulty == "hard" and config.env.taskset.seed == SEED
    assert config.env.agent.runtime.type == "subprocess"  # not a remote sandbox
    assert config.env.agent_harnesses()["agent"].id == "kv_cache_eviction"  # the null loop
    assert config.select.limit == N_TASKS and config.num_rollouts == 1 and not config.push


def test_tools_are_the_four_bare_names_with_descriptions(run):
    _, _, requests, _ = run
    assert all(body.get("stream") for body in requests)  # relayed as SSE streams
    tools = {t["function"]["name"]: t["function"] for t in requests[0]["tools"]}
    assert set(tools) == {"evict", "compress", "swap_to_cpu", "keep"}
    for name in ("evict", "compress", "swap_to_cpu"):
        assert tools[name]["parameters"]["properties"]["seq_id"]["type"] == "integer"
        assert tools[name]["parameters"]["required"] == ["seq_id"]
        assert "seq_id" in tools[name]["description"]
    assert "no action" in tools["keep"]["description"].lower()


def test_rewards_and_metrics_match_the_session(run):
    from kvjax.cache.llm.verifiers import METRIC_NAMES, REWARD_NAMES, WEIGHTS

    _, episodes, _, out = run
    assert len(episodes) == N_TASKS
    lengths = set()
    for ep in episodes:
        assert ep.ok, ep.errors
        trace = ep.traces[0]
        index = trace.task.data.index
        session, results = replay(index)
        expect = session.rubric()
        assert {k: r.weight for k, r in trace.rewards.items()} == WEIGHTS
        assert set(trace.rewards) == set(REWARD_NAMES) and set(trace.metrics) == set(METRIC_NAMES)
        for k in REWARD_NAMES:
            assert trace.rewards[k].score == pytest.approx(expect[k], abs=1e-6), k
        for k in ("total_tokens_metric", "total_failures_metric", "total_latency_metric",
                  "pressure_steps_metric"):
            assert trace.metrics[k] == pytest.approx(expect[k], abs=1e-6), k
        assert trace.reward == pytest.approx(expect["total"], abs=1e-5)  # weighted sum = total
        model_steps = sum(1 for r in results if r)
        assert trace.metrics["model_steps"] == model_steps
        assert trace.metrics["tool_errors"] == sum(not x.ok for r in results for x in r)
        assert trace.state.step == 15
        assert Session.from_json(trace.state.session).actions == session.actions
        lengths.add(model_steps)
        assert (model_steps == 15) == (index == FULL_INDEX)
        stop = "episode_done" if model_steps == 15 else "agent_completed"
        assert trace.stop_condition == stop
    assert sorted(lengths) == [3, 15]  # task FULL_INDEX played 15 messages, the others 3
    saved = [json.loads(line) for f in out.rglob("traces.jsonl") for line in f.open()]
    assert len(saved) == N_TASKS  # vf-eval's own results file


def test_turn_step_order_and_error_messages(run):
    _, episodes, requests, _ = run
    # Every model request sees the observation of step n+1 after n assistant messages:
    # one message = one step, played before the next request.
    for body in requests:
        n = sum(m["role"] == "assistant" for m in body["messages"])
        assert observation(body["messages"])["step"] == n
    trace = next(ep.traces[0] for ep in episodes if ep.traces[0].task.data.index == 0)
    _, results = replay(0)
    tool_msgs = [m for m in trace.messages if m.role == "tool"]
    first = tool_msgs[: len(results[0])]
    texts = [m.content for m in first]
    assert [t.split("\n")[0] for t in texts] == [r.text for r in results[0]]
    assert texts[1].startswith("error: evict: arguments are not valid JSON")
    assert texts[2].startswith("error: compress(99999): no sequence 99999 in the cache")
    assert "at most 3 actions per step" in texts[6]
    assert "Step 1 played" in texts[6] and "Step 2 of 15" in texts[6]  # last call ends the step
    assert all("Step 2 of 15" not in t for t in texts[:6])
    second = [m.content for m in tool_msgs[len(results[0]): len(results[0]) + 3]]
    assert second[0].startswith("error: compress: seq_id must be an integer, got str 'abc'")
    assert second[1].startswith("error: unknown tool 'flush'")
    # The errors changed nothing: step 1 played exactly the valid actions, in order.
    actions = Session.from_json(trace.state.session).actions
    valid = [r for r in results[0] if r.ok and not r.text.startswith("ok: keep")]
    assert len(valid) == 3 and all(a != 0 for a in actions[0])
    assert actions[1] == [0, 0, 0]  # message 2: only errors and keep()


def test_eval_llm_reports_errored_episodes_apart_and_exits_1(tmp_path, capsys):
    """audit 3: against an unreachable endpoint it printed mean_reward 0.0 and exited 0."""
    import socket

    from kvjax.cache.llm import verifiers as adapter

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with offline_harness(tmp_path):
        code = adapter.main(["-m", "m", "--base-url", f"http://127.0.0.1:{port}/v1",
                             "--api-key-var", "KVJAX_FAKE_KEY", "-n", "1",
                             "--output-dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert code == 1
    assert lines[0]["errored"] is True and lines[0]["error"]
    assert lines[-1] == {"mean_reward": None, "n": 0, "errored": 1}
    assert "1 of 1 episodes errored" in err


def test_eval_llm_summary_averages_only_the_episodes_that_completed(run, capsys, monkeypatch):
    from kvjax.cache.llm import verifiers as adapter

    _, episodes, _, _ = run
    assert not any(adapter.episode_errored(ep) for ep in episodes)
    monkeypatch.setattr(adapter, "evaluate", lambda argv=None: episodes)
    assert adapter.main([]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    rewards = [ep.traces[0].reward for ep in episodes]
    assert rows[-1] == {"mean_reward": pytest.approx(sum(rewards) / len(rewards)),
                        "n": len(episodes), "errored": 0}


def test_package_exports_exactly_one_taskset_env_and_harness():
    """What verifiers' loaders require of `kv_cache_eviction` (no rollout needed)."""
    from verifiers.v1.utils import loaders

    import kv_cache_eviction
    from kvjax.cache.llm import verifiers as adapter

    exported = [getattr(kv_cache_eviction, n) for n in kv_cache_eviction.__all__]
    for base, cls in ((vf.Taskset, adapter.KVCacheTaskset), (vf.Env, adapter.KVCacheEnv),
                      (vf.Harness, adapter.KVCacheHarness)):
        assert [c for c in exported if isinstance(c, type) and issubclass(c, base)] == [cls]
    assert loaders.environment_class("kv_cache_eviction") is adapter.KVCacheEnv
    assert loaders.default_harness_id("kv_cache_eviction") == "kv_cache_eviction"
    cfg = loaders.taskset_config_type("owner/kv-cache-eviction@1.0")
    assert cfg is adapter.KVCacheTasksetConfig
    with pytest.raises(ValueError, match="easy"):
        cfg(id="kv_cache_eviction", difficulty="extreme")
    with pytest.raises(ValueError, match="greater than or equal to -1"):
        cfg(id="kv_cache_eviction", num_examples=-2)


def test_taskset_loads_one_task_per_scenario():
    from kvjax.cache.llm.verifiers import NUM_SCENARIOS, KVCacheTaskset, KVCacheTasksetConfig

    ts = KVCacheTaskset(KVCacheTasksetConfig(id="kv_cache_eviction", difficulty="easy",
                                             num_examples=2, seed=7))
    tasks = list(ts)
    assert [t.data.index for t in tasks] == [0, 1] and [t.data.idx for t in tasks] == [0, 1]
    assert tasks[1].data.prompt == Session.new("easy", 7, 1).observation_text()
    assert tasks[0].data.system_prompt and "at most 3 actions" in tasks[0].data.system_prompt
    assert len({t.key for t in tasks}) == 2
    full = KVCacheTaskset(KVCacheTasksetConfig(id="kv_cache_eviction"))
    assert sum(1 for _ in full.take(NUM_SCENARIOS + 5)) == NUM_SCENARIOS  # -1 = all


def test_tool_hook_plays_each_call_once_and_ignores_other_requests():
    """The request hook directly (no rollout): a repeated gate probe replays the stored result
    instead of applying the call twice; requests that are not a probe pass through."""
    from kvjax.cache.llm.verifiers import KVCacheData, KVCacheState, KVCacheTask

    task = KVCacheTask(KVCacheData(prompt="p", difficulty="easy", seed=SEED, index=0))
    trace = vf.Trace(task=vf.TraceTask(type="KVCacheTask", data=task.data),
                     state=KVCacheState(), agent=vf.AgentInfo(config=vf.AgentConfig()))
    asyncio.run(task.setup(trace, None))
    calls = [vf.ToolCall(id="a", name="compress", arguments='{"seq_id": 1}'),
             vf.ToolCall(id="b", name="keep", arguments="{}")]
    head = [vf.UserMessage(content="p"), vf.AssistantMessage(tool_calls=calls)]

    def probe(call_id: str) -> vf.Request:
        return vf.Request(messages=[*head, vf.ToolMessage(tool_call_id=call_id, content="")])

    assert asyncio.run(task.play_tool_call(vf.Request(messages=head[:1]), trace)) is None
    first = asyncio.run(task.play_tool_call(probe("a"), trace))
    again = asyncio.run(task.play_tool_call(probe("a"), trace))
    assert first == again and first.messages[-1].content.startswith("ok: compress seq 1")
    assert Session.from_json(trace.state.session).buffer == [1 + 32 + 1]  # applied once
    assert trace.state.step == 0
    last = asyncio.run(task.play_tool_call(probe("b"), trace)).messages[-1].content
    assert last.startswith("ok: keep") and "Step 2 of 15" in last  # the last call ends the step
    assert trace.state.step == 1 and trace.state.model_steps == 1
    assert Session.from_json(trace.state.session).actions == [[1 + 32 + 1, 0, 0]]
    done = vf.ToolMessage(tool_call_id="a", content="ok")  # a real result, not a probe
    assert asyncio.run(task.play_tool_call(vf.Request(messages=[*head, done]), trace)) is None
