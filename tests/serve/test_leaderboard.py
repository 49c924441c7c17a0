"""The kv-serve-v0 leaderboard (serve/leaderboard.py): the headroom rule, the unlimited-KV
reference (validated: nothing evicted or preempted; never a lower hit rate than any policy on
the same windows), the document's labels and byte-identical regeneration through the CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import cli
from kvjax.serve import engine
from kvjax.serve import leaderboard as slb


def test_headroom_is_the_paired_ratio_and_n_a_when_the_reference_is_noise():
    h, half = slb.headroom(np.array([1.0, 1.0, 1.0]), np.array([2.0, 2.0, 2.0]))
    assert h == 0.5 and half == 0.0
    h, half = slb.headroom(np.array([1.0, 2.0, 3.0]), np.array([4.0, 4.0, 4.0]))
    assert h == 0.5 and half > 0
    # reference within noise of the default, exactly equal, or below it: n/a
    assert slb.headroom(np.array([1.0, 0.0]), np.array([1.0, -0.9])) is None
    assert slb.headroom(np.zeros(4), np.zeros(4)) is None
    assert slb.headroom(np.ones(4), -np.ones(4)) is None


def fake_block():
    rng = np.random.default_rng(0)
    names = [*slb.POLICIES, slb.REFERENCE]
    cols = ["goodput", "slo_attainment", "p99_ttft", "p99_tpot", "hit_rate", "preemptions_per_s"]
    runs = {n: {c: rng.random(4) for c in cols} for n in names}
    runs[slb.REFERENCE]["goodput"] = runs["engine_default"]["goodput"]  # no headroom: n/a
    return {"capacity": 10.0, "loads": {0.9: {"offered": 9.0, "runs": runs}}}


def test_document_labels_the_offline_policy_and_the_reference_and_says_n_a():
    s = slb.Setting(workloads=("synthetic",), loads=(0.9,))
    text = slb.document([(s, {"synthetic": fake_block()})], 60.0, 4, 0, "kvjax leaderboard")
    assert "| belady_offline (offline: reads the future) |" in text
    assert f"| **{slb.REFERENCE}** |" in text
    assert "n/a" in text and "Roofline capacity" in text and "Spread at load 0.9" in text
    # best and worst online policy exclude the offline one and the reference
    spread = slb.spread(fake_block(), 0.9)
    assert spread["best"]["policy"] not in ("belady_offline", slb.REFERENCE)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--workloads", "nope"], "agentic"),
        (["--loads", "0"], "> 0"),
        (["--policies", "lru"], "belady_offline"),
        (["--policies", "ttl_pin"], "engine_default"),
        (["--set", "pool=3"], "gpu_pool_tokens"),
        (["--set", "gpu_pool_tokens=big"], "number"),
        (["--env", "kv-cache-v0", "--workloads", "agentic"], "kv-serve-v0 only"),
        (["--env", "nope"], "kv-serve-v0"),
    ],
)
def test_bad_serve_leaderboard_arguments_exit_2_with_one_line(argv, says, capsys):
    if "--env" not in argv:
        argv = ["--env", "kv-serve-v0", *argv]
    try:
        code = cli.main(["leaderboard", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err


def test_leaderboard_defaults_per_env():
    args = cli.build_parser().parse_args(["leaderboard"])
    cli.check_env_options(args)
    assert (args.output, args.num_scenarios) == ("docs/leaderboard.md", 4096)
    args = cli.build_parser().parse_args(["leaderboard", "--env", "kv-serve-v0"])
    cli.check_env_options(args)
    assert (args.output, args.num_scenarios) == ("docs/serving-leaderboard.md", 8)
    assert args.setting == slb.Setting() and tuple(args.policies) == slb.POLICIES


# -- runs --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_unlimited_reference_evicts_nothing_and_bounds_every_policys_hit_rate():
    """toy, agentic, GPU pool 40,000 tokens (binds: the policies evict histories and preempt),
    load 2, 30 s, 3 paired scenarios: the reference's hit rate >= every policy's, window by
    window. (Where policies preempt a lot, re-admissions hit their prefix again and the
    metric can favour them - docs/serving-leaderboard.md.)"""
    env, p = kvjax.make(
        "kv-serve-v0", preset="toy", workload="agentic", load=2.0, horizon=30.0,
        gpu_pool_tokens=40_000, config=dict(max_requests=16, max_segments=16),
    )  # fmt: skip
    ref_env, ref_p = slb.reference_setting(env, p)
    key = jax.random.PRNGKey(0)
    n = 3

    # The claim, checked step by step: no cached key ever leaves the GPU (evicted or its row
    # recycled), no preemption.
    def episode(k):
        _, s = ref_env.reset_env(k, ref_p)

        def body(s, _):
            _, nxt, _, _, _, _ = ref_env.step_env(k, s, ref_env.noop_action(), ref_p)
            a, b = s.segments, nxt.segments
            kept = (a.key[:, None] == b.key[None, :]) & engine.resident(b)[None, :]
            lost = jnp.sum(engine.resident(a) & ~jnp.any(kept, axis=1))
            return nxt, lost

        final, lost = jax.lax.scan(body, s, None, length=1000)
        return final, jnp.sum(lost)

    keys = jax.random.split(jax.random.PRNGKey(9), n)
    final, lost = jax.jit(jax.vmap(episode))(keys)
    assert np.all(np.asarray(final.clock) >= 30.0)
    assert int(np.sum(lost)) == 0 and int(np.sum(final.metrics.preemptions)) == 0
    assert int(np.sum(final.metrics.offloads)) == 0

    names = slb.POLICIES
    ref = slb.run_policy(names, 0, key, n, ref_p, ref_env.config)
    assert int(np.sum(ref["preemptions"])) == 0
    pressure = 0
    for i, name in enumerate(names):
        res = slb.run_policy(names, i, key, n, p, env.config)
        pressure += int(np.sum(res["preemptions"]))
        assert np.all(ref["hit_rate"] >= res["hit_rate"]), (name, ref["hit_rate"], res["hit_rate"])
    assert pressure > 0  # the pool binds for the policies


@pytest.mark.slow
def test_leaderboard_regeneration_is_byte_identical(tmp_path, capsys):
    argv = [
        "leaderboard", "--env", "kv-serve-v0", "--preset", "toy", "--workloads", "synthetic",
        "--loads", "0.9", "--horizon", "3", "--num-scenarios", "2", "--no-extra",
        "--policies", "engine_default", "belady_offline",
    ]  # fmt: skip
    a, b = tmp_path / "a.md", tmp_path / "b.md"
    assert cli.main([*argv, "--output", str(a)]) == 0
    assert cli.main([*argv, "--output", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    text = a.read_text()
    assert "belady_offline (offline: reads the future)" in text and slb.REFERENCE in text
    assert "--preset toy --workloads synthetic --loads 0.9" in text
    assert " s\n" not in text.split("Regenerate")[0]  # no timings in the document
