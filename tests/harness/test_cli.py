"""CLI: argument errors exit with code 2 and name the allowed values; eval --json works."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvjax import bench, cli
from kvjax.cache import bench as cache_bench
from kvjax.cache import leaderboard
from kvjax.cache.policies import POLICY_NAMES


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
    table = cache_bench.markdown_table(record)
    assert "| value_aware | 4,096 | 1.23M | 0.0500 | 3.0 | 246x | batch-trailing |" in table
    assert cache_bench.summary_line(record).startswith("value_aware @ batch 4,096: 1,228,800")
    doc = cache_bench.benchmarks_document(record, table)
    assert doc.startswith("# Benchmarks") and "Machine:" in doc
    assert "2-core CI machine: met." in doc
    record["results"][0]["steps_per_s"] = 200_000.0
    assert "not met in this run (200,000 env-steps/s" in cache_bench.benchmarks_document(
        record, table
    )
    assert "issue 14)" in doc and "not measured in this run" in doc


def test_bench_standard_path_table_and_targets():
    record = {
        "machine": bench.machine_info(),
        "config": {"max_seqs": 32, "max_actions": 3, "episode_len": 15, "difficulty": "all",
                   "repeats": 3},
        "reference_steps_per_s": {"keep": 5000.0, "random": 4000.0},
        "results": [
            {"policy": "value_aware", "batch": 4096, "compile_s": 3.0, "median_s": 0.05,
             "min_s": 0.04, "steps_per_s": 1_228_800.0, "speedup_vs_reference": 245.76,
             "micro_batch": 256, "devices": 2, "path": "batch-trailing", "x_gymnax": 2.4},
        ],
        "standard_path": [
            {"env": "kv-cache-v0", "batch": 4096, "steps": 90, "median_s": 0.4, "min_s": 0.39,
             "compile_s": 9.0, "steps_per_s": 921_600.0, "x_gymnax": 1.25},
            {"env": "gymnax Asterix-MinAtar", "batch": 4096, "steps": 90, "median_s": 0.5,
             "min_s": 0.49, "compile_s": 5.0, "steps_per_s": 737_280.0, "x_gymnax": 1.0},
        ],
    }
    table = cache_bench.markdown_table(record)
    assert "| kv-cache-v0 | 4,096 | 0.92M | 0.4000 | 9.0 | 1.25x |" in table
    assert "| gymnax Asterix-MinAtar | 4,096 | 0.74M | 0.5000 | 5.0 | 1.00x |" in table
    assert "2.40x Asterix's standard path" in cache_bench.summary_line(record)
    assert "standard path vmap(env.step) @ batch 4,096: 921,600 env-steps/s (1.25x Asterix)" in (
        cache_bench.summary_line(record))
    doc = cache_bench.benchmarks_document(record, table)
    assert ("standard path 921,600 env-steps/s (met); 1.25x Asterix (met); value_aware 2.40x "
            "Asterix (met)") in doc
    record["standard_path"][0].update(steps_per_s=500_000.0, x_gymnax=0.8)
    doc = cache_bench.benchmarks_document(record, table)
    assert "500,000 env-steps/s (not met); 0.80x Asterix (not met)" in doc


def test_bench_write_keeps_the_hand_written_notes(tmp_path):
    doc = tmp_path / "b.md"
    bench.write_keeping_notes(doc, "# Benchmarks\n\nrun 1\n")
    assert doc.read_text() == "# Benchmarks\n\nrun 1\n"  # no marker yet: the generated text
    notes = "\n" + bench.NOTES_MARKER + "\n\n## Profile\nmeasured by hand\n"
    doc.write_text(doc.read_text() + notes)
    bench.write_keeping_notes(doc, "# Benchmarks\n\nrun 2\n")
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nrun 2\n\n" + bench.NOTES_MARKER)
    assert text.endswith("## Profile\nmeasured by hand\n") and "run 1" not in text
    bench.write_keeping_notes(doc, "# Benchmarks\n\nrun 3\n")  # idempotent on the notes
    assert doc.read_text() == text.replace("run 2", "run 3")


def _one_line_exit_2(run, capsys) -> str:
    """Run a CLI call that must fail on its arguments: code 2, one stderr line, no traceback."""
    try:
        code = run()
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "argv, says",
    [
        (["eval", "--policy", "lru", "--seed", "4294967296"], "4294967295"),  # audit 7: seed 0
        (["eval", "--policy", "lru", "--seed", str(2**63)], "4294967295"),  # audit 7: traceback
        (["eval", "--policy", "lru", "--seed", "-1"], "4294967295"),
        (["eval", "--policy", "lru", "--seed", "1.5"], "4294967295"),
        (["demo", "--seed", "99999999999"], "4294967295"),
        (["leaderboard", "--seed", "-7"], "4294967295"),
        (["eval", "--policy", "lru", "--num-scenarios", "1e3"], "positive integer"),
        (["eval", "--policy", "lru", "--num-scenarios", str(2**40)], "positive integer"),
        (["bench", "--repeats", "0"], "positive integer"),
        (["eval", "--policy", "nope"], "value_aware"),
        (["eval-llm", "--seed", "-1", "--policy", "keep"], "4294967295"),
        (["eval-llm", "-n", "0", "--policy", "keep"], "positive integer"),
        (["eval-llm", "--difficulty", "hard"], "--model and --base-url are required"),
        ([], "required"),
    ],
)
def test_every_bad_argument_is_one_line_and_exit_2(argv, says, capsys):
    assert says in _one_line_exit_2(lambda: cli.main(argv), capsys)


def test_unwritable_output_paths_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    # audit 6: the path was discovered after all the work, as a traceback.
    def no_work(*a, **k):
        raise AssertionError("the command started working")

    monkeypatch.setattr(leaderboard, "evaluate", no_work)
    monkeypatch.setattr(cache_bench, "run_benchmark", no_work)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (["leaderboard", "--output", str(a_file / "lb.md")], "not a directory"),
        (["leaderboard", "--output", str(tmp_path)], "is a directory"),
        (["bench", "--write", str(a_file / "sub" / "b.md")], "not a directory"),
        (["demo", "--out-dir", str(a_file)], "not a directory"),
        (["eval-llm", "-m", "m", "--base-url", "http://127.0.0.1:9/v1",
          "--output-dir", str(a_file)], "not a directory"),
    ]
    for argv, says in cases:
        line = _one_line_exit_2(lambda argv=argv: cli.main(argv), capsys)
        assert says in line and str(tmp_path) in line, line
    # A path whose directory does not exist yet is fine (it is created when written).
    from kvjax.validation import check_writable_dir, check_writable_file

    assert check_writable_file(str(tmp_path / "new" / "deeper" / "x.md"))
    assert check_writable_dir(str(tmp_path / "new" / "dir"))


def _flags_without_help(parser, name=""):
    import argparse

    out = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if isinstance(a, argparse._SubParsersAction):
            for sub, sp in a.choices.items():
                out += _flags_without_help(sp, f"{name} {sub}".strip())
        elif not a.help:
            out.append(f"{name}: {a.option_strings or a.dest}")
    return out


def test_every_flag_has_a_help_line_and_policies_are_listed_once(capsys):
    from train import evaluate, ppo

    parsers = {"kvjax": cli.build_parser(), "train.ppo": ppo.build_parser(),
               "train.evaluate": evaluate.build_parser()}
    missing = [f"{n} {m}" for n, p in parsers.items() for m in _flags_without_help(p)]
    assert not missing, missing
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    text = capsys.readouterr().out
    assert text.count("random") == 2  # once per env: kv-cache-v0's and kv-serve-v0's policy
    assert "kv-serve-v0 (--env kv-serve-v0)" in text and "--difficulty" in text


def test_a_command_the_env_lacks_is_one_line_and_exit_2(capsys):
    from kvjax import registry

    assert registry.harness("kv-cache-v0").provides("demo")
    assert not registry.harness("kv-serve-v0").provides("demo")
    line = _one_line_exit_2(lambda: cli.main(["demo", "--env", "kv-serve-v0"]), capsys)
    assert "kv-serve-v0 has no demo" in line and "kv-cache-v0" in line
