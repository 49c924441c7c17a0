"""kvjax.cache.dynamics: hand-built cases with exact outcomes, one rule at a time (moved from
test_env.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trees import trees_equal

import kvjax
from kvjax.cache import scenarios
from kvjax.cache.types import CPU, GPU

ENV, PARAMS = kvjax.make("kv-cache-v0", difficulty="all")
CFG = ENV.config
S, A, T = CFG.max_seqs, CFG.max_actions, CFG.episode_len
KEY = jax.random.PRNGKey(0)
# Hand-built cases: 1,000 fp16 tokens of KV at budget 1.0 (kv_cache_bytes in bytes).
SMALL = PARAMS.replace(kv_cache_bytes=1000.0 * 131072.0, max_wait_steps=2)
step = jax.jit(ENV.step_env)


def keep() -> jnp.ndarray:
    return jnp.zeros((A,), jnp.int32)


def act(*ops: tuple[str, int]) -> jnp.ndarray:
    ids = [ENV.encode_action(k, s) for k, s in ops] + [0] * (A - len(ops))
    return jnp.asarray(ids, jnp.int32)


def tree_equal(a, b, atol=0.0) -> bool:
    return trees_equal(a, b, atol=atol)


# -- hand-built cases with exact outcomes --------------------------------------------------------


def one_step(state, action, params=SMALL):
    return step(KEY, state, action, params)


def test_evict_frees_memory_and_scores_the_eviction():
    s = scenarios.build(CFG, SMALL, slots={
        0: dict(block_type=0, tokens=100, output_len=0, priority=100),
        1: dict(block_type=4, tokens=300, priority=0, output_len=20),
        2: dict(block_type=1, tokens=200, priority=80, output_len=20),
    })  # fmt: skip
    _, s1, r, *_ = one_step(s, act(("evict", 1), ("evict", 2)))
    c = s1.counters
    assert not bool(s1.slots.active[1]) and not bool(s1.slots.active[2])
    assert int(s1.slots.seq_id[1]) == -1
    assert int(c.evictions) == 2 and int(c.high_value_lost) == 1 and int(c.risky_evictions) == 1
    assert float(c.eviction_value_sum) == pytest.approx(1.0 + 0.2)
    # The system prompt does not decode; nothing else is left, so no tokens.
    assert float(c.raw_tokens) == 0.0
    assert float(scenarios.gpu_tokens(s1.slots)) == 100.0
    rub = kvjax.rubric(s1, SMALL)
    assert float(rub["eviction_quality"]) == pytest.approx(0.6 - 0.25)
    assert float(rub["risky_eviction_penalty"]) == pytest.approx(-0.25)
    assert float(rub["headroom_bonus"]) == pytest.approx(1.0 / T)  # peak 0.1 < 0.8
    assert float(rub["memory_efficiency"]) == pytest.approx(0.2)
    assert float(r) == pytest.approx(float(rub["total"]), abs=1e-6)


def test_compress_halves_memory_twice_then_is_invalid():
    s = scenarios.build(CFG, SMALL, slots={0: dict(block_type=3, tokens=400, output_len=100)})
    _, s1, *_ = one_step(s, act(("compress", 0), ("compress", 0), ("compress", 0)))
    assert int(s1.slots.precision[0]) == 2
    assert int(s1.counters.compressions) == 2 and int(s1.counters.invalid_actions) == 1
    # 403 tokens (3 decoded) at int4 = 100.75 fp16-token equivalents.
    assert int(s1.slots.tokens[0]) == 403
    assert float(scenarios.gpu_tokens(s1.slots)) == pytest.approx(403 * 0.25)
    # Reasoning at int4 keeps half of each token's value.
    assert float(s1.counters.tokens) == pytest.approx(3 * 0.5)
    assert float(s1.counters.raw_tokens) == 3.0


def test_swap_to_cpu_frees_gpu_adds_latency_and_stalls():
    s = scenarios.build(CFG, SMALL.replace(admit_watermark=0.0), slots={
        0: dict(block_type=2, tokens=500, output_len=50),
        1: dict(block_type=2, tokens=100, output_len=50),
    })  # fmt: skip
    _, s1, *_ = one_step(s, act(("swap_to_cpu", 0), ("swap_to_cpu", 0)), SMALL.replace(
        admit_watermark=0.0))  # fmt: skip
    assert int(s1.slots.location[0]) == CPU
    assert int(s1.counters.swaps) == 1 and int(s1.counters.invalid_actions) == 1
    assert float(scenarios.gpu_tokens(s1.slots)) == 103.0  # slot 1 decoded 3 tokens
    transfer = 500 * 131072.0 / 50e9
    # The swapped sequence is ready but on the CPU (watermark 0 blocks swap-in): it stalls.
    assert float(s1.counters.latency) == pytest.approx(transfer + 0.1, rel=1e-5)
    assert int(s1.slots.remaining[0]) == 50  # no progress on the CPU
    # With room again, the engine swaps it back in (transfer again) and it decodes.
    _, s2, *_ = one_step(s1, keep())
    assert int(s2.slots.location[0]) == GPU and int(s2.counters.swap_ins) == 1
    assert float(s2.counters.latency) == pytest.approx(2 * transfer + 0.1, rel=1e-5)
    assert int(s2.slots.remaining[0]) == 47


def test_invalid_actions_are_counted_no_ops():
    s = scenarios.build(CFG, SMALL, slots={0: dict(tokens=100, location=CPU)})
    bad = jnp.asarray([ENV.encode_action("evict", 5), 1 + 3 * S, -3], jnp.int32)
    _, s1, *_ = one_step(s, bad)
    _, s_keep, *_ = one_step(s, keep())
    assert int(s1.counters.invalid_actions) == 3
    assert tree_equal(s1.slots, s_keep.slots)
    _, s2, *_ = one_step(s, act(("swap_to_cpu", 0), ("compress", 0)))  # already on the CPU
    assert int(s2.counters.invalid_actions) == 2


def test_forced_preemption_takes_newest_non_system_first():
    s = scenarios.build(CFG, SMALL, slots={
        0: dict(block_type=0, tokens=300, output_len=0, priority=100, arrival_step=-50),
        1: dict(block_type=2, tokens=300, arrival_step=-10),
        2: dict(block_type=2, tokens=300, arrival_step=-5),
        3: dict(block_type=1, tokens=200, arrival_step=-3),
    })  # fmt: skip
    # 1,100 tokens on a 1,000 budget, +9 decoded: preempt slot 3 (newest) and stop (909 fits).
    _, s1, *_ = one_step(s, keep())
    assert np.asarray(s1.slots.active)[:4].tolist() == [True, True, True, False]
    c = s1.counters
    assert int(c.preemptions) == 1 and int(c.failures) == 1 and int(c.high_value_lost) == 1
    assert float(s1.usage_peak) == pytest.approx(1109 / 1000)
    assert int(s1.time_above_0_95) == 1
    rub = kvjax.rubric(s1, SMALL)
    assert float(rub["memory_efficiency"]) == pytest.approx(-0.2)
    assert float(rub["headroom_bonus"]) == pytest.approx(-0.5 / T)
    assert float(rub["failure_penalty"]) == pytest.approx(-0.15)


def test_admission_is_fifo_into_free_slots_up_to_the_watermark():
    s = scenarios.build(
        CFG, SMALL,
        slots={0: dict(tokens=500, output_len=100), 2: dict(tokens=100, output_len=100)},
        pending=[dict(tokens=200, seq_id=11), dict(tokens=300, seq_id=12),
                 dict(tokens=50, seq_id=13)],
    )  # fmt: skip
    # Room = 0.9 * 1000 - 600 = 300: the first (200) fits, the second (300) does not and blocks
    # the third (FIFO, no skipping).
    _, s1, *_ = one_step(s, keep())
    assert int(s1.slots.seq_id[1]) == 11 and int(s1.slots.tokens[1]) == 203
    assert int(s1.slots.remaining[1]) == 7 and int(s1.slots.last_access[1]) == 0
    assert np.asarray(s1.pending.seq_id)[:2].tolist() == [12, 13]
    assert int(s1.pending_queue_growth) == -1


def test_queue_timeouts_and_overflow_are_failures():
    full = [dict(tokens=900, arrival_step=-1)] * CFG.max_pending
    s = scenarios.build(
        CFG, SMALL, slots={0: dict(tokens=850, output_len=100)}, pending=full,
        arrivals={0: [dict(tokens=10)] * 3},
    )  # fmt: skip
    _, s1, *_ = one_step(s, keep())
    # Nothing fits; waits are 1 (< 2): no timeouts yet, but the 3 arrivals overflow.
    assert int(s1.counters.queue_overflows) == 3 and int(s1.counters.queue_timeouts) == 0
    _, s2, *_ = one_step(s1, keep())
    assert int(s2.counters.queue_timeouts) == CFG.max_pending
    assert int(s2.counters.failures) == 3 + CFG.max_pending
    assert int(jnp.sum(s2.pending.valid)) == 0


def test_tool_calls_pause_then_append_their_result():
    s = scenarios.build(CFG, SMALL, slots={
        0: dict(block_type=1, tokens=100, output_len=30, tool_period=1, tool_wait_len=2,
                tool_tokens=40, tool_countdown=1),
    })  # fmt: skip
    _, s1, *_ = one_step(s, keep())  # decodes 3, then calls the tool
    assert int(s1.slots.tool_wait[0]) == 2 and int(s1.slots.tokens[0]) == 103
    _, s2, *_ = one_step(s1, keep())  # paused: no progress
    assert int(s2.slots.tool_wait[0]) == 1 and int(s2.slots.remaining[0]) == 27
    _, s3, *_ = one_step(s2, keep())  # the tool returns: +40 tokens, not yet decoding
    assert int(s3.slots.tool_wait[0]) == 0 and int(s3.slots.tokens[0]) == 143
    _, s4, *_ = one_step(s3, keep())
    assert int(s4.slots.remaining[0]) == 24 and int(s4.slots.tool_wait[0]) == 2


def test_completion_frees_the_slot():
    s = scenarios.build(CFG, SMALL, slots={0: dict(tokens=100, output_len=5, remaining=2)})
    _, s1, *_ = one_step(s, keep())
    assert not bool(s1.slots.active[0]) and int(s1.counters.completed) == 1
    assert float(s1.counters.raw_tokens) == 2.0
