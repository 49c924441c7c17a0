"""Bad input is refused where it enters, with a ValueError naming the field and allowed range
(issue 15, audit cases 1, 2, 4, 8, 9 and the parameter classes)."""

from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cache.llm.session import Session
from kvjax.cache.types import PARAM_SPECS, EnvConfig, EnvParams
from kvjax.rollout import rollout
from kvjax.validation import batch_layout

ENV, PARAMS = kvjax.make("kv-cache-v0", difficulty="hard")

BAD_PARAMS = [
    ("swap_bandwidth", 0, ">= 1"),  # audit 2: NaN reward on a keep() step
    ("swap_bandwidth", -1.0, ">= 1"),  # audit 2: mean total 8.1e7
    ("swap_bandwidth", 1e-30, ">= 1"),  # an infinite latency metric (adversarial pass)
    ("difficulty", 7, "3 (all)"),  # audit 2: easy budgets labelled tier 7
    ("difficulty", True, "0 (easy)"),
    ("difficulty", "hard", "0 (easy)"),
    ("arrival_scale", math.nan, ">= 0"),  # audit 2: behaved as 0
    ("arrival_scale", -0.5, ">= 0"),
    ("kv_cache_bytes", math.inf, "finite"),
    ("kv_cache_bytes", 1e300, "finite"),  # inf in float32
    ("kv_bytes_per_token", 0.0, ">= 1"),
    ("kv_bytes_per_token", 3e38, "<= 1.07374e+09"),  # capacity underflows: usage inf
    ("step_seconds", -0.1, "> 0"),
    ("step_seconds", 3e38, "<= 86400"),  # stall latency inf
    ("decode_tokens_per_step", 2.5, "integer"),
    ("decode_tokens_per_step", 0, ">= 1"),
    ("max_wait_steps", 2**40, "integer"),  # would wrap in int32
    ("admit_watermark", 1.5, "<= 1"),
    ("w_failure", -0.4, ">= 0"),
    ("w_failure", 3e38, "<= 1e+06"),  # the weighted total overflows
    ("throughput_target_tokens", 0.0, "> 0"),
    ("latency_cap", math.nan, ">= 0"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), BAD_PARAMS)
def test_env_params_reject_bad_values_on_construction_and_replace(field, value, allowed):
    for build in (lambda: EnvParams(**{field: value}), lambda: PARAMS.replace(**{field: value})):
        with pytest.raises(ValueError) as e:
            build()
        assert f"EnvParams.{field}" in str(e.value) and allowed in str(e.value)


def test_every_param_field_has_a_spec_and_the_defaults_pass():
    assert set(PARAM_SPECS) == {f for f in EnvParams.__dataclass_fields__}
    EnvParams()
    PARAMS.replace(difficulty=np.array([0, 1, 2, 3]))  # per-scenario arrays are checked too
    with pytest.raises(ValueError, match=r"difficulty.*index \(2,\)"):
        PARAMS.replace(difficulty=np.array([0, 1, 5, 3]))


def test_traced_params_and_pytree_plumbing_are_not_checked():
    # jit / vmap / tree_map rebuild EnvParams from tracers or placeholders: no check, no error.
    f = jax.jit(lambda p: p.replace(swap_bandwidth=p.swap_bandwidth * 0.5))
    assert float(f(PARAMS).swap_bandwidth) == pytest.approx(25e9)
    assert jax.vmap(lambda d: PARAMS.replace(difficulty=d).difficulty)(jnp.arange(4)).tolist() == [
        0,
        1,
        2,
        3,
    ]
    axes = jax.tree_util.tree_map(lambda _: None, PARAMS)  # a vmap in_axes spec
    assert axes.swap_bandwidth is None
    zeros = jax.tree_util.tree_map(lambda x: 0, PARAMS)  # e.g. a gradient-shaped tree
    assert zeros.swap_bandwidth == 0
    # ... but the rollout entry checks the concrete values it is given.
    with pytest.raises(ValueError, match=r"EnvParams\.\w+ must be"):
        rollout(
            kvjax.cache.policies.POLICIES["keep"],
            jax.random.PRNGKey(0),
            4,
            zeros,
            ENV,
            progress=False,
        )


def test_make_and_env_config_reject_bad_config():
    with pytest.raises(ValueError, match="difficulty.*allowed"):
        kvjax.make("kv-cache-v0", difficulty="extreme")
    with pytest.raises(ValueError, match="max_seqs"):
        kvjax.make("kv-cache-v0", max_seqs=True)
    with pytest.raises(ValueError, match="max_seqs"):
        kvjax.make("kv-cache-v0", max_seqs=0)
    with pytest.raises(ValueError, match="max_arrivals"):
        EnvConfig(max_arrivals=20, max_pending=4)


