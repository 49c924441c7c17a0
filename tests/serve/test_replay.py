"""Trace replay (kvjax/serve/replay.py): segment keys from a hand-built prefix forest, windows that
give back the trace's arrivals, lengths and prefixes, the engine's hits on a replayed
conversation, state size independent of the trace, load scaling and bad workload names."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.serve import replay, traces, workload
from kvjax.serve.capacity import capacity_rps
from kvjax.serve.engine import run
from kvjax.serve.types import RUNNING


def mooncake_file(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# Blocks of 512 tokens. Segments (first appearance): A=[1] B=[2] C=[3] D=[4,5] E=[6,7] F=[8].
CONVERSATION = [
    dict(timestamp=0, input_length=1100, output_length=40, hash_ids=[1, 2, 3]),
    dict(timestamp=1000, input_length=2000, output_length=40, hash_ids=[1, 2, 4, 5]),
    dict(timestamp=2000, input_length=2600, output_length=40, hash_ids=[1, 2, 4, 5, 6, 7]),
    dict(timestamp=3000, input_length=600, output_length=40, hash_ids=[1, 8]),
    dict(timestamp=10000, input_length=100, output_length=5, hash_ids=[]),
]


@pytest.fixture
def conversation(tmp_path):
    return mooncake_file(tmp_path / "conv.jsonl", CONVERSATION)


def test_segment_keys_of_a_hand_built_forest(conversation):
    tr = traces.load_trace(conversation)
    A, B, D = (int(tr.prefix_node[i]) for i in (3, 1, 2))
    assert [int(x) for x in tr.node_parent[[A, B, D]]] == [-1, A, B]
    keys = replay.segment_keys(tr)
    # request 1 reads B (falls back to A), 2 reads D (falls back to B), 3 reads A; request 0
    # publishes B (its deepest segment that someone reads and that fits in its 1,100 tokens).
    assert keys["segment"].tolist() == [-1, B, D, A, -1]
    assert keys["segment_up"].tolist() == [-1, A, B, -1, -1]
    assert keys["prefix_len"].tolist() == [0, 1024, 2048, 512, 0]
    assert keys["publish"].tolist() == [B, -1, -1, -1, -1]
    assert keys["publish_len"].tolist() == [1024, 0, 0, 0, 0]


def test_a_trace_without_prefixes_has_no_keys():
    rt = replay.replay_trace(traces.load_trace("azure-code"))
    assert not rt.has_prefixes
    for k in ("segment", "segment_up", "publish"):
        assert (rt.columns[k] == -1).all()


def start_zero_key(env, params):
    """A reset key whose window starts at the trace's first request."""
    for i in range(200):
        key = jax.random.PRNGKey(i)
        _, s = env.reset(key, params)
        if int(s.stream_start) == 0:
            return key, s
    raise AssertionError("no key with window start 0")


def test_engine_hits_on_a_replayed_conversation(conversation):
    env, p = kvjax.make(
        "kv-serve-v0", preset="toy", workload=str(conversation), arrival_rate=0.5, horizon=8.0
    )
    assert env.config.max_segments == 64 and int(p.num_prefixes) == 0
    tr = env.config.trace
    _, s = start_zero_key(env, p)
    step = jax.jit(lambda s: run(s, p, env.config))
    for _ in range(40):
        s = step(s)
    m, seg = s.metrics, s.segments
    assert int(m.arrived) == 4 and int(m.finished) == 4
    # B (published by request 0) serves 1,024 tokens to request 1 and, as the fallback of D,
    # to request 2; A was never cached before request 3.
    assert int(m.hit_tokens) == 2048
    assert int(m.prompt_tokens) == 1100 + 2000 + 2600 + 600
    B, D, A = (int(tr.columns["segment"][i]) for i in (1, 2, 3))
    rows = {int(k): g for g, k in enumerate(np.asarray(seg.key)) if bool(seg.valid[g])}
    assert set(rows) == {A, B, D}
    assert all(bool(seg.on_gpu[rows[k]]) for k in (A, B, D))
    assert int(seg.parent[rows[D]]) == rows[B] and int(seg.parent[rows[B]]) == -1
    assert [int(seg.tokens[rows[k]]) for k in (A, B, D)] == [512, 1024, 2048]


