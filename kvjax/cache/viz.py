"""Plotting helpers for notebooks and reports (matplotlib, headless-safe).

Every helper builds a `matplotlib.figure.Figure` with the object API (no pyplot state, never
`show`), so it works under the Agg backend, in CI and in notebooks alike, and returns the figure;
call `fig.savefig(path)` or let Jupyter render it. Inputs are plain arrays / pytrees:

- an episode trajectory: an `EnvState` whose leaves carry a leading time axis [N] (e.g. the
  initial state prepended to the states a `lax.scan` over `env.step_env` stacks; `record` plays
  a batch of them), and optionally the actions int[N_steps, A], where `actions[t]` was chosen at
  the state whose `time == t`;
- rollout results: `{policy: {metric: float[num_scenarios]}}` (the per-scenario rubric dicts);
- training metrics: a JSON-lines file, one object per line with a step counter and metric keys.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from kvjax.cache.types import (
    ACTION_KINDS,
    BLOCK_TYPES,
    COMPRESS,
    CPU,
    DIFFICULTIES,
    EVICT,
    GPU,
    PRECISIONS,
    SWAP,
    SYSTEM,
    EnvParams,
    EnvState,
)
from kvjax.stats import Z
from kvjax.stats import mean_ci as stats_mean_ci

THRESHOLDS = (0.8, 0.95, 1.0)  # the headroom score's usage levels (dynamics.HEADROOM_LEVELS)
THRESHOLD_STYLES = {
    0.8: dict(color="tab:olive", linestyle=":", label="0.8"),
    0.95: dict(color="tab:orange", linestyle="--", label="0.95"),
    1.0: dict(color="tab:red", linestyle="-", label="budget (1.0)"),
}
BLOCK_COLORS = ("tab:purple", "tab:blue", "tab:green", "tab:orange", "tab:gray")
KIND_COLORS = {"evict": "tab:red", "compress": "tab:cyan", "swap_to_cpu": "tab:brown"}
KIND_MARKERS = {"evict": "x", "compress": "v", "swap_to_cpu": ">"}
AGENT_KINDS = ACTION_KINDS[1:]  # evict, compress, swap_to_cpu
PRECISION_FADE = (0.0, 0.45, 0.7)  # fraction of white mixed into a slot's colour per precision
STEP_KEYS = ("step", "env_steps", "global_step", "timesteps", "num_env_steps", "update",
             "iteration")


# -- recording trajectories -------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _recorder(policy: Any, cfg: Any) -> Any:
    from kvjax.cache.env import KVCacheEnv
    from kvjax.rollout import scenario_keys

    env = KVCacheEnv(cfg)

    def one(key, index, params):
        k_reset, k_policy = scenario_keys(key, index)
        _, state = env.reset_env(k_reset, params)

        def step(st, t):
            action = policy(jax.random.fold_in(k_policy, t), st, params)
            _, nxt, *_ = env.step_env(k_policy, st, action, params)
            return nxt, (nxt, action)

        _, (states, actions) = jax.lax.scan(step, state, jnp.arange(cfg.episode_len))
        states = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), state, states)
        return states, actions

    return jax.jit(jax.vmap(one, in_axes=(None, 0, None)))


def record(
    policy: Any, key: Any, num_scenarios: int, params: EnvParams, env: Any = None
) -> tuple[EnvState, np.ndarray]:
    """Play `num_scenarios` episodes like `kvjax.rollout.rollout` (same scenario and policy keys,
    so scenario i is rollout's scenario i) and keep every state: returns (states with leaves
    [num_scenarios, T + 1, ...], the initial state first, and actions int [num_scenarios, T, A]),
    as numpy. Memory grows with T x the state size (~5 KB at the default config): keep it to a
    few thousand scenarios."""
    from kvjax.cache.env import KVCacheEnv
    from kvjax.rollout import normalize_params

    if int(num_scenarios) < 1:
        raise ValueError(f"num_scenarios must be >= 1, got {num_scenarios}")
    env = env or KVCacheEnv()
    fn = _recorder(policy, env.config)
    states, actions = fn(jnp.asarray(key), jnp.arange(int(num_scenarios), dtype=jnp.int32),
                         normalize_params(params))
    return _np(states), np.asarray(actions)


def episode_at(states: EnvState, i: int) -> EnvState:
    """Scenario i's trajectory out of a batch from `record` (leaves [T + 1, ...])."""
    return jax.tree_util.tree_map(lambda x: x[i], states)


