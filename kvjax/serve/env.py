"""`ServeEnv` (kv-serve-v0): the gymnax-1.0-style environment around serve/engine/."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from kvjax import spaces
from kvjax.base import Environment, normalize_params
from kvjax.serve import actions, engine, metrics, observations, replay, traces
from kvjax.serve import rollout as serve_rollout
from kvjax.serve import workload as workloads
from kvjax.serve.capacity import arrival_rate_at, capacity_rps
from kvjax.serve.presets import PRESETS
from kvjax.serve.types import ENGINES, KV_DTYPES, ServeConfig, ServeParams, ServeState

ENV_ID = "kv-serve-v0"
# Segment rows for replayed traces with prefixes and agentic sessions (their segments - trace
# nodes, session histories - outnumber a preset's G).
MANY_SEGMENTS = 64


class ServeEnv(Environment):
    """An LLM serving engine under a request stream; the agent steers its KV cache.

    State: `ServeState` - the request table [S], prefix segments [G], engine scalars (a clock
        in seconds per scenario) and metric accumulators.
    Observation: `ServeObservation` - requests [S, 18], segments [G, 7], globals [17] and
        `command_mask` [num_command_ids] (observations.py). No true output lengths.
    Action: dict `request_priority` int32 [S], `segment_priority` int32 [G], `commands`
        int32 [A] (actions.py); all zeros = the engine default.
    Step: the action, then `iterations_per_step` engine iterations (engine/) - a control
        period of ~0.1-0.5 simulated seconds.
    Reward: the change of `metrics.score` - requests finished within both SLOs per request
        offered - so an episode's return is its goodput / offered rate.
    Termination: never; truncated when the clock reaches `horizon` or after `max_steps`.
        `step` auto-resets and keeps the pre-reset observation in `info["final_observation"]`.
    """

    def __init__(
        self, config: ServeConfig | None = None, default_params: ServeParams | None = None
    ):
        self.config = config or ServeConfig()
        self._default_params = default_params or ServeParams()

    @property
    def name(self) -> str:
        return ENV_ID

    @property
    def default_params(self) -> ServeParams:
        return self._default_params

    # -- the rollout engine ------------------------------------------------------------------
    def episodes(self, policy, key, index, params, return_trajectory=False) -> dict[str, Any]:
        """Each scenario of the micro-batch `index` until its clock reaches the horizon
        (kvjax/serve/rollout.py)."""
        return serve_rollout.episodes(policy, self, key, index, params, return_trajectory)

    def max_micro_batch(self, backend: str) -> int:
        """8,192 / max_requests on CPU (2**20 / max_requests elsewhere): a step holds [S, S]
        order matrices, which then stay in a core's cache - toy at batch 4,096 on two cores ran
        168-184K engine iterations/s with micro-batches of 64 or 128 against 136K with 256 and
        105K with 512 (docs/serving-benchmarks.md)."""
        return max(1, (8192 if backend == "cpu" else 2**20) // self.config.max_requests)

    def action_space(self, params: ServeParams | None = None) -> spaces.Dict:
        cfg, L = self.config, self.config.priority_levels
        return spaces.Dict(
            {
                "request_priority": spaces.MultiDiscrete(L + 1, (cfg.max_requests,)),
                "segment_priority": spaces.MultiDiscrete(L + 1, (cfg.max_segments,)),
                "commands": spaces.MultiDiscrete(cfg.num_command_ids, (cfg.max_commands,)),
            }
        )

    def observation_space(self, params: ServeParams | None = None) -> spaces.Dict:
        cfg = self.config
        box = lambda *shape: spaces.Box(-np.inf, np.inf, shape)  # noqa: E731
        return spaces.Dict(
            {
                "requests": box(cfg.max_requests, len(observations.REQUEST_FEATURES)),
                "segments": box(cfg.max_segments, len(observations.SEGMENT_FEATURES)),
                "globals": box(len(observations.GLOBAL_FEATURES)),
                "command_mask": spaces.Box(0, 1, (cfg.num_command_ids,), jnp.bool_),
            }
        )

    def noop_action(self) -> dict[str, chex.Array]:
        return actions.noop_action(self.config)

    # -- core API ----------------------------------------------------------------------------
    def reset_env(self, key: chex.PRNGKey, params: ServeParams):
        """A fresh engine at time 0 (O(S + G): the stream is drawn as requests arrive)."""
        seed = jax.random.bits(key, (2,), jnp.uint32)
        state = engine.empty_state(seed, params, self.config)
        return self.get_obs(state, params), state

    def step_env(self, key: chex.PRNGKey, state: ServeState, action: dict, params: ServeParams):
        """One control period without auto-reset (key unused: the stream is in the state)."""
        action = self._check_action(action)
        nxt = actions.apply(state, action, params, self.config)
        nxt = engine.run(nxt, params, self.config)
        nxt = nxt.replace(steps=nxt.steps + 1)
        reward = metrics.score(nxt, params) - metrics.score(state, params)
        obs = self.get_obs(nxt, params)
        truncated = (nxt.clock >= params.horizon) | (nxt.steps >= self.config.max_steps)
        info = {
            "final_observation": obs,
            "invalid_commands": nxt.metrics.invalid_commands - state.metrics.invalid_commands,
            "finished": nxt.metrics.finished - state.metrics.finished,
            "preemptions": nxt.metrics.preemptions - state.metrics.preemptions,
        }
        return obs, nxt, reward, jnp.bool_(False), truncated, info

    def get_obs(self, state: ServeState, params: ServeParams) -> observations.ServeObservation:
        return observations.observe(state, params, self.config)

    def metrics(self, state: ServeState, params: ServeParams) -> dict[str, chex.Array]:
        return metrics.episode_metrics(state, params)

    def _check_action(self, action: dict) -> dict:
        cfg = self.config
        shapes = dict(
            request_priority=(cfg.max_requests,),
            segment_priority=(cfg.max_segments,),
            commands=(cfg.max_commands,),
        )
        if not isinstance(action, dict) or set(action) != set(shapes):
            raise ValueError(
                f"action must be a dict with keys {sorted(shapes)} "
                f"(env.noop_action() is the engine default)"
            )
        out = {}
        for k, shape in shapes.items():
            a = jnp.asarray(action[k])
            if a.shape != shape or not jnp.issubdtype(a.dtype, jnp.integer):
                raise ValueError(
                    f"action[{k!r}] must be an integer array of shape {shape}, "
                    f"got {a.dtype} {tuple(a.shape)}"
                )
            out[k] = a.astype(jnp.int32)
        return out


# -- construction and validation ---------------------------------------------------------------
_POSITIVE = (
    "max_num_seqs",
    "max_batched_tokens",
    "kv_bytes_per_token",
    "gpu_pool_tokens",
    "pcie_bytes_per_s",
    "t_weights",
    "arrival_rate",
    "max_model_len",
    "max_tokens",
    "client_timeout",
    "ttft_slo",
    "tpot_slo",
    "horizon",
    "sglang_retract_tokens",
    "sglang_reserve_cap",
    "agent_task_tokens",
    "agent_output_tokens",
    "tool_gap_median",
    "agent_turn_tokens",
    "calls_per_arrival",
)
_NON_NEGATIVE = (
    "max_partial_prefills",
    "sglang_ratio_init",
    "sglang_ratio_min",
    "sglang_ratio_decay",
    "cpu_pool_tokens",
    "t_cpu",
    "lin_a",
    "lin_b",
    "attn_decode",
    "attn_prefill",
    "gap_sigma",
    "num_prefixes",
    "prefix_tokens",
    "pin_ttl",
    "tool_gap_sigma",
)
_INTEGRAL = (
    "engine",
    "max_num_seqs",
    "max_batched_tokens",
    "max_partial_prefills",
    "sglang_retract_tokens",
    "sglang_reserve_cap",
    "kv_dtype",
    "gpu_pool_tokens",
    "cpu_pool_tokens",
    "workload",
    "max_model_len",
    "max_tokens",
    "num_prefixes",
    "prefix_tokens",
)


def validate_params(params: ServeParams, cfg: ServeConfig) -> ServeParams:
    """Check concrete parameter values (scalars or arrays); a ValueError names the field and
    the allowed range. Traced values are not checked (validate before jit)."""
    for field in dataclasses.fields(params):
        v = getattr(params, field.name)
        if isinstance(v, jax.core.Tracer):
            continue
        a = np.asarray(v, np.float64)
        name = field.name
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} must be finite, got {v!r}")
        if name in _POSITIVE and not np.all(a > 0):
            raise ValueError(f"{name} must be > 0, got {v!r}")
        if name in _NON_NEGATIVE and not np.all(a >= 0):
            raise ValueError(f"{name} must be >= 0, got {v!r}")
        if name in _INTEGRAL and not np.all(a == np.round(a)):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    checks = (
        ("engine", 0, len(ENGINES) - 1),
        ("kv_dtype", 0, len(KV_DTYPES) - 1),
        ("workload", 0, len(workloads.WORKLOADS) - 1),
        ("prefix_share", 0.0, 1.0),
        ("subagent_share", 0.0, 1.0),
        ("agent_turns", 1.0, 64.0),
        ("num_prefixes", 0, cfg.max_segments),
        ("max_partial_prefills", 1, math.inf),
    )
    for name, lo, hi in checks:
        a = np.asarray(getattr(params, name), np.float64)
        if not np.all((a >= lo) & (a <= hi)):
            raise ValueError(f"{name} must be in [{lo}, {hi}], got {getattr(params, name)!r}")
    if np.any(np.asarray(params.max_tokens) >= np.asarray(params.max_model_len)):
        raise ValueError("max_tokens must be < max_model_len")
    if cfg.engine is not None:
        if cfg.engine not in ENGINES:
            raise ValueError(
                f"config engine must be one of {list(ENGINES)} or None, got {cfg.engine!r}"
            )
        e = params.engine
        traced = isinstance(e, jax.core.Tracer)
        if not traced and np.any(np.asarray(e) != ENGINES.index(cfg.engine)):
            raise ValueError(
                f"params.engine {e!r} is not the config's engine {cfg.engine!r} (its rules are the "
                f"only ones traced); make the env with that engine, or config=dict(engine=None)"
            )
    return params


@functools.lru_cache(maxsize=8)
def _replay_trace(source: str, mtime: float) -> replay.ReplayTrace:
    """One ReplayTrace per trace (and file version) per process."""
    return replay.replay_trace(traces.load_trace(source))


def workload_source(name: str) -> tuple[int, replay.ReplayTrace | None]:
    """A workload name -> (synthetic workload index, None) or (0, the trace to replay): a
    synthetic workload, a bundled trace or a trace file (ValueError naming the allowed)."""
    synthetic = workloads.WORKLOADS + tuple(workloads.ALIASES) + (workloads.AGENTIC,)
    if name == workloads.AGENTIC:
        return 0, None
    if name in synthetic:
        return workloads.workload_index(name), None
    if name in traces.BUNDLED:
        return 0, _replay_trace(name, 0.0)
    if isinstance(name, str) and os.path.isfile(name):
        return 0, _replay_trace(os.path.abspath(name), os.path.getmtime(name))
    raise ValueError(
        f"unknown workload {name!r}; allowed: {sorted(synthetic)}, a bundled trace "
        f"{list(traces.TRACE_NAMES)} or a trace file ({', '.join(traces.FORMATS)})"
    )


def parse_overrides(items) -> dict[str, float]:
    """`["horizon=60", "gpu_pool_tokens=40000"]` (the CLIs' --set) -> {"horizon": 60.0, ...}:
    ServeParams overrides for `make`. ValueError naming the item unless it is NAME=NUMBER with
    a ServeParams field and a finite number."""
    fields = sorted(f.name for f in dataclasses.fields(ServeParams))
    out = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        try:
            number = float(value) if sep and name else math.nan
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(f"--set {item!r}: want NAME=NUMBER (a finite number)")
        if name not in fields:
            raise ValueError(f"--set {item!r}: unknown ServeParams field; allowed: {fields}")
        out[name] = number
    return out


def make(
    preset: str = "toy",
    engine: str = "vllm",
    workload: str = "synthetic",
    load: float = 0.8,
    kv_dtype: str = "bf16",
    config: dict | None = None,
    **params: Any,
) -> tuple[ServeEnv, ServeParams]:
    """`env, params = make(preset="h100-llama3-8b", engine="vllm", load=0.8)`.

    preset: one of PRESETS; engine: vllm | sglang | trt; workload: a synthetic workload
    (synthetic-conv, alias synthetic; synthetic-code), `agentic` (closed-loop sessions), a
    bundled trace (azure-conv, azure-code, mooncake-conv, mooncake-synthetic) or a trace file,
    replayed (serve/replay.py); agentic and traces with prefixes get max_segments 64 unless
    config says otherwise; load: offered load as a fraction of the preset's roofline capacity
    for that workload (capacity.capacity_rps);
    kv_dtype: bf16 | fp8; config: ServeConfig overrides; params: ServeParams overrides (e.g.
    horizon=30.0, ttft_slo=1.0, arrival_rate=...: an explicit arrival_rate wins over load)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {list(PRESETS)}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; allowed: {list(ENGINES)}")
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown kv_dtype {kv_dtype!r}; allowed: {list(KV_DTYPES)}")
    if not (isinstance(load, int | float) and math.isfinite(load) and load > 0):
        raise ValueError(f"load must be a finite number > 0, got {load!r}")
    w, trace = workload_source(workload)
    spec = PRESETS[preset]
    cfg_fields = {f.name for f in dataclasses.fields(ServeConfig)} - {"trace", "agentic"}
    # The engine's rules are static (only its rules traced) unless config says engine=None.
    agentic = workload == workloads.AGENTIC
    cfg_over = {**spec["config"], "engine": engine, **(config or {})}
    unknown = set(config or {}) - cfg_fields
    if unknown:
        raise ValueError(f"unknown config {sorted(unknown)}; allowed: {sorted(cfg_fields)}")
    if (agentic or (trace is not None and trace.has_prefixes)) and "max_segments" not in (
        config or {}
    ):
        cfg_over["max_segments"] = max(MANY_SEGMENTS, cfg_over.get("max_segments", 0))
    cfg = ServeConfig(**cfg_over, trace=trace, agentic=agentic)
    for name in cfg_fields - {"reserve_levels", "engine"}:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config {name} must be a positive int, got {value!r}")
    p_fields = {f.name for f in dataclasses.fields(ServeParams)}
    unknown = set(params) - p_fields
    if unknown:
        raise ValueError(f"unknown param {sorted(unknown)}; allowed: {sorted(p_fields)}")
    base = {
        **spec["params"],
        "engine": ENGINES.index(engine),
        "workload": w,
        "kv_dtype": KV_DTYPES.index(kv_dtype),
        "gap_sigma": workloads.GAP_SIGMA[w],
        "prefix_tokens": 512,
    }
    if trace is not None:  # no synthetic system prompts: the trace's segments use the keys
        base.update(num_prefixes=0, prefix_share=0.0)
    if agentic:  # the main agents' and the subagents' system prompts
        base.update(num_prefixes=len(workloads.SYSTEM_KEYS), prefix_tokens=8192, gap_sigma=1.0)
    p = validate_params(ServeParams(**{**base, **params}), cfg)
    moments = None
    if trace is not None:
        moments = replay.length_moments(trace, int(p.max_tokens), int(p.max_model_len))
    if agentic:
        moments = workloads.agentic_moments(p)
        p = p.replace(calls_per_arrival=moments["calls_per_session"])
    if "arrival_rate" not in params:
        rate = arrival_rate_at(load, capacity_rps(p, moments), float(p.calls_per_arrival))
        p = p.replace(arrival_rate=rate)
    p = normalize_params(validate_params(p, cfg))
    if trace is not None:
        covered = trace.duration * trace.native_rate / float(p.arrival_rate)
        if float(p.horizon) > covered:
            raise ValueError(
                f"trace {trace.name!r} lasts {covered:.0f} simulated s at "
                f"{float(p.arrival_rate):.3g} req/s; horizon must be <= that, "
                f"got {float(p.horizon):g}"
            )
    return ServeEnv(cfg, p), p
