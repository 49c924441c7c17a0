"""kvjax.cache.viz: every helper draws to a file and its figure content is checked (axes, lines,
labels, marker positions), plus the numeric helpers on hand-built cases."""

from __future__ import annotations

import ast
import inspect
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.image import AxesImage
from trees import assert_trees_equal

import kvjax
from kvjax.cache import viz

# A small config keeps the jit compiles short; all 8 slots are occupied at reset.
SMALL = dict(max_seqs=8, max_pending=4, max_arrivals=2, episode_len=6)
KEY = jax.random.PRNGKey(2)


@pytest.fixture(scope="module")
def episode():
    """One hard-tier episode (rollout's scenario 0 of KEY) played through `viz.record` by a
    scripted policy that picks its targets from the state it sees (so the script stays valid
    whatever the scenario): (env, params, states [T + 1], initial state first, actions [T, A]).

    step 0: evict X, evict X again (a no-op: X is gone)   X = longest fp16 GPU sequence
    step 1: compress Y three times (fp16 -> int8 -> int4, then a no-op)
    step 2: swap Z to CPU twice (the 2nd a no-op)          Z = preferably paused in a tool call
    step 3: evict the system prompt (slot 0); step 4: keep; step 5: compress the longest."""
    env, params = kvjax.make("kv-cache-v0", difficulty="hard", **SMALL)
    ev, cp, sw = (env.encode_action(k, 0) for k in ("evict", "compress", "swap_to_cpu"))
    rows = jnp.array([[ev, ev, 0], [cp, cp, cp], [sw, sw, 0], [ev, 0, 0], [0, 0, 0], [cp, 0, 0]])

    def scripted(key, state, params):
        s = state.slots
        movable = s.active & (s.block_type != 0) & (s.location == 0)
        longest = jnp.argmax(jnp.where(movable & (s.precision == 0), s.remaining, -1))
        paused = jnp.argmax(jnp.where(movable, s.tool_wait * 10_000 + s.remaining, -1))
        target = jnp.stack([longest, longest, paused, 0, 0, longest])[state.time]
        row = rows[state.time]
        return jnp.where(row > 0, row + target, 0).astype(jnp.int32)

    states, actions = viz.record(scripted, KEY, 1, params, env)
    return env, params, viz.episode_at(states, 0), actions[0]


def _targets(actions):
    """Slot each step's first action names."""
    return (actions[:, 0] - 1) % SMALL["max_seqs"]


def _hlines(ax):
    """y of every horizontal line (axhline) on ax."""
    out = []
    for line in ax.get_lines():
        y = np.asarray(line.get_ydata(), float)
        if y.size == 2 and y[0] == y[1] and tuple(line.get_xdata()) == (0, 1):
            out.append(float(y[0]))
    return out


def _saved(fig, tmp_path, name):
    path = tmp_path / name
    fig.savefig(path)
    assert path.stat().st_size > 1000
    return path


def test_viz_is_headless():
    """No pyplot (global figure state, GUI backends) and no show() in the library."""
    tree = ast.parse(inspect.getsource(viz))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
                for a in n.names} | {n.module for n in ast.walk(tree)
                                     if isinstance(n, ast.ImportFrom)}
    assert not any("pyplot" in (m or "") for m in imported)
    calls = {n.func.attr for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert "show" not in calls


def test_memory_by_type_sums_to_env_usage(episode):
    env, params, traj, *_ = episode
    per_type = viz.memory_by_type(traj, params)
    assert per_type.shape == (traj.time.shape[0], len(kvjax.BLOCK_TYPES))
    for t in range(per_type.shape[0]):
        state = jax.tree_util.tree_map(lambda x, t=t: x[t], traj)
        usage = kvjax.summarize(state, params)["memory_usage"]  # rounded to 4 digits
        assert per_type[t].sum() == pytest.approx(usage, abs=6e-5)
    # The system prompt (slot 0) is the only system block and is evicted at step 3.
    assert per_type[3, 0] > 0 and per_type[4, 0] == 0


def test_plot_memory(episode, tmp_path):
    _, params, traj, *_ = episode
    fig = viz.plot_memory(traj, params, title="one episode")
    _saved(fig, tmp_path, "memory.png")
    (ax,) = fig.axes
    assert ax.get_title() == "one episode"
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "GPU KV / budget"
    assert sorted(_hlines(ax)) == [0.8, 0.95, 1.0]
    stacks = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert [c.get_label() for c in stacks] == list(kvjax.BLOCK_TYPES)
    (peak,) = [ln for ln in ax.get_lines() if ln.get_label() == "peak (pre-preempt)"]
    np.testing.assert_array_equal(peak.get_xdata(), np.arange(7))
    np.testing.assert_allclose(peak.get_ydata(), traj.usage_peak)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"budget (1.0)", "0.8", "0.95", "system", "ephemeral"} <= set(legend)