# -- small numeric helpers ---------------------------------------------------------------------
def _np(tree: Any) -> Any:
    """Device pytree -> numpy pytree (one transfer)."""
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _budget_tokens(states: EnvState, params: EnvParams) -> np.ndarray:
    """Budget in fp16-token equivalents per state (scenarios.budget_tokens, in numpy)."""
    cap = float(np.asarray(params.kv_cache_bytes)) / float(np.asarray(params.kv_bytes_per_token))
    return np.asarray(states.memory_budget, np.float64) * cap


def _check_trajectory(states: EnvState) -> EnvState:
    states = _np(states)
    if np.ndim(states.time) != 1:
        raise ValueError(
            "states must be one episode with a leading time axis (state.time of shape [N]), got "
            f"state.time of shape {np.shape(states.time)}"
        )
    return states


def mean_ci(x: Any, confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation confidence interval (1.96 x SEM at
    95%; 0 for a single value): `kvjax.stats.mean_ci` with NaNs left out."""
    if confidence not in Z:
        raise ValueError(f"confidence must be one of {sorted(Z)}, got {confidence!r}")
    return stats_mean_ci(x, Z[confidence], skip_nan=True)


# -- episode views -----------------------------------------------------------------------------
def memory_by_type(states: EnvState, params: EnvParams) -> np.ndarray:
    """GPU KV per block type as a fraction of the scenario's budget: float [N, 5].

    Row sums equal the env's `memory_usage` (usage after the step's preemptions)."""
    s = _check_trajectory(states)
    sl = s.slots
    mem = sl.tokens * np.exp2(-sl.precision.astype(np.float64))
    mem = np.where(sl.active & (sl.location == GPU), mem, 0.0)
    onehot = sl.block_type[..., None] == np.arange(len(BLOCK_TYPES))
    per_type = np.sum(mem[..., None] * onehot, axis=-2)
    return per_type / _budget_tokens(s, params)[:, None]


def plot_memory(
    states: EnvState, params: EnvParams, *, ax: Any = None, title: str | None = None
) -> Figure:
    """GPU memory over an episode, stacked per block type, against the 0.8 / 0.95 / 1.0 budget
    thresholds, with the step's peak usage before engine preemption as a dashed line."""
    s = _check_trajectory(states)
    fig, ax = _fig_ax(ax, figsize=(8, 3.5))
    t = s.time.astype(int)
    per_type = memory_by_type(s, params)
    ax.stackplot(t, per_type.T, labels=BLOCK_TYPES, colors=BLOCK_COLORS, alpha=0.85)
    ax.plot(t, s.usage_peak, color="black", linestyle="--", marker=".", label="peak (pre-preempt)")
    for level in THRESHOLDS:
        ax.axhline(level, linewidth=1.2, **THRESHOLD_STYLES[level])
    top = max(1.1, float(np.max(s.usage_peak)) * 1.05, float(per_type.sum(1).max()) * 1.05)
    ax.set_ylim(0.0, top)
    ax.set_xlim(t.min(), t.max())
    ax.set_xlabel("step")
    ax.set_ylabel("GPU KV / budget")
    ax.set_title(title or "GPU memory by block type")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig


def effective_actions(states: EnvState, actions: Any) -> dict[str, np.ndarray]:
    """Which agent actions acted, replayed in order on the pre-action states.

    `states` has leaves [..., S] for slots (any leading shape L, e.g. [N] or [B, N]) and
    `actions` int [*L, A], `actions[..., a]` chosen at that state. Returns `kind` (int, 0 keep,
    1 evict, 2 compress, 3 swap), `slot` (int) and `block_type` (int, of the targeted slot), all
    [*L, A], with `kind` set to 0 for entries that were no-ops (invalid or keep)."""
    sl = _np(states).slots
    actions = np.asarray(actions)
    S = sl.active.shape[-1]
    if actions.shape[:-1] != sl.active.shape[:-1]:
        raise ValueError(
            f"actions must have shape {sl.active.shape[:-1]} + (max_actions,) to match the "
            f"states, got {actions.shape}"
        )
    active, precision, location = sl.active.copy(), sl.precision.copy(), sl.location.copy()
    n_ids = 1 + 3 * S
    kind_out = np.zeros(actions.shape, np.int32)
    slot_out = np.zeros(actions.shape, np.int32)
    type_out = np.zeros(actions.shape, np.int32)
    for a in range(actions.shape[-1]):  # in order: later actions see earlier ones
        act = actions[..., a]
        in_range = (act > 0) & (act < n_ids)
        kind = np.where(in_range, (act - 1) // S + 1, 0)
        slot = np.where(in_range, (act - 1) % S, 0)
        on, prec, loc = (_take(x, slot) for x in (active, precision, location))
        ok = (
            ((kind == EVICT) & on)
            | ((kind == COMPRESS) & on & (loc == GPU) & (prec < 2))
            | ((kind == SWAP) & on & (loc == GPU))
        )
        kind = np.where(ok, kind, 0)
        hit = (np.arange(S) == slot[..., None]) & ok[..., None]
        active = active & ~(hit & (kind[..., None] == EVICT))
        precision = precision + (hit & (kind[..., None] == COMPRESS))
        location = np.where(hit & (kind[..., None] == SWAP), CPU, location)
        kind_out[..., a], slot_out[..., a] = kind, slot
        type_out[..., a] = _take(sl.block_type, slot)
    return {"kind": kind_out, "slot": slot_out, "block_type": type_out}


def _take(x: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """x[..., slot] per leading index (x [..., S], slot [...])."""
    return np.take_along_axis(x, slot[..., None], axis=-1)[..., 0]


def inferred_preemptions(states: EnvState, params: EnvParams, actions: Any = None) -> np.ndarray:
    """bool [N-1, S]: sequences that left slot i between states t and t+1 although they could
    not have completed (system block, paused for a tool, or more output left than one step
    decodes) and the agent did not evict them - the engine preempted them. Conservative: a
    preempted sequence that could also have finished that step is not marked."""
    s = _check_trajectory(states)
    sl = s.slots
    gone = sl.active[:-1] & ((~sl.active[1:]) | (sl.seq_id[1:] != sl.seq_id[:-1]))
    dtps = int(np.asarray(params.decode_tokens_per_step))
    cannot_finish = (
        (sl.block_type[:-1] == SYSTEM) | (sl.tool_wait[:-1] > 0) | (sl.remaining[:-1] > dtps)
    )
    out = gone & cannot_finish
    if actions is not None:
        ev = _episode_actions(s, actions)
        if ev is not None:
            evicted = np.zeros_like(out)
            for t in range(out.shape[0]):
                e = ev["kind"][t] == EVICT
                evicted[t, ev["slot"][t][e]] = True
            out &= ~evicted
    return out


def _episode_actions(s: EnvState, actions: Any) -> dict[str, np.ndarray] | None:
    """Effective actions aligned to the states: row t holds the actions taken at state t
    (rows for states past the last action are keep)."""
    if actions is None:
        return None
    actions = np.asarray(actions)
    if actions.ndim != 2:
        raise ValueError(f"actions must be int [steps, max_actions], got shape {actions.shape}")
    N = s.time.shape[0]
    aligned = np.zeros((N, actions.shape[1]), actions.dtype)
    for i, t in enumerate(s.time.astype(int)):
        if 0 <= t < actions.shape[0]:
            aligned[i] = actions[t]
    return effective_actions(s, aligned)


def plot_cache_map(
    states: EnvState,
    params: EnvParams,
    actions: Any = None,
    *,
    ax: Any = None,
    title: str | None = None,
) -> Figure:
    """A map of the cache slots (rows) over time (columns): colour = block type, paler = lower
    precision (fp16, int8, int4), a dot = the KV lives on the CPU, white = empty. Agent actions
    that acted are marked between the columns they connect (x evict, v compress, > swap);
    inferred engine preemptions are black squares."""
    s = _check_trajectory(states)
    fig, ax = _fig_ax(ax, figsize=(8, 4.5))
    sl = s.slots
    N, S = sl.active.shape
    base = np.array([to_rgb(c) for c in BLOCK_COLORS])[sl.block_type]  # [N, S, 3]
    fade = np.asarray(PRECISION_FADE)[np.clip(sl.precision, 0, 2)][..., None]
    rgb = base * (1.0 - fade) + fade
    rgb = np.where(sl.active[..., None], rgb, 1.0)
    t = s.time.astype(int)
    ax.imshow(
        np.transpose(rgb, (1, 0, 2)),
        aspect="auto",
        interpolation="nearest",
        origin="lower",
        extent=(t[0] - 0.5, t[-1] + 0.5, -0.5, S - 0.5),
    )
    cpu_t, cpu_s = np.nonzero(sl.active & (sl.location == CPU))
    ax.scatter(t[cpu_t], cpu_s, s=6, color="black", label="on CPU")
    ev = _episode_actions(s, actions)
    if ev is not None:
        for k, name in enumerate(AGENT_KINDS, start=1):
            rows, cols = np.nonzero(ev["kind"] == k)
            if rows.size:
                ax.scatter(
                    t[rows] + 0.5, ev["slot"][rows, cols], marker=KIND_MARKERS[name], s=28,
                    color=KIND_COLORS[name], label=name, zorder=3,
                )
    pre_t, pre_s = np.nonzero(inferred_preemptions(s, params, actions))
    if pre_t.size:
        ax.scatter(t[pre_t] + 0.5, pre_s, marker="s", s=18, color="black",
                   label="preempted (inferred)", zorder=3)
    ax.set_xlabel("step")
    ax.set_ylabel("slot")
    ax.set_title(title or "cache map (colour = block type, paler = compressed)")
    handles = [Patch(color=c, label=b) for b, c in zip(BLOCK_TYPES, BLOCK_COLORS, strict=True)]
    handles += [
        Patch(color=tuple(np.array(to_rgb("tab:blue")) * (1 - f) + f), label=f"context {p}")
        for p, f in zip(PRECISIONS[1:], PRECISION_FADE[1:], strict=True)
    ]
    handles += ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig


def plot_episode(
    states: EnvState, params: EnvParams, actions: Any = None, *, title: str | None = None
) -> Figure:
    """Memory usage (top) and the cache map (bottom) of one episode, sharing the step axis."""
    fig = Figure(figsize=(9, 7), layout="constrained")
    ax_mem, ax_map = fig.subplots(2, 1, sharex=True, height_ratios=(1, 1.4))
    plot_memory(states, params, ax=ax_mem)
    plot_cache_map(states, params, actions, ax=ax_map)
    if title:
        fig.suptitle(title)
    return fig


# -- action analysis ---------------------------------------------------------------------------
def action_mix(states: EnvState, actions: Any) -> np.ndarray:
    """Counts of actions that acted, by kind (evict, compress, swap_to_cpu) and the block type
    of the slot they targeted: int [3, 5]. Shapes as in `effective_actions` (any leading axes,
    e.g. [B, T] from a batched rollout trajectory)."""
    ev = effective_actions(states, actions)
    out = np.zeros((len(AGENT_KINDS), len(BLOCK_TYPES)), np.int64)
    for k in range(1, len(ACTION_KINDS)):
        sel = ev["kind"] == k
        out[k - 1] = np.bincount(ev["block_type"][sel], minlength=len(BLOCK_TYPES))
    return out


def plot_action_mix(
    mixes: Mapping[str, Any], *, normalize: bool = True, title: str | None = None
) -> Figure:
    """One panel per policy: bars of its actions by target block type, stacked by kind.

    `mixes` maps a policy name to `action_mix(...)` counts [3, 5]; with `normalize` each panel
    shows fractions of that policy's actions (so panels compare by shape, not volume)."""
    if not mixes:
        raise ValueError("mixes must name at least one policy")
    n = len(mixes)
    fig = Figure(figsize=(3.2 * n + 1.5, 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n, sharey=True, squeeze=False)[0])
    x = np.arange(len(BLOCK_TYPES))
    for ax, (name, counts) in zip(axes, mixes.items(), strict=True):
        counts = np.asarray(counts, np.float64)
        if counts.shape != (len(AGENT_KINDS), len(BLOCK_TYPES)):
            raise ValueError(f"mix for {name!r} must have shape (3, 5), got {counts.shape}")
        total = counts.sum()
        vals = counts / total if normalize and total > 0 else counts
        bottom = np.zeros(len(BLOCK_TYPES))
        for k, kind in enumerate(AGENT_KINDS):
            ax.bar(x, vals[k], bottom=bottom, color=KIND_COLORS[kind], label=kind)
            bottom += vals[k]
        ax.set_xticks(x, BLOCK_TYPES, rotation=45, ha="right")
        ax.set_title(f"{name} ({int(total)} actions)")
        ax.set_xlabel("target block type")
    axes[0].set_ylabel("fraction of actions" if normalize else "actions")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def action_timing(
    states: EnvState, actions: Any, params: EnvParams, bins: Sequence[float] | None = None
) -> dict[str, np.ndarray]:
    """Actions per step by kind against the memory pressure the policy saw when acting.

    Pressure is GPU usage / budget of the pre-action state. Returns `edges` [n_bins + 1],
    `steps` [n_bins] (states that fell in each bin) and `per_step` [3, n_bins] (mean number of
    effective evict / compress / swap actions per step in the bin; NaN for empty bins)."""
    s = _np(states)
    edges = np.asarray(bins if bins is not None else (0, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0, 1.1, 9),
                       np.float64)
    sl = s.slots
    mem = np.where(sl.active & (sl.location == GPU),
                   sl.tokens * np.exp2(-sl.precision.astype(np.float64)), 0.0).sum(-1)
    cap = float(np.asarray(params.kv_cache_bytes)) / float(np.asarray(params.kv_bytes_per_token))
    use = mem / (np.asarray(s.memory_budget, np.float64) * cap)
    ev = effective_actions(s, actions)
    idx = np.clip(np.digitize(use, edges) - 1, 0, len(edges) - 2).ravel()
    steps = np.bincount(idx, minlength=len(edges) - 1).astype(np.float64)
    per_step = np.zeros((len(AGENT_KINDS), len(edges) - 1))
    for k in range(1, len(ACTION_KINDS)):
        n_k = (ev["kind"] == k).sum(-1).ravel()
        per_step[k - 1] = np.bincount(idx, weights=n_k, minlength=len(edges) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_step = per_step / steps
    return {"edges": edges, "steps": steps, "per_step": per_step}


def plot_action_timing(timings: Mapping[str, Mapping[str, Any]], *, title: str | None = None
                       ) -> Figure:
    """One panel per action kind: actions per step against pre-action usage, a line per policy
    (`timings` maps a policy name to `action_timing(...)`), with the thresholds marked."""
    if not timings:
        raise ValueError("timings must name at least one policy")
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    axes = fig.subplots(1, len(AGENT_KINDS), sharey=True)
    for k, (ax, kind) in enumerate(zip(axes, AGENT_KINDS, strict=True)):
        for name, tm in timings.items():
            edges = np.asarray(tm["edges"], np.float64)
            centers = np.arange(len(edges) - 1)
            ax.plot(centers, np.asarray(tm["per_step"])[k], marker="o", label=name)
        labels = [f"{lo:g}-{hi:g}" if hi < 9 else f">{lo:g}" for lo, hi in zip(edges[:-1],
                                                                            edges[1:], strict=True)]
        ax.set_xticks(centers, labels, rotation=45, ha="right")
        ax.set_title(kind)
        ax.set_xlabel("usage / budget before acting")
    axes[0].set_ylabel("actions per step")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


# -- policy comparison -------------------------------------------------------------------------
def _groups(results: Mapping[str, Mapping[str, Any]], by: str | None,
            labels: Sequence[str] | None) -> list[tuple[str, Any]]:
    """[(group label, group value)] present in the results; one group (None) when by is None."""
    if by is None:
        return [("all", None)]
    values: set = set()
    for name, res in results.items():
        if by not in res:
            raise ValueError(f"results[{name!r}] has no {by!r}; keys: {sorted(res)}")
        values |= set(np.unique(np.asarray(res[by])).tolist())
    names = labels if labels is not None else (DIFFICULTIES if by == "tier" else None)
    out = []
    for v in sorted(values):
        lab = names[int(v)] if names is not None and float(v).is_integer() and 0 <= v < len(
            names) else f"{by}={v:g}"
        out.append((lab, v))
    return out


def _select(res: Mapping[str, Any], metric: str, by: str | None, value: Any) -> np.ndarray:
    if metric not in res:
        raise ValueError(f"unknown metric {metric!r}; allowed: {sorted(res)}")
    x = np.asarray(res[metric], np.float64).ravel()
    return x if by is None else x[np.asarray(res[by]).ravel() == value]


def leaderboard(
    results: Mapping[str, Mapping[str, Any]],
    metrics: Sequence[str] = ("total",),
    *,
    by: str | None = None,
    labels: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Rows {policy, group, n, <metric>: mean, <metric>_ci: 95% half-width}, best `metrics[0]`
    first within each group. `results[policy][metric]` are per-scenario arrays; `by` names a
    per-scenario key to group on (e.g. "tier", labelled easy/medium/hard)."""
    rows = []
    for label, value in _groups(results, by, labels):
        group_rows = []
        for name, res in results.items():
            row: dict[str, Any] = {"policy": name, "group": label}
            for m in metrics:
                x = _select(res, m, by, value)
                row["n"] = int(x.size)
                row[m], row[f"{m}_ci"] = mean_ci(x)
            group_rows.append(row)
        group_rows.sort(key=lambda r: -r[metrics[0]])
        rows += group_rows
    return rows


def leaderboard_markdown(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = ("total",),
                         digits: int = 3) -> str:
    """A markdown table of `leaderboard` rows (mean +/- 95% interval)."""
    head = "| group | policy | n | " + " | ".join(metrics) + " |"
    sep = "|---|---|---:|" + "---:|" * len(metrics)
    lines = [head, sep]
    for r in rows:
        cells = [f"{r[m]:.{digits}f} ± {r[m + '_ci']:.{digits}f}" for m in metrics]
        lines.append(f"| {r['group']} | {r['policy']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_policy_comparison(
    results: Mapping[str, Mapping[str, Any]],
    metric: str = "total",
    *,
    by: str | None = None,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    ax: Any = None,
) -> Figure:
    """Grouped bars: the mean of `metric` per policy within each group (e.g. tier), with 95%
    confidence intervals as error bars."""
    if not results:
        raise ValueError("results must name at least one policy")
    fig, ax = _fig_ax(ax, figsize=(max(6.0, 1.2 * len(results) + 3), 3.8))
    groups = _groups(results, by, labels)
    width = 0.8 / len(results)
    x = np.arange(len(groups))
    for i, (name, res) in enumerate(results.items()):
        stats = [mean_ci(_select(res, metric, by, v)) for _, v in groups]
        means, halves = np.array(stats).T
        ax.bar(x - 0.4 + width * (i + 0.5), means, width, yerr=halves, capsize=3, label=name)
    ax.set_xticks(x, [g for g, _ in groups])
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_ylabel(f"mean {metric} (95% CI)")
    ax.set_xlabel(by or "")
    ax.set_title(title or f"{metric} by policy")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig


def plot_policy_violins(
    results: Mapping[str, Mapping[str, Any]],
    metric: str = "total",
    *,
    by: str | None = None,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """One panel per group (e.g. tier): the per-scenario distribution of `metric` for each
    policy as a violin with its mean marked."""
    if not results:
        raise ValueError("results must name at least one policy")
    groups = _groups(results, by, labels)
    fig = Figure(figsize=(min(16.0, max(6.0, 0.7 * len(results) * len(groups) + 2)), 4.0),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(groups), sharey=True, squeeze=False)[0])
    names = list(results)
    for ax, (label, value) in zip(axes, groups, strict=True):
        data = [_select(results[n], metric, by, value) for n in names]
        pos = [i for i, d in enumerate(data) if d.size > 0]
        if pos:
            ax.violinplot([data[i] for i in pos], positions=pos, showmeans=True,
                          showextrema=False)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_title(label)
    axes[0].set_ylabel(metric)
    if title:
        fig.suptitle(title)
    return fig


def plot_metric_vs(
    results: Mapping[str, Mapping[str, Any]],
    x: str,
    metric: str = "total",
    *,
    bins: Sequence[float] | None = None,
    ax: Any = None,
    title: str | None = None,
) -> Figure:
    """Mean of `metric` (95% CI error bars) against a per-scenario quantity `x` (a key in every
    results dict, e.g. a memory budget or a swept `arrival_scale`), a line per policy. Without
    `bins` each distinct value of `x` is a point; with `bins` (edges) scenarios are grouped into
    bins plotted at their centres (empty bins are skipped)."""
    if not results:
        raise ValueError("results must name at least one policy")
    fig, ax = _fig_ax(ax, figsize=(6.5, 3.8))
    for name, res in results.items():
        if x not in res:
            raise ValueError(f"results[{name!r}] has no {x!r}; keys: {sorted(res)}")
        xs = np.asarray(res[x], np.float64).ravel()
        ys = _select(res, metric, None, None)
        if bins is None:
            pos = np.unique(xs)
            groups = [ys[xs == v] for v in pos]
        else:
            edges = np.asarray(bins, np.float64)
            idx = np.digitize(xs, edges) - 1
            pos = (edges[:-1] + edges[1:]) / 2
            groups = [ys[idx == b] for b in range(len(pos))]
        keep = [i for i, g in enumerate(groups) if g.size]
        stats = np.array([mean_ci(groups[i]) for i in keep]).reshape(-1, 2)
        ax.errorbar(pos[keep], stats[:, 0], yerr=stats[:, 1], marker="o", capsize=3, label=name)
    ax.set_xlabel(x)
    ax.set_ylabel(f"mean {metric} (95% CI)")
    ax.set_title(title or f"{metric} against {x}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig


# -- training ----------------------------------------------------------------------------------
def read_metrics(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a JSON-lines metrics file into column arrays.

    Tolerant by design: blank lines, lines that are not JSON objects (e.g. a truncated last
    line) and non-numeric values are skipped; nested objects are flattened with "/" (e.g.
    `{"eval": {"total": 1}}` -> "eval/total"); a list of numbers (one per seed) becomes a column
    of shape [rows, seeds]. A key missing from a line is NaN there. The step counter is copied
    to "step" from the first of STEP_KEYS present (else the line number)."""
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                records.append(_flatten(obj))
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    cols: dict[str, np.ndarray] = {}
    for k in keys:
        width = max(np.size(r[k]) for r in records if k in r)
        col = np.full((len(records), width), np.nan)
        for i, r in enumerate(records):
            if k in r:
                v = np.asarray(r[k], np.float64).ravel()
                col[i, : v.size] = v
        cols[k] = col[:, 0] if width == 1 else col
    step = next((k for k in STEP_KEYS if k in cols and cols[k].ndim == 1), None)
    cols["step"] = cols[step] if step else np.arange(len(records), dtype=np.float64)
    return cols


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, int | float):
            out[key] = float(v)
        elif isinstance(v, list | tuple) and v and all(
            isinstance(e, int | float) and not isinstance(e, bool) for e in v
        ):
            out[key] = [float(e) for e in v]
    return out


def plot_learning_curves(
    metrics: Mapping[str, Any] | str | os.PathLike,
    keys: Sequence[str] | None = None,
    *,
    reference: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Figure:
    """One panel per metric against the step counter. Multi-seed columns [rows, seeds] draw
    the seed mean with a min-max band. `reference` adds horizontal lines (e.g. a baseline's
    mean total) to the first panel. `metrics` is a `read_metrics` dict or a file path."""
    cols = read_metrics(metrics) if isinstance(metrics, str | os.PathLike) else dict(metrics)
    step = np.asarray(cols.get("step", np.arange(len(next(iter(cols.values()))))), np.float64)
    if keys is None:
        skip = set(STEP_KEYS) | {"time", "wall_time", "seed"}
        keys = [k for k in cols if k not in skip][:6]
    missing = [k for k in keys if k not in cols]
    if missing or not keys:
        raise ValueError(f"unknown metric keys {missing}; allowed: {sorted(cols)}")
    n = len(keys)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, key in zip(axes, keys, strict=False):
        y = np.asarray(cols[key], np.float64)
        ok = ~np.isnan(y) if y.ndim == 1 else ~np.isnan(y).all(axis=1)
        if y.ndim == 1:
            ax.plot(step[ok], y[ok], marker=".", label=key)
        else:
            yy = y[ok]
            ax.plot(step[ok], np.nanmean(yy, 1), label=f"{key} (mean of {y.shape[1]})")
            ax.fill_between(step[ok], np.nanmin(yy, 1), np.nanmax(yy, 1), alpha=0.25)
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in axes[n:]:
        ax.set_visible(False)
    if reference:
        for i, (name, value) in enumerate(reference.items()):
            axes[0].axhline(value, linestyle="--", color=f"C{i + 1}", label=name)
        axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def _fig_ax(ax: Any, figsize: tuple[float, float]) -> tuple[Figure, Any]:
    if ax is not None:
        return ax.get_figure(), ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots()


__all__ = [
    "THRESHOLDS",
    "action_mix",
    "action_timing",
    "effective_actions",
    "episode_at",
    "inferred_preemptions",
    "leaderboard",
    "leaderboard_markdown",
    "mean_ci",
    "memory_by_type",
    "plot_action_mix",
    "plot_action_timing",
    "plot_cache_map",
    "plot_episode",
    "plot_learning_curves",
    "plot_memory",
    "plot_metric_vs",
    "plot_policy_comparison",
    "plot_policy_violins",
    "read_metrics",
    "record",
]
