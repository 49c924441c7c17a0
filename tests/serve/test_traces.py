"""Request traces (kvjax/serve/traces.py): the four loaders on small files of their formats,
clear errors for malformed ones, the prefix forest against a brute-force trie, the bundled
traces' statistics against serving.md section 6, and `kvjax workload stats`."""

from __future__ import annotations

import fnmatch
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from kvjax import cli
from kvjax.serve import traces

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "traces"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def jsonl(path: Path, records: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


# -- loaders ---------------------------------------------------------------------------------
def test_azure_2023_and_2024_csv(tmp_path):
    f = write(
        tmp_path / "az.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:50.9951690,7,1\n",
    )
    tr = traces.load_trace(f)
    assert tr.format == "azure" and tr.name == "az" and len(tr) == 3
    np.testing.assert_allclose(tr.arrival, [0.0, 4.314579, 4.314579], atol=1e-6)
    assert tr.input_len.tolist() == [374, 396, 7] and tr.output_len.tolist() == [44, 109, 1]
    assert not tr.has_prefixes and (tr.session == -1).all() and (tr.prefix_node == -1).all()
    # 2024: a UTC offset; rows out of order are sorted (stable)
    f = write(
        tmp_path / "az24.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:02.5+00:00,10,2\n"
        "2024-05-10 00:00:00.009930+00:00,20,3\n"
        "2024-05-10 01:00:01+01:00,30,4\n",
    )
    tr = traces.load_trace(f)
    np.testing.assert_allclose(tr.arrival, [0.0, 0.990070, 2.490070], atol=1e-6)
    assert tr.input_len.tolist() == [20, 30, 10]


def test_burstgpt_csv_sessions_and_categories(tmp_path):
    f = write(
        tmp_path / "burst.csv",
        "Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,"
        "Total tokens,Log Type\n"
        "5,s1,1.5,ChatGPT,100,20,120,Conversation log\n"
        "6,,0.7,GPT-4,50,0,50,API log\n"
        "9.5,s1,2.0,ChatGPT,300,30,330,Conversation log\n"
        "12,s2,1.0,ChatGPT,10,5,15,Conversation log\n",
    )
    tr = traces.load_trace(f)
    assert tr.format == "burstgpt" and len(tr) == 4
    np.testing.assert_allclose(tr.arrival, [0.0, 1.0, 4.5, 7.0])
    assert tr.input_len.tolist() == [100, 50, 300, 10]
    assert tr.output_len.tolist() == [20, 0, 30, 5]
    assert tr.session.tolist() == [0, -1, 0, 1]
    assert tr.parent.tolist() == [-1, -1, 0, -1] and tr.turn.tolist() == [1, -1, 2, 1]
    assert tr.categories == ("ChatGPT / Conversation log", "GPT-4 / API log")
    assert tr.category.tolist() == [0, 1, 0, 0]
    # the minimal column set (BurstGPT v1)
    f = write(
        tmp_path / "b1.csv",
        "Timestamp,Model,Request tokens,Response tokens,Total "
        "tokens,Log Type\n0,ChatGPT,1,2,3,API log\n",
    )
    assert traces.load_trace(f).input_len.tolist() == [1]


def test_mooncake_jsonl_prefixes(tmp_path):
    f = jsonl(
        tmp_path / "mc.jsonl",
        [
            {"timestamp": 0, "input_length": 1500, "output_length": 5, "hash_ids": [0, 1, 2]},
            {"timestamp": 250, "input_length": 1100, "output_length": 6, "hash_ids": [0, 1, 3]},
            {"timestamp": 1000, "input_length": 700, "output_length": 7, "hash_ids": [0, 1]},
            {"timestamp": 1500, "input_length": 300, "output_length": 8, "hash_ids": [9]},
            {"timestamp": 2000, "input_length": 2000, "output_length": 9, "hash_ids": [0, 1, 2, 4]},
        ],
    )
    tr = traces.load_trace(f)
    assert tr.format == "mooncake" and tr.block_size == 512
    np.testing.assert_allclose(tr.arrival, [0, 0.25, 1.0, 1.5, 2.0])
    # segments: [0,1] (branch point), [2], [3], [9], [4]
    assert tr.node_blocks.tolist() == [2, 1, 1, 1, 1]
    assert tr.node_parent.tolist() == [-1, 0, 0, -1, 1]
    assert tr.node.tolist() == [1, 2, 0, 3, 4]
    assert tr.prefix_node.tolist() == [-1, 0, 0, -1, 1]
    assert tr.prefix_tokens.tolist() == [0, 1024, 700, 0, 1536]  # capped at the input
    assert tr.path(4) == [0, 1, 4]
    r = traces.prefix_reuse(tr)
    assert r["blocks"] == 13 and r["block_reuse"] == pytest.approx(7 / 13)
    assert r["token_reuse"] == pytest.approx((1024 + 700 + 1536) / 5600)


def test_out_of_order_records_are_sorted_before_prefix_matching(tmp_path):
    rng = np.random.default_rng(1)
    recs = [
        {
            "timestamp": 10 * i,
            "input_length": 600 * (i % 4 + 1),
            "output_length": i + 1,
            "hash_ids": [0, *range(1, i % 4 + 1)] if i % 2 else [0, 100 + i],
        }
        for i in range(40)
    ]
    a = traces.load_trace(jsonl(tmp_path / "a.jsonl", recs))
    shuffled = [recs[k] for k in rng.permutation(len(recs))]
    b = traces.load_trace(jsonl(tmp_path / "b.jsonl", shuffled))
    for k in traces._NPZ_ARRAYS:
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)
    assert a.output_len.tolist() == list(range(1, 41))


