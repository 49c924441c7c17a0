"""The synthetic workloads against the Azure 2023 traces (serving.md section 6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.serve import workload
from kvjax.serve.capacity import capacity_rps
from kvjax.serve.env import make

# serving.md section 6: rate, per-second variance/mean, input and output p50/p90/p99.
AZURE = {
    "synthetic-conv": dict(
        rate=5.53, dispersion=1.39, input=(1020, 2734, 4142), output=(129, 424, 601)
    ),
    "synthetic-code": dict(
        rate=2.57, dispersion=13.2, input=(1469, 5186, 7436), output=(13, 55, 249)
    ),
}
N = 200_000


@pytest.fixture(scope="module", params=sorted(AZURE))
def stream(request):
    name = request.param
    _, p = make("h100-llama3-8b", workload=name, arrival_rate=AZURE[name]["rate"])
    return name, p, workload.request_stream(jnp.array([7, 11], jnp.uint32), N, p)


def test_length_percentiles_match_the_trace(stream):
    name, _, s = stream
    for col, key in (("prompt", "input"), ("output_len", "output")):
        got = np.percentile(s[col], [50, 90, 99])
        # percentiles sit on steep parts of the empirical CDF: allow 1.5 percentile points
        lo = np.percentile(s[col], [48.5, 88.5, 97.5])
        hi = np.percentile(s[col], [51.5, 91.5, 99.5])
        for g, want, a, b in zip(got, AZURE[name][key], lo, hi, strict=True):
            assert a <= want <= b, (name, col, g, want)


def test_rate_and_burstiness_match_the_trace(stream):
    name, p, s = stream
    rate = N / float(s["arrival"][-1])
    # Lognormal gaps: the sample mean's relative standard error is sqrt((e^sigma^2 - 1) / N)
    # (0.3% for conversation, 10% for the heavy-tailed code gaps); allow 3 of them.
    sigma = float(p.gap_sigma)
    assert rate == pytest.approx(AZURE[name]["rate"], rel=3 * np.sqrt(np.expm1(sigma**2) / N))
    counts = np.bincount(s["arrival"].astype(int))
    assert counts.var() / counts.mean() == pytest.approx(AZURE[name]["dispersion"], rel=0.2)


def test_stream_is_a_pure_function_of_seed_and_index():
    _, p = make("toy")
    seed = jnp.array([1, 2], jnp.uint32)
    whole = workload.draw_request(seed, jnp.arange(100), p)
    one = jax.jit(workload.draw_request)(seed, jnp.int32(57), p)
    for k in whole:
        assert np.asarray(whole[k])[57] == np.asarray(one[k]), k
    other = workload.draw_request(jnp.array([1, 3], jnp.uint32), jnp.arange(100), p)
    assert not np.array_equal(np.asarray(whole["prompt"]), np.asarray(other["prompt"]))


def test_request_stream_compiles_once_per_length_and_config():
    """Other seeds and parameter values reuse the program (the reference loads every scenario's
    stream through it), and its rows are request_stream's draws."""
    env, p = make("toy")
    a = workload.request_stream(jnp.array([1, 2], jnp.uint32), 64, p, env.config)
    b = workload.request_stream(
        jnp.array([3, 4], jnp.uint32), 64, p.replace(arrival_rate=2 * p.arrival_rate), env.config
    )
    assert workload._stream_drawer(64, env.config)._cache_size() == 1
    direct = workload.draw_request(jnp.array([3, 4], jnp.uint32), jnp.arange(64), p)
    assert np.array_equal(b["prompt"], np.asarray(direct["prompt"]))
    assert not np.array_equal(a["prompt"], b["prompt"])


def test_lengths_are_clipped_and_prefixes_fit():
    _, p = make("toy", max_tokens=256, max_model_len=4096)
    s = workload.request_stream(jnp.array([3, 4], jnp.uint32), 20_000, p)
    assert s["output_len"].max() == 256 and s["output_len"].min() >= 1
    assert s["prompt"].max() <= 4096 - 256
    has = s["segment"] >= 0
    assert 0.3 < has.mean() < 0.5  # prefix_share 0.5 of prompts longer than 512 tokens
    assert np.all(s["prompt"][has] > s["prefix_len"][has])
    assert np.all(s["prefix_len"][has] % 16 == 0)


