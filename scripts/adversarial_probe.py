"""Adversarial pass over kvjax's entry points (issue 15): feed bad input everywhere values enter
and count what comes back.

    python scripts/adversarial_probe.py [--verbose]

Each probe is (name, call, expect): `expect="reject"` - bad input that must raise ValueError
(or exit 2 with one stderr line for a CLI); `expect="ok"` - input that must be accepted with
finite results; `expect="never-raises"` - Session.call, which returns an error result. Outcomes:

* traceback: an exception other than the expected ValueError / SystemExit(2), or a CLI exit
  that printed a traceback or more than one line;
* silent NaN: a result that holds NaN/inf without an error;
* silent clamp: bad input accepted (no error) - it was clamped, wrapped or ignored.

Prints the counts (target 0 / 0 / 0) and, with --verbose, every probe.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import sys
import tempfile
import traceback

os.environ.setdefault("KVJAX_ONE_DEVICE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kvjax  # noqa: E402
from kvjax import cli  # noqa: E402
from kvjax.cache.llm.session import Session  # noqa: E402
from kvjax.cache.types import PARAM_SPECS, EnvConfig, EnvParams  # noqa: E402
from kvjax.rollout import rollout  # noqa: E402

RESULTS: list[tuple[str, str, str]] = []  # (name, outcome, detail)


def _finite(x) -> bool:
    leaves = jax.tree_util.tree_leaves(x)
    for v in leaves:
        a = np.asarray(v)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            return False
    return True


def probe(name: str, fn, expect: str) -> None:
    try:
        out = fn()
    except ValueError as e:
        outcome = "ok" if expect == "reject" else "traceback"
        RESULTS.append((name, outcome, f"ValueError: {e}"[:160]))
        return
    except Exception as e:  # noqa: BLE001
        RESULTS.append((name, "traceback", f"{type(e).__name__}: {e}"[:160]))
        return
    if expect == "reject":
        RESULTS.append((name, "silent clamp", f"accepted: {str(out)[:120]}"))
    elif not _finite(out):
        RESULTS.append((name, "silent NaN", str(out)[:120]))
    else:
        RESULTS.append((name, "ok", str(out)[:120]))


def probe_cli(name: str, main, argv: list[str]) -> None:
    """A CLI call that must exit 2 with exactly one stderr line and no traceback."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    except SystemExit as e:
        code = e.code
    except Exception:  # noqa: BLE001
        RESULTS.append((name, "traceback", traceback.format_exc(limit=1)[-160:]))
        return
    lines = [x for x in err.getvalue().splitlines() if x.strip()]
    if code == 2 and len(lines) == 1 and "Traceback" not in err.getvalue():
        RESULTS.append((name, "ok", lines[0][:160]))
    elif code in (0, None):
        RESULTS.append((name, "silent clamp", f"exit {code}: {out.getvalue()[-120:]}"))
    else:
        RESULTS.append(
            (name, "traceback", f"exit {code}, {len(lines)} lines: {err.getvalue()[-160:]}")
        )


def params_probes() -> None:
    bad = {
        "nan": math.nan,
        "inf": math.inf,
        "-inf": -math.inf,
        "-1": -1.0,
        "1e300": 1e300,
        "True": True,
        "str": "1",
        "-0.5": -0.5,
    }
    for field, spec in PARAM_SPECS.items():
        values = dict(bad)
        if spec.integer:
            values.update({"2.5": 2.5, "2**40": 2**40})
            if field != "difficulty":
                values["0"] = 0
        elif spec.lo_open:
            values["0"] = 0.0
        if field == "difficulty":
            values.update({"4": 4, "7": 7})
        if field == "admit_watermark":
            values["1.5"] = 1.5
        for label, v in values.items():
            probe(f"EnvParams({field}={label})", lambda f=field, v=v: EnvParams(**{f: v}), "reject")
            probe(
                f"params.replace({field}={label})",
                lambda f=field, v=v: EnvParams().replace(**{f: v}),
                "reject",
            )
        probe(
            f"EnvParams({field}=np array with one bad)",
            lambda f=field: EnvParams(**{f: np.array([getattr(EnvParams(), f), -7])}),
            "reject",
        )