def test_bailian_jsonl_chains(tmp_path):
    f = jsonl(
        tmp_path / "qwen.jsonl",
        [
            {
                "chat_id": 10,
                "parent_chat_id": -1,
                "timestamp": 1.0,
                "input_length": 40,
                "output_length": 8,
                "type": "text",
                "turn": 1,
                "hash_ids": [5, 6, 7],
            },
            {
                "chat_id": 11,
                "parent_chat_id": -1,
                "timestamp": 1.5,
                "input_length": 20,
                "output_length": 4,
                "type": "image",
                "turn": 1,
                "hash_ids": [5, 8],
            },
            {
                "chat_id": 12,
                "parent_chat_id": 10,
                "timestamp": 3.0,
                "input_length": 70,
                "output_length": 9,
                "type": "text",
                "turn": 2,
                "hash_ids": [5, 6, 7, 9, 10],
            },
            {
                "chat_id": 13,
                "parent_chat_id": 12,
                "timestamp": 4.25,
                "input_length": 90,
                "output_length": 3,
                "type": "text",
                "turn": 3,
                "hash_ids": [5, 6, 7, 9, 10, 11],
            },
        ],
    )
    tr = traces.load_trace(f)
    assert tr.format == "bailian" and tr.block_size == 16
    np.testing.assert_allclose(tr.arrival, [0.0, 0.5, 2.0, 3.25])
    assert tr.parent.tolist() == [-1, -1, 0, 2] and tr.session.tolist() == [0, 1, 0, 0]
    assert tr.turn.tolist() == [1, 1, 2, 3] and tr.categories == ("text", "image")
    assert tr.prefix_tokens.tolist() == [0, 16, 48, 80]
    # a saved trace loads back identically (the bundled format)
    traces.save_trace(tr, tmp_path / "q.npz")
    back = traces.load_trace(tmp_path / "q.npz")
    assert back.categories == tr.categories and back.block_size == 16
    for k in traces._NPZ_ARRAYS:
        np.testing.assert_array_equal(getattr(back, k), getattr(tr, k), err_msg=k)


AZ = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n"
BG = (
    "Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,"
    "Log Type\n1,s,1,ChatGPT,10,2,12,Conversation log\n"
)
MC = '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}\n'
QW = (
    '{"chat_id": 1, "parent_chat_id": -1, "timestamp": 0.5, "input_length": 10, '
    '"output_length": 1, "type": "text", "turn": 1, "hash_ids": [0]}\n'
)


