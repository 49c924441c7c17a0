"""One scenario played turn by turn through tool calls: the LLM evaluation's core, without
any LLM framework.

A `Session` holds one scenario's `EnvState` and exposes the four tools of the seed environment
(`evict`, `compress`, `swap_to_cpu` by `seq_id`, and `keep`). Turn/step order:

* One assistant message is one environment step. Its tool calls are validated and buffered in
  order (at most `max_actions` = 3 actions; `keep()` buffers nothing), then `end_turn()` plays
  the step: the buffer, padded with 0 (keep), goes through the same jitted `env.step_env` the
  batched rollouts use, so a session episode is bit-identical to a batched rollout with the same
  action ids.
* Each call is checked against the state after the earlier calls of the same message (the
  preview uses `dynamics.apply_actions`). An invalid call - unknown tool, malformed or mistyped
  arguments, a `seq_id` that is not in the cache or cannot take that action, a 4th action in one
  step - returns an error message naming what is allowed and changes nothing, not even the
  buffer.
* A message without tool calls ends the episode: `finish()` plays every remaining step as
  `keep()`.

The jitted functions are compiled once per process and `EnvConfig` (`compiled`). The state
converts to and from plain JSON (`to_json` / `from_json`) so it can cross process boundaries.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from kvjax.cache import dynamics, observations, rewards
from kvjax.cache.env import KVCacheEnv, decode_action, difficulty_index
from kvjax.cache.types import (
    ACTION_KINDS,
    BLOCK_TYPES,
    DIFFICULTIES,
    PRECISIONS,
    EnvConfig,
    EnvParams,
    EnvState,
)
from kvjax.validation import INT32_MAX, check_seed, check_single

TOOL_NAMES = ACTION_KINDS  # ("keep", "evict", "compress", "swap_to_cpu")
SEQ_TOOLS = ACTION_KINDS[1:]  # the tools that take a seq_id
JSON_VERSION = 1

Policy = Callable[[chex.PRNGKey, EnvState, EnvParams], chex.Array]


@dataclasses.dataclass(frozen=True)
class Compiled:
    """The jitted core functions for one `EnvConfig` (see `compiled`)."""

    env: KVCacheEnv
    reset: Callable[[chex.PRNGKey, EnvParams], EnvState]
    step: Callable[[EnvState, chex.Array, EnvParams], EnvState]
    preview: Callable[[EnvState, chex.Array], dict[str, chex.Array]]
    rubric: Callable[[EnvState, EnvParams], dict[str, chex.Array]]


@functools.cache
def compiled(config: EnvConfig) -> Compiled:
    """Jitted reset / step / preview / rubric for `config`, built once per process and config
    (EnvConfig is frozen and hashable), so every session of a worker shares one compile."""
    env = KVCacheEnv(config)
    key0 = jax.random.PRNGKey(0)

    def reset(key: chex.PRNGKey, params: EnvParams) -> EnvState:
        return env.reset_env(key, params)[1]

    def step(state: EnvState, action: chex.Array, params: EnvParams) -> EnvState:
        # The same env.step_env as the batched rollouts (its key is unused).
        return env.step_env(key0, state, action, params)[1]

    def preview(state: EnvState, action: chex.Array, params: EnvParams) -> dict[str, chex.Array]:
        # Phase 1 alone (time does not advance): what the next call would act on.
        s = dynamics.apply_actions(state, action, params, config)
        return {
            "mask": observations.action_mask(s),
            "active": s.slots.active,
            "seq_id": s.slots.seq_id,
            "location": s.slots.location,
            "precision": s.slots.precision,
        }

    return Compiled(
        env=env,
        reset=jax.jit(reset),
        step=jax.jit(step),
        preview=jax.jit(preview),
        rubric=jax.jit(rewards.rubric),
    )


def scenario_keys(seed: int, index: int) -> tuple[chex.PRNGKey, chex.PRNGKey]:
    """(reset key, policy key) of scenario `index` under `seed`: the scheme of
    `kvjax.rollout` with `key = PRNGKey(seed)`, so session scenario i is batched-rollout
    scenario i (and independent of how many are drawn)."""
    k = jax.random.fold_in(jax.random.PRNGKey(seed), index)
    k_reset, k_policy = jax.random.split(k)
    return k_reset, k_policy


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What a tool call returns to the model: `ok` False means nothing changed."""

    ok: bool
    text: str


