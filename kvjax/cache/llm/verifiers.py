"""The seed's LLM tool-calling evaluation on the verifiers v1 API (`verifiers>=0.4.0,<0.5`),
lifted from the same jitted functions the batched rollouts use (via `kvjax.cache.llm.session`).

Install with `pip install -e ".[verifiers]"`; `vf-eval kv_cache_eviction ...` finds it through
the thin top-level package `kv_cache_eviction`. See docs/llm-eval.md.

How a rollout maps onto verifiers (turn/step order):

* The task's prompt is the observation of step 1 (`Session.observation_text`).
* One assistant message = one step. The plain tool loop (`NullHarness`) asks the rollout's
  tool gate before running each call; verifiers runs the task's `@vf.intercept` request hook
  once per proposed call, in order, right after the model's message commits and before the
  harness executes anything. `KVCacheTask.play_tool_call` applies the call to the session
  there, host-side, and returns the result in place of the tool's own output (so the tool
  server's methods never run; they exist to advertise the four tool schemas). The message's
  last call then plays the step and appends the next observation to its result.
* A message without tool calls ends the episode; `finalize` plays the remaining steps as
  keep(). `@vf.stop episode_done` refuses the next model call once all steps are played.
* Scoring reads the final state through `kvjax.rubric`: seven weighted rewards (the seed's
  weights, so the rollout reward is the rubric `total`) and weight-0 metrics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any, Literal

import verifiers.v1 as vf
from pydantic import Field
from verifiers.v1.harnesses.null import NullHarness

from kvjax.cache.llm.session import Session
from kvjax.cache.llm.verifiers_tools import KVCacheToolset
from kvjax.cache.rewards import COMPONENTS, METRICS, weights
from kvjax.cache.types import EnvConfig, EnvParams

logger = logging.getLogger(__name__)

NUM_SCENARIOS = 100  # tasks when num_examples = -1 (scenario indices 0..99 of the seed stream)
WEIGHTS = {k: float(v) for k, v in weights(EnvParams()).items()}  # the seed's rubric weights
_CFG = EnvConfig()

SYSTEM_PROMPT = f"""\
You manage the KV cache of an LLM inference server under memory pressure for \
{_CFG.episode_len} steps. Each step you see a compact JSON summary of the cache: memory_usage \
(GPU KV used / budget; above 1.0 the engine preempts sequences, which counts as a failure), \
the largest entries, the safest eviction candidates (eviction_value 1.0 = safest to drop, 0.0 = \
worst), the pending queue, and visible_seq_ids.

Tools (all take the seq_id of a sequence in the cache):
- evict(seq_id): drop the sequence; frees its memory, but its request is lost.
- compress(seq_id): quantise one tier, fp16 -> int8 -> int4; each halves its memory; int4 \
costs output quality, most on reasoning sequences.
- swap_to_cpu(seq_id): move it to CPU memory; frees GPU memory, adds transfer latency, and \
it stalls while it waits to be swapped back in.
- keep(): do nothing this step.

Each of your messages is one step: its tool calls (at most {_CFG.max_actions} actions) apply \
in order, then the step runs and the next summary comes back with the last tool result. A \
message without tool calls ends the episode and the remaining steps are played as keep().