def test_effective_actions_replay_in_order(episode):
    env, _, traj, actions, *_ = episode
    ev = viz.effective_actions(jax.tree_util.tree_map(lambda x: x[:-1], traj), actions)
    E, C, W = 1, 2, 3
    np.testing.assert_array_equal(
        ev["kind"], [[E, 0, 0], [C, C, 0], [W, 0, 0], [E, 0, 0], [0, 0, 0], [C, 0, 0]]
    )
    np.testing.assert_array_equal(ev["slot"][:, 0], _targets(actions) * (ev["kind"][:, 0] > 0))
    assert _targets(actions)[3] == 0
    assert ev["block_type"][3, 0] == 0  # the system prompt
    # Same counts as the env's own counters, step by step.
    c = traj.counters
    for k, field in ((E, "evictions"), (C, "compressions"), (W, "swaps")):
        np.testing.assert_array_equal((ev["kind"] == k).sum(1), np.diff(getattr(c, field)))
    invalid = ((actions != 0) & (ev["kind"] == 0)).sum(1)
    np.testing.assert_array_equal(invalid, np.diff(c.invalid_actions))
    with pytest.raises(ValueError, match="actions must have shape"):
        viz.effective_actions(traj, actions)  # 7 states, 6 action rows


def test_action_mix_counts(episode):
    _, _, traj, actions, *_ = episode
    states = jax.tree_util.tree_map(lambda x: x[:-1], traj)
    mix = viz.action_mix(states, actions)
    assert mix.shape == (3, 5) and mix.sum() == 6
    bt = traj.slots.block_type
    x = _targets(actions)[0]
    assert mix[0, bt[0, x]] >= 1 and mix[0, 0] == 1  # evicted slot x's type and the system
    assert mix[1].sum() == 3 and mix[2].sum() == 1
    # Batched leading axes give the sum of the parts.
    both = jax.tree_util.tree_map(lambda x: np.stack([x, x]), states)
    np.testing.assert_array_equal(viz.action_mix(both, np.stack([actions, actions])), 2 * mix)


def test_plot_cache_map_marks_actions(episode, tmp_path):
    _, params, traj, actions, *_ = episode
    fig = viz.plot_cache_map(traj, params, actions)
    _saved(fig, tmp_path, "map.png")
    (ax,) = fig.axes
    (img,) = [im for im in ax.get_children() if isinstance(im, AxesImage)]
    rgb = np.asarray(img.get_array())
    assert rgb.shape == (SMALL["max_seqs"], 7, 3)  # slots x time
    x, y, z, _, _, w = _targets(actions)
    sl = traj.slots
    assert not np.allclose(rgb[x, 0], 1.0)
    if not sl.active[1, x]:  # x was evicted at step 0 (unless a new arrival took the slot)
        np.testing.assert_allclose(rgb[x, 1], 1.0)
    assert sl.seq_id[1, x] != sl.seq_id[0, x]
    # int4 slot 2 is paler than the fp16 slot 2 it was.
    if sl.seq_id[2, y] == sl.seq_id[1, y]:
        assert sl.precision[2, y] == 2 and rgb[y, 2].mean() > rgb[y, 1].mean()
    marks = {c.get_label(): c.get_offsets() for c in ax.collections
             if isinstance(c, PathCollection)}
    np.testing.assert_array_equal(marks["evict"], [[0.5, x], [3.5, 0]])
    np.testing.assert_array_equal(marks["compress"], [[1.5, y], [1.5, y], [5.5, w]])
    np.testing.assert_array_equal(marks["swap_to_cpu"], [[2.5, z]])
    on_cpu = {(int(x), int(y)) for x, y in marks["on CPU"]}
    cpu = traj.slots.active & (traj.slots.location == 1)
    assert on_cpu == {(int(t), int(s)) for t, s in zip(*np.nonzero(cpu), strict=True)}
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "slot"