# -- JSON conversion ---------------------------------------------------------------------------
def _to_plain(tree: Any) -> Any:
    """A pytree's state dict with every leaf as plain Python (lists, ints, floats, bools)."""
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x).tolist(), serialization.to_state_dict(jax.device_get(tree))
    )


@functools.cache
def _state_template(config: EnvConfig) -> EnvState:
    """Shapes and dtypes of an EnvState for `config` (traced once, nothing computed)."""
    return jax.eval_shape(compiled(config).reset, jax.random.PRNGKey(0), EnvParams())


def _state_from_plain(plain: Mapping[str, Any], config: EnvConfig) -> EnvState:
    """Inverse of `_to_plain` for an EnvState: shapes and dtypes from the config's reset."""
    template = _state_template(config)
    try:
        tree = serialization.from_state_dict(template, plain)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"state JSON does not match an EnvState: {e}") from e

    def leaf(t: jax.ShapeDtypeStruct, v: Any) -> jax.Array:
        try:
            raw = np.asarray(v)
        except (ValueError, TypeError) as e:
            raise ValueError(f"state JSON leaf is not a rectangular array: {e}") from e
        if raw.dtype.kind not in "biuf":
            raise ValueError(f"state JSON leaf must hold numbers, got dtype {raw.dtype}")
        if not np.isfinite(raw.astype(np.float64)).all():
            raise ValueError("state JSON leaf holds NaN or infinity")
        if np.dtype(t.dtype).kind in "biu":
            info = np.iinfo(t.dtype) if np.dtype(t.dtype).kind != "b" else None  # uint32: seed
            x = raw.astype(np.float64)
            if (x != np.round(x)).any() or (info and ((x < info.min) | (x > info.max)).any()):
                raise ValueError(f"state JSON leaf of dtype {t.dtype} holds non-integral or "
                                 "out-of-range values")
            if info is None and not np.isin(x, (0, 1)).all():
                raise ValueError("state JSON boolean leaf holds values other than 0/1")
        arr = raw.astype(t.dtype)
        if arr.shape != t.shape:
            raise ValueError(f"state JSON leaf has shape {arr.shape}, expected {t.shape}")
        return jnp.asarray(arr)

    return jax.tree_util.tree_map(leaf, template, tree)


def _params_from_plain(plain: Mapping[str, Any]) -> EnvParams:
    allowed = {f.name for f in dataclasses.fields(EnvParams)}
    unknown = set(plain) - allowed
    if unknown:
        raise ValueError(f"unknown params {sorted(unknown)}; allowed: {sorted(allowed)}")
    return EnvParams(**dict(plain))