def test_load_scales_the_arrival_rate_by_capacity():
    _, p1 = make("h100-llama3-8b", load=1.0)
    _, p5 = make("h100-llama3-8b", load=0.5)
    assert float(p1.arrival_rate) == pytest.approx(capacity_rps(p1))
    assert float(p5.arrival_rate) == pytest.approx(0.5 * float(p1.arrival_rate))
    _, f8 = make("h100-llama3-8b", load=1.0, kv_dtype="fp8")
    assert capacity_rps(f8) > capacity_rps(p1)  # twice the pool, half the attention reads


def test_unknown_workload_names_the_allowed_values():
    with pytest.raises(ValueError, match="synthetic-code"):
        workload.workload_index("azure")


# -- agentic sessions ---------------------------------------------------------------------------
def session_calls(p, cfg, seeds, sessions):
    """Every session's calls (prompt, output, unconstrained-cache hit) from the JAX draws, with
    the closed-loop recurrence of docs/serving.md section 7 run in NumPy."""
    idx = jnp.arange(sessions)
    cap = int(p.max_model_len - p.max_tokens)
    plen = int(p.prefix_tokens) // 16 * 16
    rows = []
    for seed in seeds:
        seed = jnp.asarray(seed, jnp.uint32)
        s = jax.tree.map(np.asarray, workload.draw_session(seed, idx, p, cfg))
        calls = [
            jax.tree.map(np.asarray, workload.draw_call(seed, idx, t, p, cfg))
            for t in range(workload.MAX_CALLS)
        ]
        for i in range(sessions):
            prompt, cached = int(s["prompt"][i]), (plen if s["prompt"][i] > plen else 0)
            for t in range(int(s["turns"][i])):
                out = int(calls[t]["output_len"][i])
                rows.append((prompt, out, cached, t))
                cached = (prompt + out - 1) // 16 * 16
                prompt = prompt + out + int(calls[t]["new_tokens"][i])
                if prompt > cap:
                    break
    return np.array(rows)


def test_agentic_sessions_hit_85_to_97_percent_of_prompt_tokens_unconstrained():
    env, p = make("h100-llama3-8b", workload="agentic", load=0.9)
    rows = session_calls(p, env.config, [(1, 2), (3, 4)], 1500)
    share = rows[:, 2].sum() / rows[:, 0].sum()
    assert 0.85 <= share <= 0.97, share
    # make's Monte Carlo (NumPy draws) agrees with the JAX draws on calls per session and share
    m = workload.agentic_moments(p)
    assert float(p.calls_per_arrival) == pytest.approx(len(rows) / 3000, rel=0.05)
    assert 1 - m["prefill"] / m["prompt"] == pytest.approx(share, abs=0.02)
    # subagents live 1-3 calls; tool gaps have the Codex median and p99 (serving.md section 6)
    turns = np.asarray(
        workload.draw_session(jnp.asarray([5, 6], jnp.uint32), jnp.arange(20000), p, env.config)[
            "turns"
        ]
    )
    assert turns.min() == 1 and turns.max() <= workload.MAX_CALLS
    gaps = np.asarray(
        workload.draw_call(jnp.asarray([5, 6], jnp.uint32), jnp.arange(20000), 0, p)["tool_gap"]
    )
    assert np.median(gaps) == pytest.approx(5.2, rel=0.05)
    assert np.percentile(gaps, 99) == pytest.approx(81.4, rel=0.15)


def test_agentic_load_and_score_count_calls():
    env, p = make("h100-llama3-8b", workload="agentic", load=0.9)
    m = workload.agentic_moments(p)
    assert float(p.calls_per_arrival) == pytest.approx(m["calls_per_session"], rel=1e-6)
    assert float(p.arrival_rate) * m["calls_per_session"] == pytest.approx(
        0.9 * capacity_rps(p, m), rel=1e-5
    )
    assert env.config.agentic and env.config.max_segments == 64
    with pytest.raises(ValueError, match="agent_turns"):
        make("toy", workload="agentic", agent_turns=0.5)