def make_probes() -> None:
    for d in ("extreme", 7, None, 3.0, "HARD"):
        probe(
            f"make(difficulty={d!r})", lambda d=d: kvjax.make("kv-cache-v0", difficulty=d), "reject"
        )
    for k, v in (
        ("max_seqs", 0),
        ("max_seqs", -1),
        ("max_seqs", True),
        ("max_seqs", 2.5),
        ("max_seqs", "8"),
        ("max_seqs", 10**9),
        ("max_arrivals", 99),
        ("bogus", 1),
    ):
        probe(f"make({k}={v!r})", lambda k=k, v=v: kvjax.make("kv-cache-v0", **{k: v}), "reject")
    probe("make('kv-cache-v1')", lambda: kvjax.make("kv-cache-v1"), "reject")
    probe("EnvConfig(max_pending=0)", lambda: EnvConfig(max_pending=0), "reject")


def state_probes(env, params, single, batch) -> None:
    probe("rubric(batch-leading)", lambda: kvjax.rubric(batch, params), "reject")
    probe("observe(batch-leading)", lambda: kvjax.observe(batch, params), "reject")
    probe("summarize(batch-leading)", lambda: kvjax.summarize(batch, params), "reject")
    probe(
        "step_env(batch-leading)",
        lambda: env.step_env(None, batch, jnp.zeros(3, jnp.int32), params),
        "reject",
    )
    probe(
        "reset_env(batched keys)",
        lambda: env.reset_env(jax.random.split(jax.random.PRNGKey(0), 4), params),
        "reject",
    )
    probe("rubric(single)", lambda: kvjax.rubric(single, params), "ok")
    trailing = kvjax.cache.rollout.to_trailing(batch)
    probe("rubric(trailing)", lambda: kvjax.rubric(trailing, params), "ok")
    step = env.step_env

    def counted_invalid(action, n_invalid=1):
        _, s1, *_ = step(None, single, action, params)
        if int(s1.counters.invalid_actions) != n_invalid or int(s1.counters.evictions) != 0:
            return None  # wrapped into a valid action: reported as a clamp below
        return "counted invalid"

    for label, action in (
        ("int64 2**32+1", np.array([2**32 + 1, 0, 0], np.int64)),
        ("list 2**32+1", [2**32 + 1, 0, 0]),
        ("uint32 2**31+5", np.array([2**31 + 5, 0, 0], np.uint32)),
        ("int64 -2**32+1", np.array([-(2**32) + 1, 0, 0], np.int64)),
        ("int32 97", np.array([97, 0, 0], np.int32)),
        ("jnp int32 -1", jnp.array([-1, 0, 0], jnp.int32)),
    ):

        def run(action=action):
            r = counted_invalid(action)
            if r is None:
                raise RuntimeError("out-of-range id acted (wrapped)")
            return r

        probe(f"step_env action {label}", run, "ok")
    for label, action in (
        ("float", np.array([1.0, 0, 0])),
        ("shape (2,)", np.zeros(2, int)),
        ("shape (3,1)", np.zeros((3, 1), int)),
    ):
        probe(f"step_env action {label}", lambda a=action: step(None, single, a, params), "reject")