def test_inferred_preemptions_agree_with_counters(episode):
    _, params, traj, actions, *_ = episode
    pre = viz.inferred_preemptions(traj, params, actions)
    per_step = pre.sum(1)
    assert np.all(per_step <= np.diff(traj.counters.preemptions))
    assert not pre[0, _targets(actions)[0]] and not pre[3, 0]  # agent evictions are not


def test_plot_episode(episode, tmp_path):
    _, params, traj, actions, *_ = episode
    fig = viz.plot_episode(traj, params, actions, title="episode")
    _saved(fig, tmp_path, "episode.png")
    top, bottom = fig.axes
    assert top.get_shared_x_axes().joined(top, bottom)
    assert sorted(_hlines(top)) == [0.8, 0.95, 1.0]
    assert any(isinstance(c, AxesImage) for c in bottom.get_children())
    assert fig.get_suptitle() == "episode"


def test_plot_action_mix(tmp_path):
    a = np.zeros((3, 5), int)
    a[0, 3], a[1, 1], a[2, 1] = 3, 1, 4  # 3 reasoning evictions, context compress / swaps
    b = np.zeros((3, 5), int)
    b[0, 4] = 2
    fig = viz.plot_action_mix({"heuristic": a, "ppo": b})
    _saved(fig, tmp_path, "mix.png")
    ax_a, ax_b = fig.axes
    assert ax_a.get_title() == "heuristic (8 actions)" and ax_b.get_title() == "ppo (2 actions)"
    assert [t.get_text() for t in ax_a.get_xticklabels()] == list(kvjax.BLOCK_TYPES)
    heights = np.array([p.get_height() for p in ax_a.patches]).reshape(3, 5)
    np.testing.assert_allclose(heights, a / 8)
    assert ax_a.get_ylabel() == "fraction of actions"
    raw = viz.plot_action_mix({"heuristic": a}, normalize=False)
    np.testing.assert_allclose([p.get_height() for p in raw.axes[0].patches], a.ravel())
    with pytest.raises(ValueError, match="shape"):
        viz.plot_action_mix({"x": np.zeros((2, 5))})


def test_action_timing_and_plot(episode, tmp_path):
    _, params, traj, actions, *_ = episode
    states = jax.tree_util.tree_map(lambda x: x[:-1], traj)
    edges = (0.0, 0.5, 1.0, 10.0)
    tm = viz.action_timing(states, actions, params, bins=edges)
    use = viz.memory_by_type(states, params).sum(1)
    idx = np.digitize(use, edges) - 1
    np.testing.assert_array_equal(tm["steps"], np.bincount(idx, minlength=3))
    kinds = viz.effective_actions(states, actions)["kind"]
    for b in range(3):
        sel = idx == b
        if sel.any():
            np.testing.assert_allclose(tm["per_step"][:, b],
                                       [(kinds[sel] == k).sum() / sel.sum() for k in (1, 2, 3)])
        else:
            assert np.isnan(tm["per_step"][:, b]).all()
    fig = viz.plot_action_timing({"a": tm, "b": tm})
    _saved(fig, tmp_path, "timing.png")
    assert [ax.get_title() for ax in fig.axes] == ["evict", "compress", "swap_to_cpu"]
    assert all(len(ax.get_lines()) == 2 for ax in fig.axes)
    np.testing.assert_allclose(fig.axes[1].get_lines()[0].get_ydata(), tm["per_step"][1])


@pytest.fixture
def results():
    """Two policies, 6 scenarios: tiers 0, 0, 0, 2, 2, 2."""
    tier = np.array([0, 0, 0, 2, 2, 2])
    return {
        "keep": {"total": np.array([0.1, 0.2, 0.3, -0.5, -0.4, -0.3]), "tier": tier},
        "value_aware": {"total": np.array([0.4, 0.5, 0.6, 0.0, 0.1, 0.2]), "tier": tier},
    }