def test_rubric_rejects_a_batch_leading_state_and_points_at_vmap():
    # audit 1: it divided headroom by the batch size instead of the episode length.
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    _, batch = jax.vmap(ENV.reset_env, in_axes=(0, None))(keys, PARAMS)
    assert batch_layout(batch) == "leading"
    for fn in (kvjax.rubric, kvjax.observe, kvjax.summarize):
        with pytest.raises(ValueError, match="one scenario.*batched state"):
            fn(batch, PARAMS)
    with pytest.raises(ValueError, match=r"jax\.vmap\(env\.step_env"):
        ENV.step_env(None, batch, jnp.zeros(3, jnp.int32), PARAMS)
    with pytest.raises(ValueError, match=r"jax\.vmap\(env\.reset_env"):
        ENV.reset_env(keys, PARAMS)
    # The supported forms agree: vmapped rubric == rubric of the batch-trailing layout.
    vm = jax.vmap(kvjax.rubric, in_axes=(0, None))(batch, PARAMS)
    tr = kvjax.rubric(kvjax.cache.rollout.to_trailing(batch), PARAMS)
    np.testing.assert_allclose(vm["total"], tr["total"], atol=1e-6)


def test_out_of_range_int64_action_ids_are_counted_invalid_not_wrapped(hard_env):
    env, params = hard_env
    # audit 8: 2**32 + 1 wrapped to 1 (evict slot 0, the system prompt) and was not counted.
    _, st = env.reset_env(jax.random.PRNGKey(0), params)
    for action in (
        np.array([2**32 + 1, 0, 0], np.int64),
        [2**32 + 1, 0, 0],
        np.array([2**31 + 5, 0, 0], np.uint32),
        np.array([-3, 0, 0], np.int64),
    ):
        _, s1, *_ = env.step_env(None, st, action, params)
        assert int(s1.counters.invalid_actions) == 1 and int(s1.counters.evictions) == 0
    _, s1, *_ = env.step_env(None, st, np.array([1, 0, 0], np.int64), params)
    assert int(s1.counters.evictions) == 1 and int(s1.counters.invalid_actions) == 0


def test_session_call_never_raises_on_deeply_nested_json():
    # audit 4: RecursionError out of Session.call aborted the rollout.
    s = Session.new("hard", 0, 0)
    for text in ('{"a":' * 100_000 + "1" + "}" * 100_000, "[" * 100_000 + "]" * 100_000):
        r = s.call("evict", text)
        assert not r.ok and "nested too deeply" in r.text
    r = s.call("evict", {"seq_id": 2**70})
    assert not r.ok and "no sequence" in r.text
    assert s.buffer == []


def test_second_compress_of_a_sequence_names_the_precisions_it_goes_through():
    # audit 9: the second compress said "fp16 -> int8" while it went int8 -> int4.
    s = Session.new("hard", 0, 0)
    for sid in s.summary()["visible_seq_ids"]:
        first = s.call("compress", {"seq_id": sid})
        if first.ok:
            break
    assert "fp16 -> int8" in first.text
    second = s.call("compress", {"seq_id": sid})
    assert second.ok and "int8 -> int4" in second.text
    third = s.call("compress", {"seq_id": sid})
    assert not third.ok and "int4" in third.text


def test_session_construction_and_json_reject_bad_values():
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        Session.new("hard", 2**32, 0)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        Session.new("hard", -1, 0)
    with pytest.raises(ValueError, match="index must be"):
        Session.new("hard", 0, 2**40)
    s = Session.new("hard", 0, 0)
    data = s.to_json()
    assert Session.from_json(data).rubric() == s.rubric()
    mutations = {
        "params": lambda d: d["params"].__setitem__("swap_bandwidth", 0.0),
        "nan params": lambda d: d["params"].__setitem__("arrival_scale", math.nan),
        "config key": lambda d: d["config"].__setitem__("bogus", 1),
        "config value": lambda d: d["config"].__setitem__("max_seqs", -2),
        "buffer": lambda d: d.__setitem__("buffer", [1.5]),
        "buffer range": lambda d: d.__setitem__("buffer", [10**6]),
        "nan state": lambda d: d["state"].__setitem__("time", math.nan),
        "float in int leaf": lambda d: d["state"].__setitem__("time", 1.5),
        "rewards": lambda d: d.__setitem__("rewards", [math.nan]),
        "missing": lambda d: d.pop("state"),
    }
    for what, mutate in mutations.items():
        bad = copy.deepcopy(data)
        mutate(bad)
        with pytest.raises(ValueError):
            Session.from_json(bad)
            pytest.fail(what)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_scenarios=0), "num_scenarios"),
        (dict(num_scenarios=2.5), "num_scenarios"),
        (dict(num_scenarios=True), "num_scenarios"),
        (dict(num_scenarios=4, chunk_size=0), "chunk_size"),
        (dict(num_scenarios=4, micro_batch=-1), "micro_batch"),
        (dict(num_scenarios=4, key=jnp.zeros((3, 2), jnp.uint32)), "key"),
    ],
)
def test_rollout_rejects_bad_arguments(kwargs, match):
    args = dict(key=jax.random.PRNGKey(0), params=PARAMS) | kwargs
    with pytest.raises(ValueError, match=match):
        rollout(
            kvjax.cache.policies.POLICIES["keep"],
            args.pop("key"),
            args.pop("num_scenarios"),
            args.pop("params"),
            ENV,
            progress=False,
            **args,
        )