def session_probes() -> None:
    s = Session.new("hard", 0, 0)
    calls = {
        "deep object": ("evict", '{"a":' * 50_000 + "1" + "}" * 50_000),
        "deep list": ("evict", "[" * 50_000 + "]" * 50_000),
        "huge int": ("evict", json.dumps({"seq_id": 2**80})),
        "NaN": ("evict", '{"seq_id": NaN}'),
        "Infinity": ("compress", '{"seq_id": Infinity}'),
        "float": ("evict", '{"seq_id": 1.0}'),
        "string id": ("evict", '{"seq_id": "1"}'),
        "null": ("evict", "null"),
        "list args": ("evict", "[1]"),
        "extra key": ("evict", '{"seq_id": 1, "x": 2}'),
        "bytes args": ("evict", b'{"seq_id": 1}'),
        "int args": ("evict", 5),
        "name None": (None, "{}"),
        "name list": (["evict"], "{}"),
        "name long": ("e" * 10_000, "{}"),
        "keep with args": ("keep", '{"seq_id": 1}'),
        "negative id": ("swap_to_cpu", '{"seq_id": -1}'),
        "bool id": ("evict", '{"seq_id": true}'),
        "bad json": ("evict", '{"seq_id": '),
    }
    for label, (name, args) in calls.items():

        def run(name=name, args=args):
            r = s.call(name, args)
            if r.ok:
                raise RuntimeError(f"accepted: {r.text}")
            return r.text

        probe(f"Session.call {label}", run, "ok")
    for label, kw in (
        ("seed -1", dict(seed=-1)),
        ("seed 2**32", dict(seed=2**32)),
        ("seed 2**63", dict(seed=2**63)),
        ("seed '1'", dict(seed="1")),
        ("seed 1.5", dict(seed=1.5)),
        ("seed True", dict(seed=True)),
        ("index -1", dict(index=-1)),
        ("index 2**40", dict(index=2**40)),
        ("index 1.0", dict(index=1.0)),
        ("difficulty 7", dict(difficulty=7)),
    ):
        probe(
            f"Session.new {label}",
            lambda kw=kw: Session.new(**{"difficulty": "hard", **kw}),
            "reject",
        )
    data = s.to_json()
    muts = {
        "no version": lambda d: d.pop("version"),
        "no config": lambda d: d.pop("config"),
        "no params": lambda d: d.pop("params"),
        "config extra": lambda d: d["config"].__setitem__("x", 1),
        "config -1": lambda d: d["config"].__setitem__("max_seqs", -1),
        "config str": lambda d: d["config"].__setitem__("max_seqs", "32"),
        "params nan": lambda d: d["params"].__setitem__("arrival_scale", math.nan),
        "params 0 bw": lambda d: d["params"].__setitem__("swap_bandwidth", 0.0),
        "params unknown": lambda d: d["params"].__setitem__("x", 1.0),
        "params list": lambda d: d.__setitem__("params", [1]),
        "state nan": lambda d: d["state"].__setitem__("time", math.nan),
        "state 1.5": lambda d: d["state"].__setitem__("time", 1.5),
        "state 2**40": lambda d: d["state"].__setitem__("time", 2**40),
        "state str": lambda d: d["state"].__setitem__("time", "3"),
        "state ragged": lambda d: d["state"]["slots"].__setitem__("tokens", [[1], [2, 3]]),
        "state shape": lambda d: d["state"]["slots"].__setitem__("tokens", [1, 2]),
        "state missing": lambda d: d["state"].pop("slots"),
        "buffer 1.5": lambda d: d.__setitem__("buffer", [1.5]),
        "buffer 10**6": lambda d: d.__setitem__("buffer", [10**6]),
        "buffer str": lambda d: d.__setitem__("buffer", "12"),
        "buffer 4 ids": lambda d: d.__setitem__("buffer", [1, 2, 3, 4]),
        "actions short": lambda d: d.__setitem__("actions", [[0]]),
        "rewards nan": lambda d: d.__setitem__("rewards", [math.nan]),
        "rewards str": lambda d: d.__setitem__("rewards", ["0.1"]),
    }
    for label, mut in muts.items():

        def run(mut=mut):
            d = copy.deepcopy(data)
            mut(d)
            return Session.from_json(d)

        probe(f"Session.from_json {label}", run, "reject")
    probe("Session.from_json list", lambda: Session.from_json([1]), "reject")


