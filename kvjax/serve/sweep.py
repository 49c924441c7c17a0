"""Load sweeps and capacity at an SLO for kv-serve-v0 (docs/serving-capacity.md).

    env, unit = kvjax.make("kv-serve-v0", preset="toy", workload="synthetic", load=1.0)
    runner = LoadRunner(make_policy("engine_default", env), env, unit, num_scenarios=16)
    rows = load_sweep(runner, [0.5, 0.75, 1.0, 1.25])     # goodput, attainment, 95% intervals
    cap = capacity(runner, [0.5, 0.75, 1.0, 1.25], target=0.9, tol=0.02)

Load: `unit` are the params `make(..., load=1.0)` returns, whose arrival rate is the capacity
in stream arrivals per second; a sweep's load x runs them with the arrival rate make's rule
gives (capacity.arrival_rate_at: x * unit.arrival_rate), a traced parameter, so every load runs
the same compiled program.

Common random numbers: scenario i of every load and every policy has the same keys (the
rollout engine's `scenario_keys(key, i)`). Its request stream is the same requests at every
load, with arrival times scaled by 1 / load: a synthetic or agentic gap is exp(sigma z) /
arrival_rate from the same uniform (workload.draw_request). A replayed trace's window start
depends on the load (make draws it over the starts that cover the horizon at that load), so the
runner pins every load's window to the one drawn at `max_load` (covered at every lower load):
a sweep's trace scenario at load x is therefore not a plain `rollout` at load x.

Attainment (the capacity criterion) counts every request the window decided, not only the
finished ones: good / decided, where decided = finished (good or late) + dropped by the client
timeout + requests still in the system that have already missed an SLO by the end (no first
token although older than ttft_slo, a late first token, or a decode rate already slower than
tpot_slo for its remaining tokens) + requests still behind the stream pointer (the table full)
that arrived more than ttft_slo before the end. Requests still in flight within both SLOs are
undecided and left out, so a window's last seconds bias nothing. An overloaded engine that
finishes few requests thus scores low, where `episode_metrics`' slo_attainment (good /
finished) would not. For agentic sessions the stream's unit is a session: one behind the
pointer counts as its first call missed. The pooled ratio (sum of good / sum of decided over
the scenarios) is the fraction of requests that met both SLOs; its 95% interval is the delta
method's over scenarios.

Capacity: the largest load of a coarse grid whose attainment meets the target brackets the
crossing with the next grid load, then bisection halves the bracket until it is at most `tol`
wide. The engine is not monotone in load by construction (a burst can land differently), so
the grid first: bisection never leaves a bracket whose low end meets the target and whose high
end does not. Every evaluation is memoised per load, so a sweep and a capacity search on one
runner share runs, and the same inputs give identical outputs.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.rollout import scenario_keys
from kvjax.serve import replay, workload
from kvjax.serve.capacity import arrival_rate_at
from kvjax.serve.env import ServeEnv
from kvjax.serve.rollout import play_until_truncated
from kvjax.serve.types import EMPTY, ServeConfig, ServeParams, ServeState
from kvjax.stats import Z95, mean_ci

# Requests behind the stream pointer are counted in chunks (while the chunk's last arrival is
# still before the deadline), at most BEHIND_CHUNK x BEHIND_CHUNKS of them.
BEHIND_CHUNK = 256
BEHIND_CHUNKS = 64
SWEEP_METRICS = (
    "goodput",
    "score",
    "slo_attainment",
    "hit_rate",
    "p99_ttft",
    "p99_tpot",
    "preemptions_per_s",
    "throughput_tokens",
)


def outcomes(state: ServeState, params: ServeParams, cfg: ServeConfig) -> dict[str, chex.Array]:
    """Request outcomes at the end of a window (one scenario, jittable; module docstring):
    good, late (finished outside an SLO), timed_out, missed_in_system (still in the table,
    already past an SLO), missed_behind (behind the stream pointer, arrived more than ttft_slo
    before the end), undecided (in the table within both SLOs so far) and decided."""
    req, m = state.requests, state.metrics
    now = state.clock
    f32 = jnp.float32
    present = (req.status != EMPTY) & (req.arrival <= now)
    started = req.first_token >= 0
    waited = jnp.where(started, req.first_token, now) - req.arrival
    # A request that has not finished emits its last token after `now`: its TPOT is at least
    # (now - first token) / (output_len - 1).
    pace = (now - req.first_token) / jnp.maximum(req.output_len - 1, 1).astype(f32)
    slow = started & (req.output_len > 1) & (pace > params.tpot_slo)
    missed_rows = present & ((waited > params.ttft_slo) | slow)
    behind = arrived_behind(state, params, cfg, now - jnp.asarray(params.ttft_slo, f32))
    late = m.finished - m.good
    missed_in_system = jnp.sum(missed_rows).astype(jnp.int32)
    return dict(
        good=m.good,
        late=late,
        timed_out=m.timed_out,
        missed_in_system=missed_in_system,
        missed_behind=behind,
        undecided=jnp.sum(present & ~missed_rows).astype(jnp.int32),
        decided=m.finished + m.timed_out + missed_in_system + behind,
    )


def arrived_behind(state: ServeState, params: ServeParams, cfg: ServeConfig, deadline):
    """Requests still behind the stream pointer (not yet in the table) that arrived by
    `deadline` (float32 running sums of the stream's gaps, as the engine forms them; at most
    BEHIND_CHUNK x BEHIND_CHUNKS)."""
    first = state.stream_start + state.next_index

    def cond(c):
        _, _, j, done = c
        return ~done & (j < BEHIND_CHUNKS)

    def body(c):
        t0, count, j, _ = c
        idx = first + 1 + j * BEHIND_CHUNK + jnp.arange(BEHIND_CHUNK)
        t = t0 + jnp.cumsum(workload.draw_request(state.seed, idx, params, cfg)["gap"])
        return t[-1], count + jnp.sum(t <= deadline).astype(jnp.int32), j + 1, t[-1] > deadline

    t0 = state.next_arrival
    init = (t0, (t0 <= deadline).astype(jnp.int32), jnp.int32(0), t0 > deadline)
    return jax.lax.while_loop(cond, body, init)[1]


def pin_window(state: ServeState, params: ServeParams, window: ServeParams, cfg: ServeConfig):
    """A replayed trace's window drawn as at `window`'s arrival rate (the same requests at every
    load); other workloads unchanged (their stream starts at 0)."""
    if cfg.trace is None:
        return state
    start = replay.window_start(cfg.trace, state.seed, window)
    first = workload.draw_request(state.seed, start, params, cfg)
    return state.replace(stream_start=start, next_arrival=first["gap"].astype(jnp.float32))


def episode(policy, env: ServeEnv, key, index, params: ServeParams, window: ServeParams):
    """One scenario (the rollout engine's keys and loop): episode_metrics, `outcomes` and the
    finished-request TTFT / TPOT log (`log_ttft`, `log_tpot`) of the final state."""
    k_reset, k_policy = scenario_keys(key, index)
    _, state = env.reset_env(k_reset, params)
    state = pin_window(state, params, window, env.config)
    final = play_until_truncated(policy, env, state, k_policy, params)
    out = {k: v for k, v in env.metrics(final, params).items()}
    out.update(outcomes(final, params, env.config))
    # Finished requests' TTFT / TPOT (the last finished_log of them; NaN where unused), for
    # distributions pooled over scenarios.
    m = final.metrics
    used = jnp.arange(m.log_ttft.shape[-1]) < m.log_count
    out["log_ttft"] = jnp.where(used, m.log_ttft, jnp.nan)
    out["log_tpot"] = jnp.where(used, m.log_tpot, jnp.nan)
    return out


@functools.lru_cache(maxsize=32)
def _compiled(policy, cfg: ServeConfig):
    """jit(vmap over scenarios) of `episode`; params are traced (one compile per policy and
    config, whatever the load)."""
    env = ServeEnv(cfg)
    one = lambda key, i, p, w: episode(policy, env, key, i, p, w)  # noqa: E731
    return jax.jit(jax.vmap(one, in_axes=(None, 0, None, None)))


def _check_load(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")
    x = float(x)
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")
    return x


def check_loads(loads, name: str = "loads") -> tuple[float, ...]:
    """A non-empty, strictly increasing sequence of finite loads > 0 (ValueError otherwise)."""
    if isinstance(loads, str) or not hasattr(loads, "__len__") or len(loads) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of loads > 0, got {loads!r}")
    out = tuple(_check_load(name, x) for x in loads)
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(f"{name} must be strictly increasing, got {list(out)}")
    return out


class LoadRunner:
    """Runs `policy` on `num_scenarios` paired scenarios at any load <= max_load, memoised per
    load (numpy results per scenario). `unit`: the params of make(..., load=1.0)."""

    def __init__(
        self,
        policy,
        env: ServeEnv,
        unit: ServeParams,
        *,
        num_scenarios: int = 8,
        seed: int = 0,
        max_load: float = 2.0,
        progress: bool = False,
    ):
        if not callable(policy):
            raise ValueError(f"policy must be callable (key, state, params), got {policy!r}")
        if not isinstance(env, ServeEnv):
            raise ValueError(f"env must be a kv-serve-v0 ServeEnv, got {type(env).__name__}")
        if isinstance(num_scenarios, bool) or not isinstance(num_scenarios, int | np.integer):
            raise ValueError(f"num_scenarios must be an int >= 1, got {num_scenarios!r}")
        if num_scenarios < 1:
            raise ValueError(f"num_scenarios must be an int >= 1, got {num_scenarios!r}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
        self.policy, self.env = policy, env
        # make(..., load=1.0)'s arrival rate: the capacity in stream arrivals per second.
        self.unit_rate = float(np.asarray(unit.arrival_rate))
        self.unit = unit
        self.num_scenarios = int(num_scenarios)
        self.seed = int(seed)
        self.max_load = _check_load("max_load", max_load)
        self.progress = progress
        trace = env.config.trace
        if trace is not None:
            top_rate = arrival_rate_at(self.max_load, self.unit_rate)
            covered = trace.duration * trace.native_rate / top_rate
            if float(unit.horizon) > covered:
                raise ValueError(
                    f"trace {trace.name!r} lasts {covered:.0f} simulated s at max_load "
                    f"{self.max_load:g}; horizon must be <= that, got {float(unit.horizon):g}"
                )
        self._cache: dict[float, dict[str, np.ndarray]] = {}

    def params_at(self, load: float) -> ServeParams:
        """The unit params at `load` (arrival_rate float32, as make stores it)."""
        return self.unit.replace(arrival_rate=jnp.float32(arrival_rate_at(load, self.unit_rate)))

    def __call__(self, load: float) -> dict[str, np.ndarray]:
        load = _check_load("load", load)
        if load > self.max_load:
            raise ValueError(f"load must be <= max_load={self.max_load:g}, got {load:g}")
        if load not in self._cache:
            fn = _compiled(self.policy, self.env.config)
            idx = jnp.arange(self.num_scenarios, dtype=jnp.int32)
            key = jax.random.PRNGKey(self.seed)
            out = fn(key, idx, self.params_at(load), self.params_at(self.max_load))
            self._cache[load] = {k: np.asarray(v) for k, v in out.items()}
        return self._cache[load]

    def attainment(self, load: float) -> float:
        """Pooled attainment at `load`: sum good / sum decided over the scenarios."""
        r = self(load)
        return float(r["good"].sum() / max(int(r["decided"].sum()), 1))

    @property
    def evaluated(self) -> tuple[float, ...]:
        return tuple(sorted(self._cache))


def ratio_ci(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
    """Pooled ratio sum(num) / sum(den) and its delta-method 95% half-width over scenarios."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if den.sum() <= 0:
        return 0.0, 0.0
    r = num.sum() / den.sum()
    n = num.size
    if n < 2:
        return float(r), 0.0
    resid = num - r * den
    se = math.sqrt((resid**2).sum() / (n * (n - 1))) / den.mean()
    return float(r), float(Z95 * se)


def summarize(load: float, runner: LoadRunner) -> dict[str, Any]:
    """One sweep row: offered rate, attainment (pooled, interval), means (goodput with its
    interval) of SWEEP_METRICS and the outcome counts."""
    r = runner(load)
    att, att_ci = ratio_ci(r["good"], r["decided"])
    good, good_ci = mean_ci(r["goodput"])
    calls = float(np.asarray(runner.unit.calls_per_arrival))
    row = dict(
        load=load,
        offered_rps=arrival_rate_at(load, runner.unit_rate) * calls,  # calls per second
        goodput=good,
        goodput_ci=good_ci,
        attainment=att,
        attainment_ci=att_ci,
    )
    for k in SWEEP_METRICS:
        if k != "goodput":
            row[k] = float(np.mean(r[k]))
    for k in ("good", "late", "timed_out", "missed_in_system", "missed_behind", "undecided"):
        row[k] = int(np.sum(r[k]))
    return row


def load_sweep(runner: LoadRunner, loads) -> list[dict[str, Any]]:
    """`summarize` at each load (strictly increasing, each <= runner.max_load)."""
    loads = check_loads(loads)
    if loads[-1] > runner.max_load:
        raise ValueError(f"loads must be <= max_load={runner.max_load:g}, got {loads[-1]:g}")
    out = []
    for x in _progress(loads, runner, "sweep"):
        out.append(summarize(x, runner))
    return out


def capacity(runner: LoadRunner, grid, *, target: float = 0.9, tol: float = 0.02) -> dict:
    """The largest load whose pooled attainment meets `target` (module docstring): grid
    bracket, then bisection to `tol`.

    Returns capacity (a load that meets the target; 0.0 if the grid's first load fails), upper
    (a load within tol above it that fails; inf if the grid's last load meets the target),
    status ("bracketed", "below_grid" or "above_grid"), their attainments, `points` (every
    (load, attainment) evaluated, by load) and `monotone` (attainment non-increasing over
    them)."""
    grid = check_loads(grid, "grid")
    if isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target <= 1:
        raise ValueError(f"target must be a number in (0, 1], got {target!r}")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not (0 < tol < math.inf):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    if grid[-1] > runner.max_load:
        raise ValueError(f"grid loads must be <= max_load={runner.max_load:g}, got {grid[-1]:g}")
    ok = [runner.attainment(x) >= target for x in _progress(grid, runner, "capacity grid")]
    passing = [i for i, good in enumerate(ok) if good]
    if not passing:
        lo, hi, status = 0.0, grid[0], "below_grid"
    elif passing[-1] == len(grid) - 1:
        lo, hi, status = grid[-1], math.inf, "above_grid"
    else:
        lo, hi, status = grid[passing[-1]], grid[passing[-1] + 1], "bracketed"
        while hi - lo > tol:
            mid = (lo + hi) / 2
            if runner.attainment(mid) >= target:
                lo = mid
            else:
                hi = mid
    points = [(x, runner.attainment(x)) for x in runner.evaluated]
    att = [a for _, a in points]
    return dict(
        capacity=lo,
        upper=hi,
        status=status,
        target=float(target),
        tol=float(tol),
        attainment_at_capacity=runner.attainment(lo) if lo > 0 else math.nan,
        attainment_at_upper=runner.attainment(hi) if math.isfinite(hi) else math.nan,
        points=points,
        monotone=all(b <= a for a, b in zip(att, att[1:], strict=False)),
    )


def format_capacity(result: dict) -> str:
    """A `capacity` result for a table: the load, `< lowest` or `>= highest` grid load."""
    if result["status"] == "below_grid":
        return f"< {result['upper']:g}"
    if result["status"] == "above_grid":
        return f">= {result['capacity']:g}"
    return f"{result['capacity']:.3f}"


def _progress(items, runner: LoadRunner, desc: str):
    if not runner.progress:
        return items
    from tqdm.auto import tqdm

    name = getattr(runner.policy, "__name__", "policy")
    return tqdm(items, desc=f"{name} {desc}", leave=False)


TIMELINE_FIELDS = (
    "clock",
    "used",
    "cached",
    "free",
    "waiting",
    "backlog",
    "running",
    "recent_ttft",
)


def timeline(policy, env: ServeEnv, params: ServeParams, key, steps: int) -> dict[str, Any]:
    """One scenario stepped `steps` control periods (jit, lax.scan of step_env; past the
    horizon the engine idles): per step `TIMELINE_FIELDS` (memory in blocks; requests waiting
    in the table, arrived but still behind the stream pointer, running; the engine's running
    average of TTFT) and the final state's finished-request TTFT / TPOT log (`ttft`, `tpot`:
    numpy, the last finished_log completions)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    from kvjax.serve import engine
    from kvjax.serve.types import RUNNING, WAITING

    @jax.jit
    def run(key, params):
        k_reset, k_policy = scenario_keys(key, 0)
        _, state = env.reset_env(k_reset, params)

        def body(st, t):
            action = policy(jax.random.fold_in(k_policy, t), st, params)
            _, nxt, _, _, _, _ = env.step_env(k_policy, st, action, params)
            mem = engine.memory(nxt, params)
            row = dict(
                clock=nxt.clock,
                used=mem["used"],
                cached=mem["cached"],
                free=mem["free"],
                waiting=jnp.sum(nxt.requests.status == WAITING),
                # arrived but not yet in the table (every row taken): the queue's hidden part
                backlog=arrived_behind(nxt, params, env.config, nxt.clock),
                running=jnp.sum(nxt.requests.status == RUNNING),
                recent_ttft=nxt.recent_ttft,
            )
            return nxt, row

        final, rows = jax.lax.scan(body, state, jnp.arange(steps))
        return final, rows

    final, rows = run(key, params)
    out = {k: np.asarray(v) for k, v in rows.items()}
    m = final.metrics
    n = min(int(m.log_count), m.log_ttft.shape[-1])
    out["ttft"] = np.asarray(m.log_ttft)[:n]
    out["tpot"] = np.asarray(m.log_tpot)[:n]
    out["pool"] = int(engine.pool_blocks(params))
    out["metrics"] = {k: float(v) for k, v in env.metrics(final, params).items()}
    return out
