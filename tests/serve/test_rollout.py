"""kv-serve-v0 through the shared harness: the rollout engine, `kvjax eval` and `kvjax bench`."""

import json

import jax
import numpy as np
import pytest

import kvjax
from kvjax import cli
from kvjax.rollout import rollout
from kvjax.serve import METRICS, bench
from kvjax.serve.policies import SERVE_POLICY_NAMES, make_policy


@pytest.fixture(scope="module")
def short():
    return kvjax.make(
        "kv-serve-v0", preset="toy", load=1.0, horizon=3.0, config=dict(max_requests=32)
    )


def test_rollout_runs_episodes_to_the_horizon_and_is_batching_invariant(short):
    env, p = short
    pol = make_policy("random", env)
    a = rollout(pol, jax.random.PRNGKey(0), 12, p, env, progress=False, micro_batch=4)
    b = rollout(pol, jax.random.PRNGKey(0), 12, p, env, progress=False, micro_batch=4, chunk_size=8)
    assert set(METRICS) <= set(a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert np.all(a["clock"] >= 3.0) and np.all(a["finished"] > 0)
    assert np.all(a["offloads"] + a["agent_preemptions"] > 0)  # the random policy acts


def test_rollout_matches_a_hand_written_episode(short):
    env, p = short
    pol = make_policy("engine_default", env)
    res = rollout(pol, jax.random.PRNGKey(3), 2, p, env, progress=False, micro_batch=2)
    k_reset, _ = kvjax.rollout.scenario_keys(jax.random.PRNGKey(3), 1)
    _, s = env.reset_env(k_reset, p)
    step = jax.jit(env.step_env)
    total = 0.0
    while True:
        _, s, r, _, trunc, _ = step(None, s, env.noop_action(), p)
        total += float(r)
        if bool(trunc):
            break
    assert res["score"][1] == pytest.approx(total, abs=1e-6)
    assert int(res["finished"][1]) == int(s.metrics.finished)


def test_trajectories_are_refused_for_variable_length_episodes(short):
    env, p = short
    with pytest.raises(ValueError, match="return_trajectory"):
        rollout(
            make_policy("engine_default", env),
            jax.random.PRNGKey(0),
            2,
            p,
            env,
            return_trajectory=True,
            progress=False,
        )


def test_unknown_serve_policy_names_the_allowed_values(short):
    env, _ = short
    with pytest.raises(ValueError, match="engine_default"):
        make_policy("value_aware", env)
    assert SERVE_POLICY_NAMES[:2] == ("engine_default", "random")


@pytest.mark.parametrize("workload", [None, "mooncake-synthetic"])
def test_cli_eval_kv_serve_json(capsys, workload):
    argv = ["eval", "--env", "kv-serve-v0", "--policy", "engine_default", "--num-scenarios", "2"]
    argv += ["--horizon", "1", "--load", "0.5", "--json"]
    rc = cli.main(argv + (["--workload", workload] if workload else []))
    assert rc == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["env"] == "kv-serve-v0" and rec["preset"] == "toy"
    assert rec["workload"] == (workload or "synthetic")
    assert 0.0 <= rec["results"]["score"]["mean"] <= 1.5


@pytest.mark.parametrize(
    "argv, match",
    [
        (["eval", "--env", "kv-serve-v0", "--policy", "value_aware"], "allowed"),
        (["eval", "--policy", "keep", "--preset", "toy"], "kv-serve-v0 only"),
        (["eval", "--env", "kv-serve-v0", "--policy", "random", "--load", "-1"], "load"),
        (["bench", "--env", "kv-serve-v0", "--presets", "a100"], "invalid choice"),
        (["eval", "--env", "kv-serve-v0", "--policy", "random", "--workload", "x"], "agentic"),
        (
            ["eval", "--env", "kv-serve-v0", "--policy", "random", "--workload", "azure-code"]
            + ["--horizon", "1e9"],
            "horizon must be <=",
        ),
        (
            ["eval", "--env", "kv-serve-v0", "--policy", "random", "--difficulty", "hard"],
            "difficulty",
        ),
    ],
)
def test_cli_bad_serve_arguments_exit_2_with_one_line(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        rc = cli.main(argv)
        raise SystemExit(rc)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err


def test_serve_benchmark_record(monkeypatch):
    monkeypatch.setattr(bench, "SERVE_HORIZON", 1.0)
    rec = bench.run_serve_benchmark(("toy",), (2,), repeats=1, progress=False)
    (row,) = rec["results"]
    assert row["preset"] == "toy" and row["batch"] == 2
    assert row["iterations_per_s"] > 0 and row["sim_s_per_wall_s"] > 0
    assert rec["reference_iterations_per_s"]["toy"] > 0
    assert "| toy | 2 |" in bench.serve_markdown_table(rec)
    assert "engine iterations/s" in bench.serve_summary_line(rec)