def rollout_probes(env, params) -> None:
    pol = kvjax.cache.policies.POLICIES["keep"]
    key = jax.random.PRNGKey(0)
    for label, kw in (
        ("n=0", dict(n=0)),
        ("n=-1", dict(n=-1)),
        ("n=2.5", dict(n=2.5)),
        ("n=True", dict(n=True)),
        ("n='4'", dict(n="4")),
        ("n=2**40", dict(n=2**40)),
        ("chunk 0", dict(chunk_size=0)),
        ("chunk 2.5", dict(chunk_size=2.5)),
        ("micro -1", dict(micro_batch=-1)),
        ("keys batch", dict(key=jax.random.split(key, 3))),
        ("params tree_map nan", dict(params=jax.tree_util.tree_map(lambda x: math.nan, params))),
        ("policy None", dict(policy=None)),
    ):
        kw = dict(kw)
        n = kw.pop("n", 4)
        k = kw.pop("key", key)
        p = kw.pop("params", params)
        po = kw.pop("policy", pol)
        probe(
            f"rollout {label}",
            lambda n=n, k=k, p=p, po=po, kw=kw: rollout(po, k, n, p, env, progress=False, **kw),
            "reject",
        )
    probe("rollout ok", lambda: rollout(pol, key, 4, params, env, progress=False)["total"], "ok")
    # Extreme but allowed values: whole episodes must stay finite (no silent NaN / inf).
    va = kvjax.cache.policies.POLICIES["value_aware"]
    extremes = {  # each field's allowed extremes (kvjax.cache.types.PARAM_SPECS)
        "kv_cache_bytes": (1.0, 2.0**60),
        "kv_bytes_per_token": (1.0, 2.0**30),
        "swap_bandwidth": (1.0, 1e15),
        "step_seconds": (1e-30, 86400.0),
        "decode_tokens_per_step": (1, 2**31 - 1),
        "arrival_scale": (0.0, 3e38),
        "admit_watermark": (0.0, 1.0),
        "max_wait_steps": (1, 2**31 - 1),
        "throughput_target_tokens": (1e-30, 3e38),
        "latency_scale": (0.0, 3e38),
        "latency_cap": (0.0, 3e38),
        "w_failure": (0.0, 1e6),
        "w_latency": (0.0, 1e6),
    }
    for field, values in extremes.items():
        for v in values:
            p = params.replace(**{field: v})
            for pname, po in (("keep", pol), ("value_aware", va)):
                probe(
                    f"episode {pname} {field}={v:g}",
                    lambda p=p, po=po: rollout(po, key, 8, p, env, progress=False),
                    "ok",
                )


