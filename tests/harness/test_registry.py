"""kvjax.registry: env ids -> their packages; kvjax.make and kvjax.make_policy go through it."""

import argparse

import pytest

import kvjax
from kvjax import registry
from kvjax.cache.env import KVCacheEnv


def test_builtin_envs_are_registered_in_order():
    assert registry.env_ids()[:2] == ("kv-cache-v0", "kv-serve-v0")
    assert registry.DEFAULT_ENV_ID == "kv-cache-v0"
    for env_id in registry.env_ids():
        h = registry.harness(env_id)
        assert h.env_id == env_id and h.policy_names and h.default_policy in h.policy_names


def test_unknown_env_id_names_the_allowed_ones():
    for bad in ("kv-nope-v0", None, 3):
        with pytest.raises(ValueError, match="kv-cache-v0.*kv-serve-v0"):
            registry.make(bad)
    with pytest.raises(ValueError, match="entry_point"):
        registry.register("x-v0", "no_colon")


def test_make_goes_to_the_env_package():
    env, params = kvjax.make("kv-cache-v0", difficulty="hard", max_seqs=8)
    assert isinstance(env, KVCacheEnv) and env.config.max_seqs == 8
    assert int(params.difficulty) == kvjax.difficulty_index("hard")
    serve, _ = kvjax.make("kv-serve-v0", preset="toy")
    assert serve.name == "kv-serve-v0"
    with pytest.raises(ValueError, match="no difficulty tiers"):
        kvjax.make("kv-serve-v0", difficulty="hard")


def test_make_policy_uses_the_envs_own_names():
    env, _ = kvjax.make("kv-cache-v0")
    serve, _ = kvjax.make("kv-serve-v0", preset="toy")
    assert callable(kvjax.make_policy("value_aware", env))
    assert callable(kvjax.make_policy("engine_default", serve))
    with pytest.raises(ValueError, match="engine_default"):
        kvjax.make_policy("value_aware", serve)
    with pytest.raises(ValueError, match="value_aware"):
        kvjax.make_policy("engine_default", env)


class _Toy(registry.Harness):
    env_id = "toy-v0"
    policy_names = ("only",)
    default_policy = "only"

    def make(self, **kwargs):
        return ("env", kwargs), "params"


TOY = _Toy()


def test_a_registered_package_is_found_by_its_entry_point():
    registry.register("toy-v0", f"{__name__}:TOY")
    try:
        assert registry.harness("toy-v0") is TOY
        assert registry.make("toy-v0", a=1) == (("env", {"a": 1}), "params")
        # The default CLI hooks: no options, no scenario keywords, a generic eval header and
        # record, and no documents of its own.
        p = argparse.ArgumentParser()
        assert TOY.add_options(p, "eval") == [] and TOY.scenario(argparse.Namespace()) == {}
        assert TOY.eval_header("only", {"n": 1}, None, 8, 0, 1.25) == (
            "only on toy-v0 (n 1), 8 scenarios (seed 0, 1.2 s)"
        )
        assert TOY.record({"n": 1}, None) == {"n": 1}
        assert not any(TOY.provides(c) for c in ("demo", "bench", "leaderboard"))
    finally:
        registry._ENTRY_POINTS.pop("toy-v0")
        registry.harness.cache_clear()
    assert "toy-v0" not in registry.env_ids()