@pytest.mark.parametrize(
    "name, text, line, column",
    [
        ("a.csv", AZ + "2023-11-16 18:15:47.00,12x,4\n", 3, "ContextTokens"),
        ("a.csv", AZ + "2023-11-16 18:15:47.00,12,-4\n", 3, "GeneratedTokens"),
        ("a.csv", AZ + "yesterday,12,4\n", 3, "TIMESTAMP"),
        ("a.csv", AZ + "2023-11-16 18:15:47.00,12\n", 3, None),
        (
            "a.csv",
            "TIMESTAMP,ContextTokens,Tokens\n2023-11-16 18:15:46,3,4\n",
            1,
            "GeneratedTokens",
        ),
        ("b.csv", BG + "2,s,1,ChatGPT,10,2.5,12,Conversation log\n", 3, "Response tokens"),
        ("b.csv", BG + "nan,s,1,ChatGPT,10,2,12,Conversation log\n", 3, "Timestamp"),
        (
            "m.jsonl",
            MC + '{"timestamp": 5, "input_length": 10, "output_length": 1}\n',
            2,
            "hash_ids",
        ),
        (
            "m.jsonl",
            MC + MC + '{"timestamp": 5, "input_length": "10", "output_length": 1, '
            '"hash_ids": []}\n',
            3,
            "input_length",
        ),
        (
            "m.jsonl",
            MC + '{"timestamp": 5, "input_length": 10, "output_length": 1, "hash_ids": [1, -2]}\n',
            2,
            "hash_ids",
        ),
        ("m.jsonl", MC + '{"timestamp": 5, "input_length": 10,\n', 2, None),
        ("q.jsonl", QW + QW.replace('"turn": 1', '"turn": "two"'), 2, "turn"),
        ("q.jsonl", QW + QW.replace('"timestamp": 0.5', '"timestamp": null'), 2, "timestamp"),
        ("q.jsonl", QW + QW.replace('"chat_id": 1, ', ""), 2, "chat_id"),
    ],
)
def test_malformed_files_name_the_line_and_column(tmp_path, name, text, line, column):
    f = write(tmp_path / name, text)
    with pytest.raises(ValueError) as e:
        traces.load_trace(f)
    msg = str(e.value)
    assert str(f) in msg and f"line {line}" in msg, msg
    if column is not None:
        assert f"column {column!r}" in msg, msg
    assert "\n" not in msg


def test_unknown_names_and_formats(tmp_path):
    with pytest.raises(ValueError, match="neither a bundled trace.*azure-conv"):
        traces.load_trace("azure-chat")
    with pytest.raises(ValueError, match="line 1: unknown trace format"):
        traces.load_trace(write(tmp_path / "x.csv", "a,b,c\n1,2,3\n"))
    with pytest.raises(ValueError, match="empty file"):
        traces.load_trace(write(tmp_path / "e.csv", "\n"))
    with pytest.raises(ValueError, match="not a kvjax trace"):
        traces.load_trace(write(tmp_path / "e.npz", "PK nonsense"))


def brute_force(seqs):
    """Matched blocks per request and a (segment, offset) label per trie node, by a dict trie."""
    seen, matched = {}, []
    for s in seqs:
        m = 0
        while m < len(s) and tuple(s[: m + 1]) in seen:
            m += 1
        matched.append(m)
        for k in range(len(s)):
            seen.setdefault(tuple(s[: k + 1]), len(seen))
    return matched, seen


def test_prefix_forest_matches_a_brute_force_trie():
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(300):  # extend / branch off / repeat earlier sequences, hashes reused
        if seqs and rng.random() < 0.8:
            base = seqs[rng.integers(len(seqs))]
            base = base[: rng.integers(len(base) + 1)]
        else:
            base = []
        seqs.append(list(base) + rng.integers(0, 12, rng.integers(0, 5)).tolist())
    nblk = np.array([len(s) for s in seqs])
    hashes = np.array([h for s in seqs for h in s], np.int64)
    inp = nblk * 16 - rng.integers(0, 16, len(seqs))
    pf = traces.prefix_forest(nblk, hashes, inp, 16)
    matched, trie = brute_force(seqs)
    assert pf["matched_blocks"].tolist() == matched
    assert pf["prefix_tokens"].tolist() == np.minimum(np.array(matched) * 16, inp).tolist()
    tr = traces.Trace(
        name="t",
        format="t",
        arrival=np.arange(len(seqs), dtype=float),
        input_len=inp,
        output_len=inp,
        session=inp,
        parent=inp,
        turn=inp,
        category=inp,
        categories=(),
        block_size=16,
        **{k: v for k, v in pf.items() if k != "matched_blocks"},
    )
    depth = tr.node_depth()
    label = {}
    for i, s in enumerate(seqs):
        blocks = [(j, o) for j in tr.path(i) for o in range(tr.node_blocks[j])]
        assert len(blocks) == len(s)
        for k in range(len(s)):  # one label per trie node, and distinct trie nodes differ
            assert label.setdefault(tuple(s[: k + 1]), blocks[k]) == blocks[k]
        p = pf["prefix_node"][i]
        assert (depth[p] if p >= 0 else 0) == matched[i]
        assert p < 0 or p in tr.path(i)
    assert len(set(label.values())) == len(label) == len(trie)
    assert (tr.node_blocks >= 1).all() and (tr.node_parent < np.arange(tr.num_nodes)).all()


# -- bundled traces --------------------------------------------------------------------------
AZURE = {  # serving.md section 6
    "azure-conv": (19366, "5.53", "1.39", [1020, 2734, 4142], [129, 424, 601]),
    "azure-code": (8819, "2.57", "13.2", [1469, 5186, 7436], [13, 55, 249]),
}