# -- the session -------------------------------------------------------------------------------
class Session:
    """One scenario, played one assistant message (= one step) at a time. See module doc."""

    def __init__(
        self,
        state: EnvState,
        params: EnvParams,
        config: EnvConfig | None = None,
        *,
        buffer: Sequence[int] = (),
        actions: Sequence[Sequence[int]] = (),
        step_rewards: Sequence[float] = (),
    ):
        self.config = config or EnvConfig()
        if not isinstance(self.config, EnvConfig):
            raise ValueError(f"config must be an EnvConfig, got {type(self.config).__name__}")
        if not isinstance(params, EnvParams):
            raise ValueError(f"params must be an EnvParams, got {type(params).__name__}")
        check_single(state, "Session", hint="a session plays one scenario: pick one, e.g. "
                     "jax.tree_util.tree_map(lambda x: x[i], state)")
        self.fns = compiled(self.config)
        self.params = params
        self.state = state  # (the setter also clears the cached rubric)
        n, A = self.config.num_action_ids, self.config.max_actions
        self.buffer: list[int] = _ids(buffer, 1, n, "buffer")
        if len(self.buffer) > A:
            raise ValueError(f"buffer holds at most {A} actions, got {len(self.buffer)}")
        self.actions: list[list[int]] = []
        for a in actions:
            row = _ids(a, 0, n, "actions")
            if len(row) != A:
                raise ValueError(f"each actions entry must hold {A} action ids, got {len(row)}")
            self.actions.append(row)
        self.rewards: list[float] = []
        for r in step_rewards:
            if isinstance(r, bool) or not isinstance(r, int | float | np.number) or not (
                    np.isfinite(r)):
                raise ValueError(f"rewards must be finite numbers, got {r!r}")
            self.rewards.append(float(r))

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def new(
        cls,
        difficulty: str = "all",
        seed: int = 42,
        index: int = 0,
        config: EnvConfig | None = None,
        params: EnvParams | None = None,
    ) -> Session:
        """Scenario `index` of the `seed` stream at `difficulty` (easy/medium/hard/all)."""
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"unknown difficulty {difficulty!r}; allowed: {list(DIFFICULTIES)}")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= INT32_MAX:
            raise ValueError(f"index must be a non-negative int <= {INT32_MAX}, got {index!r}")
        check_seed(seed)
        config = config or EnvConfig()
        base = params if params is not None else EnvParams()
        params = base.replace(difficulty=difficulty_index(difficulty))
        return cls.from_key(scenario_keys(seed, index)[0], params, config)

    @classmethod
    def from_key(
        cls, key: chex.PRNGKey, params: EnvParams, config: EnvConfig | None = None
    ) -> Session:
        """The scenario `env.reset_env(key, params)` draws."""
        config = config or EnvConfig()
        return cls(compiled(config).reset(key, params), params, config)

    # -- properties ------------------------------------------------------------------------
    @property
    def state(self) -> EnvState:
        """The scenario's current EnvState (start of the next step)."""
        return self._state

    @state.setter
    def state(self, value: EnvState) -> None:
        self._state = value
        self._rubric: dict[str, float] | None = None

    @property
    def time(self) -> int:
        """Steps played so far."""
        return int(self.state.time)

    @property
    def done(self) -> bool:
        """All `episode_len` steps have been played."""
        return self.time >= self.config.episode_len

    @property
    def steps_left(self) -> int:
        return max(self.config.episode_len - self.time, 0)

    # -- tools -----------------------------------------------------------------------------
    def evict(self, seq_id: Any) -> ToolResult:
        """Drop a sequence from the cache (frees its GPU memory; the request is lost)."""
        return self._act("evict", seq_id)

    def compress(self, seq_id: Any) -> ToolResult:
        """Quantise a GPU sequence one tier (fp16 -> int8 -> int4), halving its memory."""
        return self._act("compress", seq_id)

    def swap_to_cpu(self, seq_id: Any) -> ToolResult:
        """Move a GPU sequence to CPU memory (frees GPU memory, adds transfer latency)."""
        return self._act("swap_to_cpu", seq_id)

    def keep(self) -> ToolResult:
        """No action (uses none of the step's action budget)."""
        if self.done:
            return self._episode_over()
        return ToolResult(True, "ok: keep (no action)")

    def call(self, name: Any, arguments: str | Mapping[str, Any] | None = None) -> ToolResult:
        """Apply one tool call as a model would send it: `arguments` is the JSON object text
        (or an already parsed dict). Every problem becomes an error result, never an
        exception (nesting too deep for the JSON parser included)."""
        try:
            return self._call(name, arguments)
        except (RecursionError, MemoryError, OverflowError, ValueError, TypeError) as e:
            what = "nested too deeply" if isinstance(e, RecursionError) else type(e).__name__
            shown = name if isinstance(name, str) and len(name) <= 40 else "tool"
            return ToolResult(False, f"error: {shown}: arguments could not be read ({what}); "
                              + _usage(shown if shown in TOOL_NAMES else "evict"))

    def _call(self, name: Any, arguments: Any) -> ToolResult:
        if not isinstance(name, str) or name not in TOOL_NAMES:
            return ToolResult(False, f"error: unknown tool {name!r}; tools: {list(TOOL_NAMES)}")
        if arguments is None or arguments == "":
            args: Any = {}
        elif isinstance(arguments, str):
            try:
                args = json.loads(arguments)
            except json.JSONDecodeError as e:
                return ToolResult(
                    False,
                    f"error: {name}: arguments are not valid JSON ({e.msg}); "
                    + _usage(name),
                )
        else:
            args = arguments
        if not isinstance(args, Mapping):
            return ToolResult(
                False, f"error: {name}: arguments must be a JSON object; " + _usage(name)
            )
        expected = set() if name == "keep" else {"seq_id"}
        if set(args) != expected:
            return ToolResult(
                False, f"error: {name}: got arguments {sorted(args)}; " + _usage(name)
            )
        return self.keep() if name == "keep" else self._act(name, args["seq_id"])

    def _act(self, kind: str, seq_id: Any) -> ToolResult:
        if self.done:
            return self._episode_over()
        if isinstance(seq_id, bool) or not isinstance(seq_id, int):
            return ToolResult(
                False,
                f"error: {kind}: seq_id must be an integer, got {type(seq_id).__name__} "
                f"{seq_id!r}; " + _usage(kind),
            )
        A = self.config.max_actions
        if len(self.buffer) >= A:
            done = ", ".join(self._describe_action(a) for a in self.buffer)
            return ToolResult(
                False,
                f"error: {kind}({seq_id}): at most {A} actions per step and this step already "
                f"has {A} ({done}); the step ends after this message's tool calls",
            )
        pv = self._preview(self.buffer)
        S = self.config.max_seqs
        k = ACTION_KINDS.index(kind) - 1
        match = np.nonzero(pv["active"] & (pv["seq_id"] == seq_id))[0]
        allowed = self._allowed(pv, k)
        if match.size == 0:
            return ToolResult(
                False,
                f"error: {kind}({seq_id}): no sequence {seq_id} in the cache"
                + (" (already evicted this step)" if seq_id in self._evicted_now() else "")
                + f"; {kind} accepts seq_id in {allowed}",
            )
        slot = int(match[0])
        action_id = 1 + k * S + slot
        if not pv["mask"][action_id]:
            return ToolResult(
                False,
                f"error: {kind}({seq_id}): {_why_not(kind, int(pv['location'][slot]))}; "
                f"{kind} accepts seq_id in {allowed}",
            )
        self.buffer.append(action_id)
        return ToolResult(
            True,
            f"ok: {self._describe_action(action_id, detail=True, preview=pv)} "
            f"(action {len(self.buffer)} of {A} this step)",
        )

    # -- steps -----------------------------------------------------------------------------
    def end_turn(self) -> float:
        """Play one step with the buffered actions (padded with keep); return its reward (the
        change of the rubric total)."""
        if self.done:
            raise ValueError(
                f"the episode is over ({self.config.episode_len} steps played); "
                "no step is left to play"
            )
        A = self.config.max_actions
        action = np.zeros((A,), np.int32)
        action[: len(self.buffer)] = self.buffer
        before = self.rubric()["total"]
        self.state = self.fns.step(self.state, jnp.asarray(action), self.params)
        reward = self.rubric()["total"] - before
        self.actions.append(action.tolist())
        self.rewards.append(reward)
        self.buffer = []
        return reward

    def finish(self) -> None:
        """End the episode early: play the buffered step (if any) and then every remaining
        step as keep()."""
        while not self.done:
            self.end_turn()

    def play_message(self, calls: Iterable[tuple[str, Any]]) -> list[ToolResult]:
        """One assistant message: apply its tool calls `(name, arguments)` in order, then
        play the step. A message without tool calls ends the episode (`finish`)."""
        calls = list(calls)
        if not calls:
            self.finish()
            return []
        results = [self.call(name, args) for name, args in calls]
        if not self.done:
            self.end_turn()
        return results

    # -- scoring and observation -----------------------------------------------------------
    def rubric(self) -> dict[str, float]:
        """`kvjax.rubric` of the current state as Python floats (7 components, `total`,
        4 metrics)."""
        if self._rubric is None:  # cached per state: the state only changes in end_turn
            self._rubric = {
                k: float(v) for k, v in self.fns.rubric(self.state, self.params).items()
            }
        return dict(self._rubric)

    def summary(self, top_k: int = 5) -> dict[str, Any]:
        """`kvjax.summarize` of the current state (JSON-ready)."""
        return observations.summarize(self.state, self.params, top_k=top_k)

    def observation_text(self, top_k: int = 5) -> str:
        """The prompt text for the current step: a status line and the compact JSON
        summary."""
        T, A = self.config.episode_len, self.config.max_actions
        if self.done:
            head = f"Episode over: all {T} steps played. Final cache state:"
        else:
            head = (
                f"Step {self.time + 1} of {T}. Call up to {A} of evict / compress / "
                "swap_to_cpu (or keep() to do nothing); the step runs when this message's "
                "tool calls are done. Cache state:"
            )
        return head + "\n" + json.dumps(self.summary(top_k), separators=(",", ":"))

    # -- JSON ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (lists, ints, floats, bools): config, params, state, the step's
        buffered actions, and the per-step action / reward log."""
        return {
            "version": JSON_VERSION,
            "config": dataclasses.asdict(self.config),
            "params": _to_plain(self.params),
            "state": _to_plain(self.state),
            "buffer": list(self.buffer),
            "actions": [list(a) for a in self.actions],
            "rewards": list(self.rewards),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Session:
        """Inverse of `to_json` (bit-exact: float32 values survive the float64 JSON)."""
        if not isinstance(data, Mapping) or data.get("version") != JSON_VERSION:
            raise ValueError(f"session JSON must be a dict with version {JSON_VERSION}")
        missing = {"config", "params", "state"} - set(data)
        if missing:
            raise ValueError(f"session JSON lacks {sorted(missing)}")
        fields = {f.name for f in dataclasses.fields(EnvConfig)}
        if not isinstance(data["config"], Mapping) or set(data["config"]) - fields:
            raise ValueError(f"session JSON config must be a dict with keys from {sorted(fields)}")
        if not isinstance(data["params"], Mapping) or not isinstance(data["state"], Mapping):
            raise ValueError("session JSON params and state must be dicts")
        config = EnvConfig(**data["config"])
        return cls(
            _state_from_plain(data["state"], config),
            _params_from_plain(data["params"]),
            config,
            buffer=data.get("buffer", ()),
            actions=data.get("actions", ()),
            step_rewards=data.get("rewards", ()),
        )

    # -- helpers ---------------------------------------------------------------------------
    def _preview(self, buffer: Sequence[int]) -> dict[str, np.ndarray]:
        action = np.zeros((self.config.max_actions,), np.int32)
        action[: len(buffer)] = list(buffer)
        return {k: np.asarray(v) for k, v in
                self.fns.preview(self.state, jnp.asarray(action), self.params).items()}

    def _allowed(self, pv: Mapping[str, np.ndarray], k: int) -> list[int]:
        S = self.config.max_seqs
        ok = pv["mask"][1 + k * S: 1 + (k + 1) * S] & pv["active"]
        return sorted(int(i) for i in pv["seq_id"][ok])

    def _evicted_now(self) -> set[int]:
        S = self.config.max_seqs
        sid = np.asarray(self.state.slots.seq_id)
        return {int(sid[(a - 1) % S]) for a in self.buffer if (a - 1) // S == 0}

    def _describe_action(
        self, action_id: int, detail: bool = False, preview: Mapping[str, Any] | None = None
    ) -> str:
        """`preview`: the state after the step's earlier calls (its precision is what a
        second compress of the same sequence starts from)."""
        kind, slot = decode_action(int(action_id), self.config.max_seqs)
        s = self.state.slots
        sid = int(s.seq_id[slot])
        if not detail:
            return f"{kind} {sid}"
        prec = int((preview or {}).get("precision", s.precision)[slot])
        verb = {"evict": "evict", "compress": "compress", "swap_to_cpu": "swap to CPU"}[kind]
        what = (
            f"{BLOCK_TYPES[int(s.block_type[slot])]}, {int(s.tokens[slot])} tokens, "
            f"{PRECISIONS[prec]}"
        )
        if kind == "compress":
            what += f" -> {PRECISIONS[min(prec + 1, 2)]}"
        return f"{verb} seq {sid} ({what}) queued"

    def _episode_over(self) -> ToolResult:
        return ToolResult(
            False,
            f"error: the episode is over ({self.config.episode_len} steps played); "
            "reply without tool calls",
        )


def _ids(values: Any, lo: int, hi: int, what: str) -> list[int]:
    """A list of action ids in [lo, hi) (ints, no bools, no floats), else ValueError."""
    if isinstance(values, str | bytes | Mapping) or not isinstance(values, Iterable):
        raise ValueError(f"{what} must be a list of action ids in [{lo}, {hi}), got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or not lo <= v < hi:
            raise ValueError(f"{what} must hold action ids in [{lo}, {hi}), got {v!r}")
        out.append(int(v))
    return out


def _why_not(kind: str, location: int) -> str:
    """Why a sequence in the cache cannot take `kind` (given the preview's location)."""
    if kind == "compress" and location == 1:
        return "it is on the CPU (only GPU sequences can be compressed)"
    if kind == "compress":
        return "it is already int4 (the lowest precision)"
    return "it is already on the CPU"


def _usage(name: str) -> str:
    if name == "keep":
        return "usage: keep() with no arguments"
    return f"usage: {name}(seq_id: int), seq_id from visible_seq_ids"


# -- policies through the tool interface -------------------------------------------------------
def policy_calls(action: Sequence[int], state: EnvState, config: EnvConfig) -> list[tuple]:
    """Turn a policy's action vector into the tool calls a model would send: each non-keep
    id becomes `(kind, {"seq_id": ...})` naming the sequence in that slot at the start of the
    step; an all-keep vector becomes one `keep()` call (an empty message would end the
    episode)."""
    seq_ids = np.asarray(state.slots.seq_id)
    calls = []
    for a in np.asarray(action).tolist():
        if int(a) == 0:
            continue
        kind, slot = decode_action(int(a), config.max_seqs)
        calls.append((kind, {"seq_id": int(seq_ids[slot])}))
    return calls or [("keep", {})]


@functools.cache
def _jit_policy(policy: Policy) -> Callable:
    return jax.jit(policy)


def play_policy(session: Session, policy: Policy, policy_key: chex.PRNGKey) -> dict[str, float]:
    """Play the rest of `session`'s episode with `policy(key, state, params)` through the tool
    interface - one message of tool calls per step (`policy_calls`, `play_message`) - and
    return the final rubric. The step-t key is `fold_in(policy_key, t)`, as in
    `kvjax.rollout`."""
    pol = _jit_policy(policy)
    while not session.done:
        action = pol(jax.random.fold_in(policy_key, session.time), session.state, session.params)
        session.play_message(policy_calls(action, session.state, session.config))
    return session.rubric()


def evaluate_policy(
    name: str,
    difficulty: str = "all",
    num_examples: int = 20,
    seed: int = 42,
    config: EnvConfig | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Play kvjax policy `name` through the tool interface on scenarios 0..num_examples-1 of
    the `seed` stream (the LLM taskset's tasks) and return each final rubric."""
    from tqdm.auto import tqdm

    from kvjax.cache.policies import POLICY_NAMES, make_policy

    if name not in POLICY_NAMES:
        raise ValueError(f"unknown policy {name!r}; allowed: {list(POLICY_NAMES)}")
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    config = config or EnvConfig()
    policy = make_policy(name, config)
    out = []
    for i in tqdm(range(num_examples), desc=f"{name} via tools", disable=not progress):
        session = Session.new(difficulty, seed, i, config)
        out.append(play_policy(session, policy, scenario_keys(seed, i)[1]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kvjax.cache.llm.session --policy value_aware --difficulty hard -n 20 [--seed 42]`:
    play a kvjax policy through the LLM tool interface on the LLM taskset's scenarios and
    print one JSON line per scenario and the mean total."""
    from kvjax.validation import ArgumentParser, positive_int, seed_arg

    p = ArgumentParser(prog="python -m kvjax.cache.llm.session", description=main.__doc__)
    p.add_argument("--policy", default="value_aware")
    p.add_argument("--difficulty", default="all", choices=list(DIFFICULTIES))
    p.add_argument("--num-examples", "-n", type=positive_int, default=20)
    p.add_argument("--seed", type=seed_arg, default=42)
    a = p.parse_args(argv)
    try:
        results = evaluate_policy(a.policy, a.difficulty, a.num_examples, a.seed)
    except ValueError as e:
        p.error(str(e))  # exit code 2
    for i, r in enumerate(results):
        print(json.dumps({"task": f"{a.difficulty}-{a.seed}-{i}", "policy": a.policy,
                          "reward": r["total"], "rubric": r}))
    mean = sum(r["total"] for r in results) / len(results)
    print(json.dumps({"policy": a.policy, "difficulty": a.difficulty, "mean_reward": mean,
                      "n": len(results)}))
    return 0


__all__ = [
    "SEQ_TOOLS",
    "TOOL_NAMES",
    "Compiled",
    "Session",
    "ToolResult",
    "compiled",
    "evaluate_policy",
    "main",
    "play_policy",
    "policy_calls",
    "scenario_keys",
]

if __name__ == "__main__":
    raise SystemExit(main())
