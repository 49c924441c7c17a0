"""Tiny shared envs for tests/harness: every registered env on a tiny setting, and
kv-cache-v0's hard tier."""

import pytest

# Tiny settings of each registered env (kvjax.make keywords).
TINY = {
    "kv-cache-v0": dict(difficulty="hard", max_seqs=8, max_pending=4, episode_len=3),
    "kv-serve-v0": dict(preset="toy", load=0.8, horizon=0.5, config=dict(max_requests=16)),
}


@pytest.fixture(scope="session")
def tiny_settings():
    """env id -> make keywords of its tiny setting."""
    return TINY


@pytest.fixture(scope="session", params=sorted(TINY))
def tiny_env(request):
    """(env_id, env, params) of each registered env on its tiny setting."""
    import kvjax

    return (request.param, *kvjax.make(request.param, **TINY[request.param]))


@pytest.fixture(scope="session")
def hard_env():
    """(env, params) of kv-cache-v0 on the hard tier (default config)."""
    import kvjax

    return kvjax.make("kv-cache-v0", difficulty="hard")