def cli_probes(tmp: str) -> None:
    a_file = os.path.join(tmp, "file")
    open(a_file, "w").close()
    kv = [
        ["eval", "--policy", "lru", "--seed", "4294967296"],
        ["eval", "--policy", "lru", "--seed", str(2**63)],
        ["eval", "--policy", "lru", "--seed", "-1"],
        ["eval", "--policy", "lru", "--seed", "nan"],
        ["eval", "--policy", "lru", "--num-scenarios", "0"],
        ["eval", "--policy", "lru", "--num-scenarios", "1e3"],
        ["eval", "--policy", "lru", "--num-scenarios", str(2**40)],
        ["eval", "--policy", "nope"],
        ["eval", "--policy", "lru", "--difficulty", "7"],
        ["eval"],
        ["demo", "--seed", "-5"],
        ["demo", "--out-dir", a_file],
        ["demo", "--policies", "bogus"],
        ["bench", "--repeats", "0"],
        ["bench", "--batch-sizes", "-4"],
        ["bench", "--write", os.path.join(a_file, "x.md")],
        ["bench", "--write", tmp],
        ["leaderboard", "--output", os.path.join(a_file, "x", "y.md")],
        ["leaderboard", "--seed", "99999999999"],
        ["leaderboard", "--num-scenarios", "-1"],
        ["eval-llm", "--policy", "keep", "--seed", "-1"],
        ["eval-llm", "--policy", "keep", "-n", "0"],
        ["eval-llm", "--policy", "nope"],
        ["eval-llm", "--policy", "keep", "-m", "x"],
        ["eval-llm", "--difficulty", "hard"],
        ["eval-llm", "-m", "m", "--base-url", "http://127.0.0.1:9/v1", "--output-dir", a_file],
        ["frobnicate"],
        [],
    ]
    for argv in kv:
        probe_cli("kvjax " + " ".join(argv)[:70], cli.main, argv)
    from train import evaluate, ppo

    for argv in (
        ["--lr", "nan"],
        ["--lr", "-1"],
        ["--lr", "inf"],
        ["--ent-coef", "nan"],
        ["--time-limit", "-1"],
        ["--seed", str(2**32)],
        ["--seeds", "0"],
        ["--num-envs", "0"],
        ["--num-envs", "10", "--minibatches", "4", "--out", tmp],
        ["--total-steps", "1.5"],
        ["--hidden", "-1"],
        ["--difficulty", "x"],
        ["--out", a_file],
        ["--resume", os.path.join(tmp, "missing.msgpack")],
        ["--resume", a_file],
        ["--cpu-devices", "0"],
    ):
        probe_cli("train.ppo " + " ".join(argv)[:60], ppo.main, argv)
    for argv in (
        [os.path.join(tmp, "missing.msgpack")],
        [a_file],
        ["x", "--difficulty", "extreme"],
        ["x", "--num-scenarios", "1"],
        ["x", "--eval-seed", "-1"],
        ["x", "--out", os.path.join(a_file, "t.md")],
    ):
        probe_cli("train.evaluate " + " ".join(argv)[:60], evaluate.main, argv)
    from train import bench as train_bench

    for argv in (
        ["--updates", "0"],
        ["--repeats", "-1"],
        ["--cpu-devices", "0"],
        ["--configs", "64:16:1:3"],
        ["--configs", "64:16"],
        ["--configs", "64:16:1:4", "--difficulty", "x"],
    ):
        probe_cli("train.bench " + " ".join(argv), train_bench.main, argv)
    from kvjax.cache.llm.session import main as session_main

    for argv in (
        ["--seed", "-1"],
        ["-n", "0"],
        ["--policy", "nope", "-n", "1"],
        ["--difficulty", "x"],
    ):
        probe_cli("kvjax.cache.llm.session " + " ".join(argv), session_main, argv)


def train_probes() -> None:
    import dataclasses

    from train.ppo import PPOConfig

    base = PPOConfig()
    for k, v in (
        ("lr", math.nan),
        ("lr", 0.0),
        ("lr", -1.0),
        ("gamma", 1.5),
        ("gamma", math.nan),
        ("gae_lambda", -0.1),
        ("clip_eps", 0.0),
        ("ent_coef", math.inf),
        ("vf_coef", -1.0),
        ("max_grad_norm", 0.0),
        ("num_envs", 2.5),
        ("hidden", True),
        ("total_steps", 0),
        ("anneal_lr", "yes"),
        ("difficulty", "x"),
    ):
        probe(
            f"PPOConfig({k}={v!r})", lambda k=k, v=v: dataclasses.replace(base, **{k: v}), "reject"
        )


def main() -> int:
    verbose = "--verbose" in sys.argv
    env, params = kvjax.make("kv-cache-v0", difficulty="hard")
    _, single = env.reset_env(jax.random.PRNGKey(0), params)
    _, batch = jax.vmap(env.reset_env, in_axes=(0, None))(
        jax.random.split(jax.random.PRNGKey(0), 4), params
    )
    params_probes()
    make_probes()
    state_probes(env, params, single, batch)
    session_probes()
    rollout_probes(env, params)
    train_probes()
    with tempfile.TemporaryDirectory() as tmp:
        cli_probes(tmp)
    counts = {
        k: sum(1 for _, o, _ in RESULTS if o == k)
        for k in ("ok", "traceback", "silent NaN", "silent clamp")
    }
    for name, outcome, detail in RESULTS:
        if verbose or outcome != "ok":
            print(f"[{outcome}] {name}: {detail}")
    print(json.dumps({"probes": len(RESULTS), **counts}))
    return 0 if counts["ok"] == len(RESULTS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
