"""serve/ops.py's pairwise-order idiom equals its plain argsort form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax.serve import ops


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 24), st.integers(0, 2**31 - 1), st.booleans())
def test_prefix_sum_in_pairwise_order_equals_sort_cumsum(n, seed, inclusive):
    rng = np.random.default_rng(seed)
    keys = [jnp.asarray(rng.integers(-3, 3, n), jnp.int32) for _ in range(rng.integers(1, 4))]
    valid = jnp.asarray(rng.random(n) < 0.7)
    x = jnp.asarray(rng.integers(0, 100, n), jnp.int32)
    got = ops.prefix_sum(ops.before_matrix(keys, valid), x, inclusive)
    want = ops._argsort_prefix_sum(keys, valid, x, inclusive)
    m = np.asarray(valid)
    np.testing.assert_array_equal(np.asarray(got)[m], np.asarray(want)[m])


def test_before_matrix_is_a_strict_total_order_on_valid_rows():
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.integers(0, 3, 12), jnp.int32)
    valid = jnp.asarray(rng.random(12) < 0.8)
    b = np.asarray(ops.before_matrix((k,), valid))
    v = np.asarray(valid)
    sub = b[np.ix_(v, v)]
    assert not np.any(np.diag(sub))
    assert np.all(sub | sub.T | np.eye(len(sub), dtype=bool))  # total
    assert not np.any(sub & sub.T)  # antisymmetric
    ranks = sub.sum(1)
    assert sorted(ranks) == list(range(v.sum()))
    # every valid row comes before every invalid one
    assert np.all(b[np.ix_(~v, v)])


def test_any_before_and_vmap():
    k = jnp.array([[2, 0, 1], [0, 1, 2]], jnp.int32)
    valid = jnp.ones((2, 3), bool)
    flag = jnp.array([[True, False, False], [True, False, False]])
    got = jax.vmap(lambda kk, vv, ff: ops.any_before(ops.before_matrix((kk,), vv), ff))(
        k, valid, flag
    )
    # row 0 has key 2 (last) in the first case; key 0 (first) in the second
    np.testing.assert_array_equal(np.asarray(got), [[False, False, False], [False, True, True]])


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 24), st.integers(0, 2**31 - 1))
def test_sorted_order_equals_the_pairwise_order(n, seed):
    rng = np.random.default_rng(seed)
    keys = [jnp.asarray(rng.integers(-3, 3, n), jnp.int32), jnp.asarray(rng.random(n))]
    valid = jnp.asarray(rng.random(n) < 0.7)
    x = jnp.asarray(rng.integers(0, 100, n), jnp.int32)
    flag = jnp.asarray(rng.random(n) < 0.3)
    pair, srt = ops.order(keys, valid, "pairwise"), ops.order(keys, valid, "sort")
    m = np.asarray(valid)
    for inclusive in (False, True):
        np.testing.assert_array_equal(
            np.asarray(pair.prefix_sum(x, inclusive))[m],
            np.asarray(srt.prefix_sum(x, inclusive))[m],
        )
    np.testing.assert_array_equal(
        np.asarray(pair.any_before(flag))[m], np.asarray(srt.any_before(flag))[m]
    )


def test_engine_is_the_same_with_sorted_orders(monkeypatch):
    """Whole episodes of a small, memory-tight engine with random commands: every state equal
    whether the orders are pairwise matrices (the default at this size) or sorts."""
    import kvjax
    from kvjax.serve.policies import make_policy

    env, p = kvjax.make(
        "kv-serve-v0",
        preset="toy",
        load=2.0,
        horizon=3.0,
        gpu_pool_tokens=8192,
        max_tokens=256,
        config=dict(max_requests=16, max_segments=4),
    )
    pol = make_policy("random", env)

    def episode(key):
        _, s = env.reset_env(key, p)

        def body(s, t):
            s = env.step_env(key, s, pol(jax.random.fold_in(key, t), s, p), p)[1]
            return s, s

        return jax.lax.scan(body, s, jnp.arange(40))[1]

    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    pairwise = jax.jit(jax.vmap(episode))(keys)
    monkeypatch.setattr(ops, "SORT_ABOVE", 0)
    sorted_ = jax.jit(jax.vmap(episode))(keys)
    jax.tree_util.tree_map(np.testing.assert_array_equal, pairwise, sorted_)
    assert int(pairwise.metrics.preemptions.sum()) > 0 and int(pairwise.metrics.finished.sum()) > 0


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([1, 5, 17, 64, 129, 300]), st.integers(0, 2**31 - 1))
def test_first_of_equal_forms_equal_the_plain_definition(n, seed):
    rng = np.random.default_rng(seed)
    keys = rng.integers(-1, max(n // 3, 2), n).astype(np.int32)
    valid = rng.random(n) < 0.7
    expected = np.array(
        [valid[i] and not any(valid[j] and keys[j] == keys[i] for j in range(i)) for i in range(n)]
    )
    for method in ("pairwise", "sort"):
        got = ops.first_of_equal(jnp.asarray(keys), jnp.asarray(valid), method)
        np.testing.assert_array_equal(np.asarray(got), expected, err_msg=method)


def test_order_any_before_equals_the_plain_definition():
    """Order.any_before (a count in the order, both forms) equals: some row before it in the
    argsort order has the flag."""
    rng = np.random.default_rng(3)
    for n in (1, 5, 16, 40):
        keys = [jnp.asarray(rng.integers(-3, 3, n), jnp.int32) for _ in range(2)]
        valid = jnp.asarray(rng.random(n) < 0.7)
        flag = jnp.asarray(rng.random(n) < 0.3)
        perm = np.asarray(ops._argsort_order(keys, valid))
        pos = np.empty(n, int)
        pos[perm] = np.arange(n)
        f = np.asarray(flag)
        want = np.array([f[perm[: pos[i]]].any() for i in range(n)])
        m = np.asarray(valid)
        for method in ("pairwise", "sort"):
            got = np.asarray(ops.order(keys, valid, method).any_before(flag))
            np.testing.assert_array_equal(got[m], want[m])


@pytest.mark.parametrize("n", [1, 2, 5, 64, 100])
def test_row_prefix_sum_equals_cumsum_alone_and_under_vmap(n):
    x = jnp.asarray(np.random.default_rng(n).integers(0, 50, (3, n)), jnp.int32)
    for inclusive in (False, True):
        want = np.cumsum(np.asarray(x), axis=1) - (0 if inclusive else np.asarray(x))
        got = jax.vmap(lambda v, inc=inclusive: ops.row_prefix_sum(v, inc))(x)
        np.testing.assert_array_equal(np.asarray(got), want)
        np.testing.assert_array_equal(np.asarray(ops.row_prefix_sum(x[0], inclusive)), want[0])