Score (weights): failures -0.40 (preemptions, dropped or timed-out requests), throughput \
0.25, headroom 0.18 (keep peak usage below 0.8 / 0.95), memory efficiency 0.07, eviction \
quality 0.05 (evict low-value blocks; losing system/context blocks costs), latency 0.03, risky \
evictions 0.02 (system, high-priority or nearly finished sequences)."""


# -- data, state, config -----------------------------------------------------------------------
class KVCacheData(vf.TaskData):
    """One scenario: scenario `index` of the `seed` stream at `difficulty`."""

    difficulty: Literal["easy", "medium", "hard", "all"] = "all"
    seed: int = Field(42, ge=0, lt=2**32)
    index: int = Field(0, ge=0, lt=2**31)


class KVCacheState(vf.State):
    """The rollout state (plain JSON): the session and bookkeeping."""

    session: dict[str, Any] | None = None
    """`Session.to_json()`: config, params, EnvState, buffered actions, action/reward log."""
    step: int = 0
    """Steps played so far (mirrors the session's state.time)."""
    model_steps: int = 0
    """Steps the model played (the rest were played as keep() after an early stop)."""
    tool_errors: int = 0
    """Tool calls that returned an error (and changed nothing)."""
    results: dict[str, str] = Field(default_factory=dict)
    """Result text per handled call of the current message, keyed by '<message number>:<call
    id>', so a repeated gate probe gets the same answer without replaying the call."""
    rubric: dict[str, float] | None = None
    """`kvjax.rubric` of the final state, set by finalize."""


class KVCacheTasksetConfig(vf.TasksetConfig):
    """`--env.taskset.difficulty hard --env.taskset.num-examples 20 --env.taskset.seed 7`."""

    difficulty: Literal["easy", "medium", "hard", "all"] = "all"
    """Scenario tier; `all` draws the tier per scenario."""
    num_examples: int = Field(-1, ge=-1)
    """Scenarios to load (-1 = all NUM_SCENARIOS)."""
    seed: int = Field(42, ge=0, lt=2**32)
    """Seed of the scenario stream (scenario i uses fold_in(PRNGKey(seed), i)); [0, 2**32)."""
    tools: vf.SharedToolsetConfig = vf.SharedToolsetConfig()
    """Where the (schema-only) tool server runs."""


# -- the task ----------------------------------------------------------------------------------
def _session(state: KVCacheState) -> Session:
    if state.session is None:
        raise vf.TaskError("the rollout state holds no session (task setup did not run)")
    return Session.from_json(state.session)


def _save(state: KVCacheState, session: Session) -> None:
    state.session = session.to_json()
    state.step = session.time


class KVCacheTask(vf.Task[KVCacheData, KVCacheState, vf.TaskConfig]):
    """One scenario played through tool calls; scored by the shared rubric."""

    async def setup(self, trace: vf.Trace, runtime: vf.Runtime) -> None:
        d = self.data
        session = Session.new(d.difficulty, d.seed, d.index)
        _save(trace.state, session)

    @vf.intercept
    async def play_tool_call(self, request: vf.Request, trace: vf.Trace) -> vf.Request | None:
        """Apply the proposed tool call at the request's tail (verifiers' gate probe: an empty
        tool result) and return the request with that result filled in."""
        probe = request.messages[-1] if request.messages else None
        if not isinstance(probe, vf.ToolMessage) or probe.content != "":
            return None  # the initial prompt or a later request: nothing to play
        turn = [m for m in request.messages if isinstance(m, vf.AssistantMessage)]
        calls = (turn[-1].tool_calls or []) if turn else []
        index = next((i for i, c in enumerate(calls) if c.id == probe.tool_call_id), None)
        if index is None:
            return None
        call = calls[index]
        key = f"{len(turn)}:{call.id}"
        state: KVCacheState = trace.state
        if key not in state.results:
            # Only the current message's results are kept (a retried gate replays them).
            prefix = f"{len(turn)}:"
            state.results = {k: v for k, v in state.results.items() if k.startswith(prefix)}
            state.results[key] = self._play(state, call, last=index == len(calls) - 1)
        done = probe.model_copy(update={"content": state.results[key], "name": call.name})
        return request.model_copy(update={"messages": [*request.messages[:-1], done]})

    def _play(self, state: KVCacheState, call: vf.ToolCall, *, last: bool) -> str:
        session = _session(state)
        if session.done:
            return "error: the episode is over; reply without tool calls"
        result = session.call(call.name, call.arguments)
        state.tool_errors += not result.ok
        text = result.text
        if last:  # the message's last call ends its step
            reward = session.end_turn()
            state.model_steps += 1
            text += f"\n\nStep {session.time} played (reward {reward:+.4f}).\n"
            text += session.observation_text()
        _save(state, session)
        return text

    @vf.stop
    async def episode_done(self, trace: vf.Trace) -> bool:
        """All steps played: refuse the next model call."""
        return trace.state.step >= _CFG.episode_len

    async def finalize(self, trace: vf.Trace, runtime: vf.Runtime) -> None:
        """Early stop -> the remaining steps are played as keep(); then score the final
        state once."""
        state: KVCacheState = trace.state
        session = _session(state)
        session.finish()
        _save(state, session)
        state.rubric = session.rubric()

    def final_rubric(self, trace: vf.Trace) -> dict[str, float]:
        state: KVCacheState = trace.state
        if state.rubric is None:  # finalize did not run (e.g. a failed rollout): score anyway
            session = _session(state)
            session.finish()
            state.rubric = session.rubric()
        return state.rubric

    # The seven weighted rewards (sum = rubric total) ...
    @vf.reward(weight=WEIGHTS["failure_penalty"])
    async def failure_penalty(self, trace: vf.Trace) -> float:
        return self.final_rubric(trace)["failure_penalty"]

    @vf.reward(weight=WEIGHTS["throughput_reward"])
    async def throughput_reward(self, trace: vf.Trace) -> float:
        return self.final_rubric(trace)["throughput_reward"]

    @vf.reward(weight=WEIGHTS["headroom_bonus"])
    async def headroom_bonus(self, trace: vf.Trace) -> float:
        return self.final_rubric(trace)["headroom_bonus"]

    @vf.reward(weight=WEIGHTS["memory_efficiency"])
    async def memory_efficiency(self, trace: vf.Trace) -> float:
        return self.final_rubric(trace)["memory_efficiency"]

    @vf.reward(weight=WEIGHTS["eviction_quality"])
    async def eviction_quality(self, trace: vf.Trace) -> float:
        return self.final_rubric(trace)["eviction_quality"]

    @vf.reward(weight=WEIGHTS["latency_penalty"])
    async def latency_penalty(self, trace: vf.Trace) -> float:
        return self.final_rubric(trace)["latency_penalty"]

    @vf.reward(weight=WEIGHTS["risky_eviction_penalty"])
    async def risky_eviction_penalty(self, trace: vf.Trace) -> float:
        return self.final_rubric(trace)["risky_eviction_penalty"]

    # ... and the weight-0 metrics.
    @vf.metric
    async def total_tokens_metric(self, trace: vf.Trace) -> float:
        return self.final_rubric(trace)["total_tokens_metric"]

    @vf.metric
    async def total_failures_metric(self, trace: vf.Trace) -> float:
        return self.final_rubric(trace)["total_failures_metric"]

    @vf.metric
    async def total_latency_metric(self, trace: vf.Trace) -> float:
        return self.final_rubric(trace)["total_latency_metric"]

    @vf.metric
    async def pressure_steps_metric(self, trace: vf.Trace) -> float:
        return self.final_rubric(trace)["pressure_steps_metric"]

    @vf.metric
    async def model_steps(self, trace: vf.Trace) -> float:
        """Steps the model played before it stopped calling tools."""
        return float(trace.state.model_steps)

    @vf.metric
    async def tool_errors(self, trace: vf.Trace) -> float:
        """Tool calls rejected with an error message."""
        return float(trace.state.tool_errors)


REWARD_NAMES = COMPONENTS
METRIC_NAMES = (*METRICS, "model_steps", "tool_errors")


# -- taskset, harness, env ---------------------------------------------------------------------
class KVCacheTaskset(vf.Taskset[KVCacheTask, KVCacheTasksetConfig]):
    """One task per scenario: NUM_SCENARIOS (or num_examples) scenarios of the seed stream."""

    def load(self) -> Iterator[KVCacheTask]:
        cfg = self.config
        n = NUM_SCENARIOS if cfg.num_examples == -1 else cfg.num_examples
        for i in range(n):
            session = Session.new(cfg.difficulty, cfg.seed, i)
            yield KVCacheTask(
                KVCacheData(
                    id=f"{cfg.difficulty}-{cfg.seed}-{i}",
                    name=f"kv-cache {cfg.difficulty} seed {cfg.seed} #{i}",
                    prompt=session.observation_text(),
                    system_prompt=SYSTEM_PROMPT,
                    difficulty=cfg.difficulty,
                    seed=cfg.seed,
                    index=i,
                ),
                cfg.task,
            )

    @classmethod
    def toolsets(cls, config: KVCacheTasksetConfig) -> list[vf.Toolset]:
        # Taskset-scoped: one schema server per eval worker, not one per rollout.
        return [KVCacheToolset(config.tools)]


class KVCacheHarness(NullHarness):
    """The plain tool-calling loop (no shell): it asks the tool gate before every call,
    which is where the task plays it."""


class KVCacheEnvConfig(vf.EnvConfig):
    """Single agent, defaulting to the local subprocess runtime (not a remote sandbox)."""

    agent: vf.AgentConfig = vf.AgentConfig(runtime=vf.SubprocessConfig())


class KVCacheEnv(vf.Env[KVCacheEnvConfig]):
    """One agent plays each task."""

    async def run(self, task: vf.Task, agents: vf.Agents) -> None:
        await agents.agent.run(task)


def episode_errored(episode: vf.Episode) -> bool:
    """Whether the episode did not complete cleanly (no trace, a trace not ok, or an error
    captured): its reward is not a score and must not be averaged in."""
    if not episode.traces or not getattr(episode, "ok", True):
        return True
    return any(not t.ok or t.errors for t in episode.traces)


def episode_summary(episode: vf.Episode) -> dict[str, Any]:
    """Reward, rewards, metrics and stop condition of an episode's (single) trace, and
    whether it errored (`episode_errored`)."""
    if not episode.traces:
        errors = getattr(episode, "errors", None) or []
        return {"task": None, "reward": None, "rewards": {}, "metrics": {}, "stop": None,
                "error": errors[-1].message if errors else "no trace", "errored": True}
    trace = episode.traces[0]
    return {
        "task": trace.task.data.id if trace.task.data else None,
        "reward": trace.reward,
        "rewards": {k: (r.score if r else None) for k, r in trace.rewards.items()},
        "metrics": dict(trace.metrics),
        "stop": trace.stop_condition,
        "error": trace.last_error.message if trace.last_error else None,
        "errored": episode_errored(episode),
    }


def eval_config(argv: list[str]) -> Any:
    """Parse a `vf-eval` command line (without the program name) into verifiers' EvalConfig,
    exactly as `vf-eval` does (its config narrowing and parser)."""
    import sys

    from pydantic_config import cli
    from verifiers.v1.cli.resolve import narrow_config, with_positional_taskset
    from verifiers.v1.configs.cli.eval import EvalConfig

    argv = with_positional_taskset(list(argv))
    config_type = narrow_config(EvalConfig, argv)
    saved = sys.argv
    sys.argv = ["vf-eval", *argv]  # the parser reads sys.argv, as in vf-eval's main
    try:
        return cli(config_type)
    finally:
        sys.argv = saved


def eval_argv(
    model: str,
    base_url: str,
    api_key_var: str = "OPENAI_API_KEY",
    difficulty: str = "all",
    num_examples: int = 5,
    seed: int = 42,
    output_dir: str = "outputs",
) -> list[str]:
    """The documented `vf-eval kv_cache_eviction ...` command line (local, no push, no
    console dashboard)."""
    return ["kv_cache_eviction", "-m", model, "--client.base-url", base_url,
            "--client.api-key-var", api_key_var, "-n", str(num_examples), "-r", "1",
            "--env.taskset.difficulty", difficulty, "--env.taskset.seed", str(seed),
            "--no-push", "--no-rich", "--output-dir", output_dir]


def evaluate(argv: list[str] | None = None) -> list[vf.Episode]:
    """`python -m kvjax.cache.llm.verifiers -m MODEL --base-url URL [--api-key-var VAR]
    [--difficulty hard] [-n 5] [--seed 42] [--output-dir outputs]`: run the LLM evaluation
    against an OpenAI-compatible endpoint through verifiers' own `run_eval` (the documented
    vf-eval command line: local, no push) and return the episodes."""
    import asyncio

    from verifiers.v1.cli.eval.runner import run_eval

    from kvjax.validation import ArgumentParser, seed_arg

    p = ArgumentParser(prog="python -m kvjax.cache.llm.verifiers", description=evaluate.__doc__)
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--base-url", required=True)
    p.add_argument("--api-key-var", default="OPENAI_API_KEY")
    p.add_argument("--difficulty", default="all", choices=["easy", "medium", "hard", "all"])
    p.add_argument("--num-examples", "-n", type=int, default=5)
    p.add_argument("--seed", type=seed_arg, default=42)
    p.add_argument("--output-dir", default="outputs")
    a = p.parse_args(argv)
    if not 1 <= a.num_examples <= NUM_SCENARIOS:
        p.error(f"--num-examples must be in [1, {NUM_SCENARIOS}], got {a.num_examples}")
    config = eval_config(eval_argv(a.model, a.base_url, a.api_key_var, a.difficulty,
                                   a.num_examples, a.seed, a.output_dir))
    return asyncio.run(run_eval(config))


def main(argv: list[str] | None = None) -> int:
    """`evaluate`, then print one JSON line per episode and a summary line: the mean reward
    over the episodes that completed (`n`) and, apart, how many errored. Exit code 1 when any
    episode errored (an unreachable endpoint, a failed harness): errored episodes are never
    averaged in as 0."""
    import sys

    episodes = evaluate(argv)
    scored, errored = [], []
    for ep in episodes:
        summary = episode_summary(ep)
        print(json.dumps(summary))
        (errored if summary["errored"] else scored).append(summary)
    rewards = [s["reward"] for s in scored]
    print(json.dumps({"mean_reward": sum(rewards) / len(rewards) if rewards else None,
                      "n": len(rewards), "errored": len(errored)}))
    if errored or not episodes:
        first = errored[0]["error"] if errored else "no episodes ran"
        print(f"kvjax eval-llm: error: {len(errored)} of {len(episodes)} episodes errored and "
              f"are not in mean_reward (first: {' '.join(str(first).split())[:300]})",
              file=sys.stderr)
        return 1
    return 0


__all__ = [
    "KVCacheData",
    "KVCacheEnv",
    "KVCacheEnvConfig",
    "KVCacheHarness",
    "KVCacheState",
    "KVCacheTask",
    "KVCacheTaskset",
    "KVCacheTasksetConfig",
    "KVCacheToolset",
    "METRIC_NAMES",
    "NUM_SCENARIOS",
    "REWARD_NAMES",
    "SYSTEM_PROMPT",
    "WEIGHTS",
    "episode_errored",
    "episode_summary",
    "eval_argv",
    "evaluate",
    "eval_config",
    "main",
]

if __name__ == "__main__":
    raise SystemExit(main())
