"""CLI: argument errors exit with code 2 and name the allowed values; eval --json works."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvjax import bench, cli, leaderboard
from kvjax.policies import POLICY_NAMES


@pytest.mark.parametrize(
    "argv, allowed",
    [
        (["eval", "--policy", "nope"], "value_aware"),
        (["eval", "--policy", "lru", "--difficulty", "insane"], "'hard'"),
        (["demo", "--policies", "keep", "bogus"], "oracle"),
        (["frobnicate"], "leaderboard"),
        (["bench", "--batch-sizes", "0"], "positive"),
        (["eval", "--policy", "lru", "--num-scenarios", "-3"], "positive"),
    ],
)
def test_bad_arguments_exit_2_and_list_allowed_values(argv, allowed, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert allowed in capsys.readouterr().err


def test_missing_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


def test_eval_json_record(capsys):
    assert cli.main(["eval", "--policy", "keep", "--difficulty", "hard", "--num-scenarios", "8",
                     "--seed", "1", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["policy"] == "keep" and record["difficulty"] == "hard"
    assert record["num_scenarios"] == 8
    res = record["results"]
    assert res["invalid_actions"]["mean"] == 0.0
    assert res["evictions"]["mean"] == 0.0  # keep-only never acts
    assert -1.0 <= res["total"]["mean"] <= 1.0


def _fake_results():
    rng = np.random.default_rng(0)
    return {
        name: {t: {k: rng.normal(i / 10, 0.1, 32).astype(np.float32)
                   for k in (*leaderboard.COLUMNS, "total_failures_metric")}
               for t in leaderboard.TIERS}
        for i, name in enumerate(POLICY_NAMES)
    }


def test_leaderboard_markdown_labels_the_upper_bound_and_sorts():
    text = leaderboard.document(_fake_results(), 32, 0)
    assert "oracle (reads the future)" in text
    for tier in leaderboard.TIERS:
        assert f"### {tier}" in text
    easy = text.split("### easy")[1].split("###")[0]
    rows = [ln for ln in easy.splitlines() if ln.startswith("| ") and "±" in ln]
    assert len(rows) == len(POLICY_NAMES)
    means = [float(r.split("|")[2].split("±")[0]) for r in rows]
    assert means == sorted(means, reverse=True)


def test_bench_table_and_summary_line():
    record = {
        "machine": bench.machine_info(),
        "config": {"max_seqs": 32, "max_actions": 3, "episode_len": 15, "difficulty": "all",
                   "repeats": 3},
        "reference_steps_per_s": {"keep": 5000.0, "random": 4000.0},
        "results": [
            {"policy": "value_aware", "batch": 4096, "compile_s": 3.0, "median_s": 0.05,
             "min_s": 0.04, "steps_per_s": 1_228_800.0, "speedup_vs_reference": 245.76,
             "micro_batch": 1024, "devices": 2, "path": "batch-trailing"},
        ],
    }
    table = bench.markdown_table(record)
    assert "| value_aware | 4,096 | 1.23M | 0.0500 | 3.0 | 246x | batch-trailing |" in table
    assert bench.summary_line(record).startswith("value_aware @ batch 4,096: 1,228,800")
    doc = cli.benchmarks_document(record, table)
    assert doc.startswith("# Benchmarks") and "Machine:" in doc
    assert "2-core CI machine: met." in doc
    record["results"][0]["steps_per_s"] = 200_000.0
    assert "not met in this run (200,000 env-steps/s" in cli.benchmarks_document(record, table)