def test_mean_ci_and_leaderboard(results):
    m, h = viz.mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(1.96 / math.sqrt(3))
    assert viz.mean_ci([5.0]) == (5.0, 0.0)
    rows = viz.leaderboard(results, ("total",), by="tier")
    assert [(r["group"], r["policy"]) for r in rows] == [
        ("easy", "value_aware"), ("easy", "keep"), ("hard", "value_aware"), ("hard", "keep")]
    assert rows[0]["total"] == pytest.approx(0.5) and rows[0]["n"] == 3
    assert rows[0]["total_ci"] == pytest.approx(1.96 * 0.1 / math.sqrt(3))
    md = viz.leaderboard_markdown(rows)
    assert md.splitlines()[2] == "| easy | value_aware | 3 | 0.500 ± 0.113 |"
    with pytest.raises(ValueError, match="unknown metric"):
        viz.leaderboard(results, ("nope",))
    with pytest.raises(ValueError, match="confidence"):
        viz.mean_ci([1.0], confidence=0.5)


def test_plot_policy_comparison(results, tmp_path):
    fig = viz.plot_policy_comparison(results, "total", by="tier")
    _saved(fig, tmp_path, "bars.png")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["easy", "hard"]
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, [0.2, -0.4, 0.5, 0.1])  # keep (easy, hard), then va
    assert ax.get_ylabel() == "mean total (95% CI)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["keep", "value_aware"]
    assert len(ax.containers) == 4  # 2 bar containers + 2 error-bar containers
    flat = viz.plot_policy_comparison(results, "total")
    assert [t.get_text() for t in flat.axes[0].get_xticklabels()] == ["all"]


def test_plot_policy_violins(results, tmp_path):
    fig = viz.plot_policy_violins(results, "total", by="tier", title="spread")
    _saved(fig, tmp_path, "violins.png")
    assert [ax.get_title() for ax in fig.axes] == ["easy", "hard"]
    for ax in fig.axes:
        bodies = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bodies) == 2  # one violin per policy
        assert [t.get_text() for t in ax.get_xticklabels()] == ["keep", "value_aware"]
    assert fig.get_suptitle() == "spread"


def test_plot_metric_vs(results, tmp_path):
    scale = np.array([0.5, 0.5, 1.0, 1.0, 2.0, 2.0])
    res = {k: {**v, "arrival_scale": scale} for k, v in results.items()}
    fig = viz.plot_metric_vs(res, "arrival_scale", "total")
    _saved(fig, tmp_path, "sweep.png")
    (ax,) = fig.axes
    keep_line, va_line = (c.lines[0] for c in ax.containers)  # errorbar data lines
    np.testing.assert_array_equal(keep_line.get_xdata(), [0.5, 1.0, 2.0])
    np.testing.assert_allclose(keep_line.get_ydata(), [0.15, -0.1, -0.35])
    np.testing.assert_allclose(va_line.get_ydata(), [0.45, 0.3, 0.15])
    assert ax.get_xlabel() == "arrival_scale" and ax.get_ylabel() == "mean total (95% CI)"
    binned = viz.plot_metric_vs(res, "arrival_scale", bins=(0.0, 0.75, 1.5, 3.0, 4.0))
    line = binned.axes[0].containers[0].lines[0]
    np.testing.assert_allclose(line.get_xdata(), [0.375, 1.125, 2.25])  # empty 4th bin skipped
    np.testing.assert_allclose(line.get_ydata(), [0.15, -0.1, -0.35])
    with pytest.raises(ValueError, match="has no 'budget'"):
        viz.plot_metric_vs(res, "budget")


def _write_metrics(path):
    lines = [
        json.dumps({"step": 0, "total": 0.1, "entropy": 2.0, "eval": {"total": 0.0},
                    "per_seed": [0.1, 0.3], "note": "start"}),
        "",
        "not json",
        json.dumps({"step": 100, "total": 0.3, "per_seed": [0.2, 0.6]}),
        json.dumps([1, 2]),
        json.dumps({"step": 200, "total": 0.5, "entropy": 1.0, "per_seed": [0.4, 0.8]}),
        '{"step": 300, "total": 0.',  # truncated last line (a run still writing)
    ]
    path.write_text("\n".join(lines))
    return path


