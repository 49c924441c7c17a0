"""kvjax.cache.observations: the compact JSON summary (moved from test_env.py)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import kvjax
from kvjax.cache import scenarios

ENV, PARAMS = kvjax.make("kv-cache-v0", difficulty="all")
CFG = ENV.config
A, T = CFG.max_actions, CFG.episode_len
KEY = jax.random.PRNGKey(0)
reset = jax.jit(ENV.reset_env)


def test_summarize_has_the_seed_fields_and_is_json():
    _, s = reset(KEY, PARAMS)
    summary = kvjax.summarize(s, PARAMS)
    for field in ("memory_usage", "memory_budget", "episode_remaining", "time_above_0_95",
                  "pending_queue_growth", "cache_overview", "top_memory_entries",
                  "top_eviction_candidates", "pending_summary", "visible_seq_ids"):  # fmt: skip
        assert field in summary
    json.dumps(summary)
    assert summary["memory_usage"] == pytest.approx(float(scenarios.usage(s, PARAMS)), abs=1e-4)
    ids = set(np.asarray(s.slots.seq_id)[np.asarray(s.slots.active)].tolist())
    assert set(summary["visible_seq_ids"]) == ids
    values = [e["eviction_value"] for e in summary["top_eviction_candidates"]]
    assert values == sorted(values, reverse=True)