@pytest.mark.parametrize("name", list(AZURE))
def test_bundled_azure_stats_match_serving_notes(name):
    n, rate, burst, inp, out = AZURE[name]
    st = traces.trace_stats(traces.load_trace(name))
    assert st["requests"] == n
    assert f"{st['arrival_rate']:.2f}" == rate and f"{st['burstiness']:.3g}" == burst
    assert [st["input"][p] for p in ("p50", "p90", "p99")] == inp
    assert [st["output"][p] for p in ("p50", "p90", "p99")] == out
    assert "prefix_reuse" not in st


def test_bundled_mooncake_reuse_matches_serving_notes():
    conv = traces.load_trace("mooncake-conv")
    st = traces.trace_stats(conv)
    assert st["requests"] == 12031 and 58 * 60 < st["duration_s"] < 60 * 60
    assert [st["input"][p] for p in ("p50", "p90", "p99")] == [6909, 27367, 85399]
    assert st["output"]["p50"] == 350
    assert abs(st["prefix_reuse"]["block_reuse"] - 0.366) < 0.01
    assert (conv.prefix_node[1:] >= 0).all()  # block 0 is shared by all
    assert (conv.node_depth()[conv.node] == -(-conv.input_len // 512)).all()
    syn = traces.trace_stats(traces.load_trace("mooncake-synthetic"))
    assert syn["requests"] == 3993 and syn["input"]["p50"] == 11587
    assert abs(syn["prefix_reuse"]["block_reuse"] - 0.64) < 0.01


def test_bundled_files_are_small_packaged_and_licensed():
    data = ROOT / "kvjax" / "serve" / "data" / "traces"
    files = sorted(p.name for p in data.iterdir())
    assert {f"{v[0]}.npz" for v in traces.BUNDLED.values()} <= set(files)
    assert {"LICENSE-azure-CC-BY-4.0.txt", "LICENSE-mooncake-Apache-2.0.txt"} <= set(files)
    assert sum((data / f).stat().st_size for f in files) < 2 * 2**20
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["kvjax.serve"]
    for f in files:
        assert any(fnmatch.fnmatch(f"data/traces/{f}", g) for g in globs), f
    notice = (ROOT / "kvjax" / "serve" / "NOTICE").read_text()
    assert "CC-BY-4.0" in notice and "Apache License 2.0" in notice
    assert all(f"{v[0]}.npz" in notice for v in traces.BUNDLED.values())


@pytest.mark.skipif(not SHARED.is_dir(), reason="source traces not on this machine")
@pytest.mark.parametrize(
    "name, fname",
    [("azure-code", "azure2023_code.csv"), ("mooncake-synthetic", "mooncake_synthetic.jsonl")],
)
def test_bundled_equals_source(name, fname):
    a, b = traces.load_trace(name), traces.load_trace(SHARED / fname)
    for k in traces._NPZ_ARRAYS:
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)


# -- CLI -------------------------------------------------------------------------------------
def test_cli_workload_stats(capsys, tmp_path):
    assert cli.main(["workload", "stats", "azure-conv"]) == 0
    out = capsys.readouterr().out
    assert "5.53 req/s" in out and "burstiness      1.39" in out
    assert "p50 1,020  p90 2,734  p99 4,142" in out and "p50 129  p90 424  p99 601" in out
    png = tmp_path / "plots" / "code.png"
    assert cli.main(["workload", "stats", "azure-code", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "2.57 req/s" in out and "13.2" in out and "p50 1,469  p90 5,186  p99 7,436" in out
    assert "p50 13  p90 55  p99 249" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert cli.main(["workload", "stats", "mooncake-synthetic", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["requests"] == 3993 and round(rec["prefix_reuse"]["block_reuse"], 2) == 0.64


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["workload", "stats", "azure-chat"], "unknown trace 'azure-chat'"),
        (["workload", "stats", "BAD"], "line 3, column 'GeneratedTokens'"),
    ],
)
def test_cli_workload_errors_one_line_exit_2(capsys, tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "BAD", AZ + "2023-11-16 18:15:47.00,12,x\n")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvjax workload stats: error:") and needle in err
    assert err.count("\n") == 1


def test_cli_workload_usage_errors(capsys, tmp_path):
    for argv in (
        ["workload"],
        ["workload", "stats"],
        ["workload", "stats", "azure-conv", "--plot", str(tmp_path)],
    ):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
        assert code == 2
        assert capsys.readouterr().err.count("\n") == 1