@pytest.mark.parametrize("name", ["azure-conv", "mooncake-conv"])
def test_a_window_gives_back_the_trace(name):
    env, p = kvjax.make("kv-serve-v0", preset="h100-llama3-8b", workload=name, load=0.9)
    rt, tr = env.config.trace, traces.load_trace(name)
    scale = rt.native_rate / float(p.arrival_rate)
    keys = replay.segment_keys(tr)
    starts = set()
    for seed in range(6):
        seed = jnp.asarray([seed, 7], jnp.uint32)
        s = int(workload.stream_start(seed, p, env.config))
        starts.add(s)
        n = 64
        st = workload.request_stream(seed, n, p, env.config)
        origin = tr.arrival[s - 1] if s > 0 else tr.arrival[0]
        np.testing.assert_allclose(
            st["arrival"], (tr.arrival[s : s + n] - origin) * scale, rtol=1e-4, atol=1e-3
        )
        cap = int(p.max_model_len - p.max_tokens)
        np.testing.assert_array_equal(st["prompt"], np.clip(tr.input_len[s : s + n], 1, cap))
        np.testing.assert_array_equal(
            st["output_len"], np.clip(tr.output_len[s : s + n], 1, int(p.max_tokens))
        )
        reads = keys["prefix_len"][s : s + n] < st["prompt"]
        np.testing.assert_array_equal(
            st["segment"], np.where(reads, keys["segment"][s : s + n], -1)
        )
        np.testing.assert_array_equal(st["segment_up"], keys["segment_up"][s : s + n])
        # the window covers the horizon
        last = tr.arrival[-1] - origin
        assert last * scale >= float(p.horizon)
    assert len(starts) > 1


def test_the_engine_admits_the_windows_requests():
    env, p = kvjax.make("kv-serve-v0", preset="toy", workload="azure-code", load=0.7, horizon=20.0)
    state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(jax.random.PRNGKey(3), 4), p)
    state = state[1]
    step = jax.jit(jax.vmap(lambda s: run(s, p, env.config)))
    for _ in range(30):
        state = step(state)
    for b in range(4):
        st = workload.request_stream(state.seed[b], 3000, p, env.config)
        req = jax.tree.map(lambda x, b=b: np.asarray(x[b]), state.requests)
        occ = req.status > 0
        assert occ.any() and (req.status == RUNNING).any()
        idx = req.index[occ]
        np.testing.assert_array_equal(req.arrival[occ], st["arrival"][idx])
        np.testing.assert_array_equal(req.prompt[occ], st["prompt"][idx])
        assert int(state.metrics.arrived[b]) == int(state.next_index[b])


def test_state_size_does_not_depend_on_the_trace_length(tmp_path):
    def csv(n):
        rows = "".join(
            f"2023-11-16 18:{i // 60 % 60:02d}:{i % 60:02d}.0,{100 + i % 50},20\n" for i in range(n)
        )
        f = tmp_path / f"az{n}.csv"
        f.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + rows)
        return f

    sizes = []
    for n in (120, 3000):
        env, p = kvjax.make(
            "kv-serve-v0", preset="toy", workload=str(csv(n)), arrival_rate=1.0, horizon=100.0
        )
        assert len(env.config.trace) == n
        _, s = env.reset(jax.random.PRNGKey(0), p)
        sizes.append([(x.shape, x.dtype) for x in jax.tree.leaves(s)])
    assert sizes[0] == sizes[1]


def test_load_scales_time_to_the_presets_capacity():
    for load in (0.6, 1.1):
        env, p = kvjax.make(
            "kv-serve-v0", preset="h100-llama3-8b", workload="mooncake-conv", load=load
        )
        m = replay.length_moments(env.config.trace, int(p.max_tokens), int(p.max_model_len))
        assert float(p.arrival_rate) == pytest.approx(load * capacity_rps(p, m), rel=1e-6)
    # Over many windows the replayed rate is the requested one.
    env, p = kvjax.make("kv-serve-v0", preset="h100-llama3-8b", workload="azure-conv", load=0.9)
    counts = []
    for seed in range(16):
        st = workload.request_stream(jnp.asarray([seed, 1], jnp.uint32), 2000, p, env.config)
        counts.append(np.sum(st["arrival"] <= float(p.horizon)))
    rate = np.mean(counts) / float(p.horizon)
    assert rate == pytest.approx(float(p.arrival_rate), rel=0.2)


def test_bad_workloads_name_the_allowed_values(tmp_path):
    with pytest.raises(ValueError, match="mooncake-conv"):
        kvjax.make("kv-serve-v0", workload="nope")
    with pytest.raises(ValueError, match="horizon must be <="):
        kvjax.make("kv-serve-v0", workload="mooncake-synthetic", load=0.9, horizon=1e6)
    with pytest.raises(ValueError, match="a trace file"):
        kvjax.make("kv-serve-v0", workload=str(tmp_path / "missing.jsonl"))