def test_read_metrics_is_tolerant(tmp_path):
    cols = viz.read_metrics(_write_metrics(tmp_path / "metrics.jsonl"))
    np.testing.assert_array_equal(cols["step"], [0, 100, 200])
    np.testing.assert_array_equal(cols["total"], [0.1, 0.3, 0.5])
    np.testing.assert_array_equal(cols["entropy"], [2.0, np.nan, 1.0])
    np.testing.assert_array_equal(cols["eval/total"], [0.0, np.nan, np.nan])
    assert cols["per_seed"].shape == (3, 2)
    assert "note" not in cols


def test_read_metrics_without_step_key(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"update": 5, "loss": 1}\n{"update": 9, "loss": 2}\n')
    np.testing.assert_array_equal(viz.read_metrics(p)["step"], [5, 9])
    p.write_text('{"loss": 1}\n{"loss": 2}\n')
    np.testing.assert_array_equal(viz.read_metrics(p)["step"], [0, 1])


def test_plot_learning_curves(tmp_path):
    path = _write_metrics(tmp_path / "metrics.jsonl")
    fig = viz.plot_learning_curves(path, ["total", "per_seed", "entropy"],
                                   reference={"value_aware": 0.42})
    _saved(fig, tmp_path, "curves.png")
    ax_total, ax_seed, ax_ent = fig.axes
    assert [a.get_title() for a in fig.axes] == ["total", "per_seed", "entropy"]
    np.testing.assert_allclose(ax_total.get_lines()[0].get_ydata(), [0.1, 0.3, 0.5])
    assert _hlines(ax_total) == [0.42]
    mean_line = ax_seed.get_lines()[0]
    np.testing.assert_allclose(mean_line.get_ydata(), [0.2, 0.4, 0.6])
    assert mean_line.get_label() == "per_seed (mean of 2)"
    assert any(isinstance(c, PolyCollection) for c in ax_seed.collections)  # min-max band
    np.testing.assert_array_equal(ax_ent.get_lines()[0].get_xdata(), [0, 200])  # NaN skipped
    with pytest.raises(ValueError, match="unknown metric keys"):
        viz.plot_learning_curves(path, ["nope"])


def test_bad_trajectory_shape(episode):
    _, params, traj, *_ = episode
    batched = jax.tree_util.tree_map(lambda x: np.stack([x, x]), traj)
    with pytest.raises(ValueError, match="leading time axis"):
        viz.plot_memory(batched, params)


def test_record_replays_the_env(episode, tmp_path):
    """`record` plays rollout's scenarios (same keys) and its states follow step_env."""
    from kvjax.cache.policies import make_policy
    from kvjax.rollout import scenario_keys

    env, params, *_ = episode
    key = jax.random.PRNGKey(7)
    reset, step = jax.jit(env.reset_env), jax.jit(env.step_env)  # eager reset is far slower
    states, actions = viz.record(make_policy("keep", env), key, 2, params, env)
    T = SMALL["episode_len"]
    assert actions.shape == (2, T, env.config.max_actions) and not actions.any()
    np.testing.assert_array_equal(states.time, np.broadcast_to(np.arange(T + 1), (2, T + 1)))
    for i in range(2):
        traj = viz.episode_at(states, i)
        _, first = reset(scenario_keys(key, i)[0], params)
        chex_equal(jax.tree_util.tree_map(lambda x: x[0], traj), first)
        for t in range(T):
            at = lambda x, t=t: x[t]  # noqa: E731
            _, nxt, *_ = step(jax.random.PRNGKey(0), jax.tree_util.tree_map(at, traj),
                              jnp.asarray(actions[i, t]), params)
            chex_equal(jax.tree_util.tree_map(lambda x, t=t: x[t + 1], traj), nxt)
    fig = viz.plot_episode(viz.episode_at(states, 0), params, actions[0])
    _saved(fig, tmp_path, "recorded.png")
    with pytest.raises(ValueError, match="num_scenarios"):
        viz.record(make_policy("keep", env), key, 0, params, env)


def chex_equal(a, b):
    """Trees equal: ints exactly, floats to float32 rounding (XLA fuses differently in a scan)."""
    assert_trees_equal(a, b, rtol=1e-6, atol=1e-6)
