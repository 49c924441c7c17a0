"""The kv-serve-v0 leaderboard (`kvjax leaderboard --env kv-serve-v0`, written to
docs/serving-leaderboard.md): every baseline, the offline Belady policy (labelled) and the
unlimited-KV reference per workload x load, paired on the same windows.

- Paired: every policy runs the same scenarios (the same key: the same request windows, common
  random numbers), so a difference against `engine_default` is a paired difference.
- Intervals: mean ± 1.96 standard errors over scenarios (normal approximation).
- Unlimited-KV reference (`reference_setting`): the same windows with a GPU pool no window can
  fill (UNLIMITED_POOL_TOKENS) and, for workloads with many segments, REFERENCE_SEGMENTS rows of
  the segment table, under the engine default: an upper bound on hit rate and a reference for
  goodput (not a bound on it: an unlimited pool admits larger batches, which lengthens TPOT).
- Normalised headroom of a policy (goodput): (policy - default) / (reference - default), from
  the paired differences; its interval by the delta method. n/a when the reference is not
  above the default beyond noise (mean paired difference <= its 95% half-interval): a ratio
  to noise means nothing.
- Roofline capacity (capacity.py): the preset's requests/s bound for the workload's lengths;
  `load` is offered rate / capacity.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from kvjax.serve import env as serve_env
from kvjax.serve.policies import SERVE_POLICY_NAMES, label, make_policy
from kvjax.serve.presets import PRESETS
from kvjax.serve.rollout import episode_until_truncated
from kvjax.stats import Z95, mean_ci

WORKLOADS = ("synthetic", "azure-conv", "azure-code", "mooncake-conv", "agentic")
LOADS = (0.6, 0.9, 1.1)
PRESET = "h100-llama3-8b"
DEFAULT = "engine_default"
# Every policy of the registry but `random` (a smoke test, not a baseline).
POLICIES = tuple(n for n in SERVE_POLICY_NAMES if n != "random")
REFERENCE = "unlimited-KV reference"
# A GPU pool no window of the benchmark fills (tokens; the h100 preset has 440K).
UNLIMITED_POOL_TOKENS = 1 << 26
# Segment rows of the reference for workloads with many segments (agentic, traces with
# prefixes): with G rows a new segment recycles an evictable row once G keys are cached.
REFERENCE_SEGMENTS = 256
COLUMNS = (
    ("goodput", "goodput req/s", "{:.3f}"),
    ("slo_attainment", "SLO attainment", "{:.3f}"),
    ("p99_ttft", "p99 TTFT s", "{:.2f}"),
    ("p99_tpot", "p99 TPOT ms", "{:.0f}"),
    ("hit_rate", "hit rate", "{:.3f}"),
    ("preemptions_per_s", "preemptions/s", "{:.2f}"),
)
SCALE = dict(p99_tpot=1000.0)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One block of the leaderboard: a preset, workloads, loads and ServeParams overrides."""

    preset: str = PRESET
    workloads: tuple[str, ...] = WORKLOADS
    loads: tuple[float, ...] = LOADS
    overrides: tuple[tuple[str, float], ...] = ()
    title: str = ""

    def describe(self) -> str:
        over = ", ".join(f"{k}={v:g}" for k, v in self.overrides)
        return f"{self.preset}, vLLM rules" + (f", {over}" if over else "")


# Where the pool binds (docs/serving-leaderboard.md, extra section): a small toy pool.
EXTRA = (
    Setting(
        preset="toy",
        workloads=("agentic",),
        loads=(1.1, 3.0),
        overrides=(("gpu_pool_tokens", 40000.0),),
        title="Where the pool binds: toy preset, agentic, GPU pool 40,000 tokens",
    ),
)


def check_args(
    setting: Setting,
    policies: Sequence[str] = POLICIES,
    horizon: float = 60.0,
    num_scenarios: int = 8,
) -> None:
    """ValueError naming the allowed values, before any work (every env is made: a horizon
    longer than a trace's window fails here)."""
    if setting.preset not in PRESETS:
        raise ValueError(f"unknown preset {setting.preset!r}; allowed: {list(PRESETS)}")
    for name in policies:
        if name not in SERVE_POLICY_NAMES:
            raise ValueError(
                f"unknown kv-serve-v0 policy {name!r}; allowed: {list(SERVE_POLICY_NAMES)}"
            )
    if DEFAULT not in policies:
        raise ValueError(f"policies must include {DEFAULT!r} (differences are paired to it)")
    if not setting.workloads or not setting.loads:
        raise ValueError("at least one workload and one load are needed")
    if not (isinstance(num_scenarios, int) and num_scenarios >= 1):
        raise ValueError(f"num_scenarios must be an int >= 1, got {num_scenarios!r}")
    for load in setting.loads:
        if not (math.isfinite(load) and load > 0):
            raise ValueError(f"loads must be finite numbers > 0, got {load!r}")
    for w in setting.workloads:
        serve_env.workload_source(w)  # names the allowed workloads
        for load in setting.loads:
            make_env(setting, w, load, horizon)


def make_env(setting: Setting, workload: str, load: float, horizon: float):
    return serve_env.make(
        preset=setting.preset,
        workload=workload,
        load=float(load),
        horizon=float(horizon),
        **dict(setting.overrides),
    )


def reference_setting(env: serve_env.ServeEnv, params) -> tuple[serve_env.ServeEnv, Any]:
    """The unlimited-KV reference of a (env, params): the same stream (same workload draws and
    arrival rate), a pool no window fills and, where segments are many, REFERENCE_SEGMENTS
    segment rows."""
    cfg = env.config
    many = cfg.agentic or (cfg.trace is not None and cfg.trace.has_prefixes)
    if many and cfg.max_segments < REFERENCE_SEGMENTS:
        cfg = dataclasses.replace(cfg, max_segments=REFERENCE_SEGMENTS)
    p = params.replace(gpu_pool_tokens=np.int32(UNLIMITED_POOL_TOKENS))
    return serve_env.ServeEnv(cfg, serve_env.normalize_params(p)), serve_env.normalize_params(p)


@functools.lru_cache(maxsize=16)
def _runner(cfg, names: tuple[str, ...]):
    """jit of (key, indices [m, micro], params, which) -> metrics of policy names[which] on
    those scenarios: one compile for every policy of a config (lax.switch on an unbatched index
    runs the chosen branch only). Each scenario is rollout's episode (rollout.
    episode_until_truncated: the same scenario keys, so the same windows as `kvjax eval`)."""
    env = serve_env.ServeEnv(cfg)
    branches = [make_policy(n, env) for n in names]

    def run(key, idx, params, which):
        def policy(k, state, p):
            return jax.lax.switch(which, branches, k, state, p)

        one = jax.vmap(lambda i: episode_until_truncated(policy, env, key, i, params))
        return jax.lax.map(one, idx)

    return jax.jit(run)


def run_policy(names, which: int, key, num_scenarios: int, params, cfg) -> dict:
    """Per-scenario metrics (numpy) of policy names[which] on scenarios 0..n-1."""
    micro = max(1, math.ceil(num_scenarios / 4))
    m = math.ceil(num_scenarios / micro)
    idx = jnp.arange(m * micro, dtype=jnp.int32).reshape(m, micro)
    out = _runner(cfg, tuple(names))(key, idx, serve_env.normalize_params(params), which)
    return {k: np.asarray(v).reshape(-1)[:num_scenarios] for k, v in out.items()}


def evaluate(
    setting: Setting,
    policies: Sequence[str] = POLICIES,
    horizon: float = 60.0,
    num_scenarios: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """{workload: {"capacity": req/s, "loads": {load: {"offered": req/s, "runs": {policy or
    REFERENCE: per-scenario metrics}}}}}; every run on the same key (the same windows)."""
    check_args(setting, policies, horizon, num_scenarios)
    key = jax.random.PRNGKey(seed)
    order = tuple([DEFAULT] + [p for p in policies if p != DEFAULT])
    total = len(setting.workloads) * len(setting.loads) * (len(order) + 1)
    bar = tqdm(total=total, desc="serve leaderboard", disable=not progress)
    out: dict = {}
    for w in setting.workloads:
        block: dict = {"loads": {}}
        for load in setting.loads:
            env, p = make_env(setting, w, load, horizon)
            offered = float(p.arrival_rate) * float(p.calls_per_arrival)
            block["capacity"] = offered / float(load)
            runs = {}
            for i, name in enumerate(order):
                bar.set_postfix_str(f"{w} {load:g} {name}")
                runs[name] = run_policy(order, i, key, num_scenarios, p, env.config)
                bar.update()
            ref_env, ref_p = reference_setting(env, p)
            bar.set_postfix_str(f"{w} {load:g} reference")
            # (the same compiled runner as the policies' when the config is unchanged)
            runs[REFERENCE] = run_policy(order, 0, key, num_scenarios, ref_p, ref_env.config)
            bar.update()
            block["loads"][load] = {"offered": offered, "runs": runs}
        out[w] = block
    bar.close()
    return out


# -- statistics --------------------------------------------------------------------------------
def headroom(d_policy: np.ndarray, d_ref: np.ndarray) -> tuple[float, float] | None:
    """(policy - default) / (reference - default) from paired differences, with a 95%
    half-interval (delta method); None when the reference is not above the default beyond
    noise (its mean paired difference <= its 95% half-interval, or ~0)."""
    dp, dr = np.asarray(d_policy, np.float64), np.asarray(d_ref, np.float64)
    mr, half_r = mean_ci(dr)
    if not mr > max(half_r, 1e-9):
        return None
    h = float(dp.mean() / mr)
    n = len(dp)
    if n < 2:
        return h, 0.0
    c = np.cov(np.stack([dp, dr]), ddof=1)
    var = (c[0, 0] - 2 * h * c[0, 1] + h * h * c[1, 1]) / (n * mr * mr)
    return h, float(Z95 * math.sqrt(max(var, 0.0)))


def rows(block: dict, load: float) -> list[dict]:
    """One row per policy (the default first, the reference last): (mean, ci) per column, the
    paired goodput difference and the normalised headroom."""
    runs = block["loads"][load]["runs"]
    base = np.asarray(runs[DEFAULT]["goodput"], np.float64)
    d_ref = np.asarray(runs[REFERENCE]["goodput"], np.float64) - base
    out = []
    for name, res in runs.items():
        row = {"policy": name}
        for col, _, _ in COLUMNS:
            row[col] = mean_ci(np.asarray(res[col], np.float64) * SCALE.get(col, 1.0))
        d = np.asarray(res["goodput"], np.float64) - base
        row["delta"] = mean_ci(d) if name != DEFAULT else None
        row["headroom"] = headroom(d, d_ref) if name not in (DEFAULT, REFERENCE) else None
        out.append(row)
    return out


def spread(block: dict, load: float) -> dict:
    """Best and worst online policy (not offline, not the reference) by mean goodput, and
    whether any online policy differs from the default beyond its paired interval."""
    from kvjax.serve.policies import OFFLINE_POLICIES

    rs = [r for r in rows(block, load) if r["policy"] not in (REFERENCE, *OFFLINE_POLICIES)]
    best = max(rs, key=lambda r: r["goodput"][0])
    worst = min(rs, key=lambda r: r["goodput"][0])
    separated = [
        r["policy"] for r in rs if r["delta"] is not None and abs(r["delta"][0]) > r["delta"][1]
    ]
    return dict(best=best, worst=worst, separated=separated)


# -- the document ------------------------------------------------------------------------------
def _pm(mc: tuple[float, float] | None, fmt: str, sign: bool = False) -> str:
    if mc is None:
        return "-"
    m, h = mc
    f = fmt.replace("{:", "{:+") if sign else fmt
    return f"{f.format(m)} ± {fmt.format(h)}"


def table(block: dict, load: float) -> list[str]:
    head = ["policy", *(c[1] for c in COLUMNS), "Δ goodput vs default", "headroom"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows(block, load):
        name = r["policy"]
        shown = f"**{REFERENCE}**" if name == REFERENCE else label(name)
        cells = [_pm(r[c], fmt) for c, _, fmt in COLUMNS]
        cells.append(_pm(r["delta"], "{:.3f}", sign=True))
        hr = r["headroom"]
        if name in (DEFAULT, REFERENCE):
            cells.append("-")
        else:
            cells.append("n/a" if hr is None else _pm(hr, "{:.2f}", sign=True))
        lines.append(f"| {shown} | " + " | ".join(cells) + " |")
    return lines


def section(setting: Setting, results: dict, level: str = "##") -> list[str]:
    lines = []
    for w, block in results.items():
        unit = "calls/s" if w == "agentic" else "req/s"
        lines += [
            f"{level} {w} ({setting.describe()})",
            "",
            f"Roofline capacity (capacity.py): {block['capacity']:.2f} {unit}; offered at load "
            + ", ".join(f"{ld:g}: {v['offered']:.2f}" for ld, v in block["loads"].items())
            + f" {unit}.",
            "",
        ]
        for load in block["loads"]:
            lines += [f"Load {load:g}:", "", *table(block, load), ""]
    return lines


def spread_lines(setting: Setting, results: dict, load: float) -> list[str]:
    """The spread between the best and the worst online policy per workload at `load`."""
    lines = [
        "| workload | best online policy | worst online policy | spread req/s | "
        "differs from the default beyond its interval |",
        "|---|---|---|---:|---|",
    ]
    for w, block in results.items():
        if load not in block["loads"]:
            continue
        s = spread(block, load)
        b, wo = s["best"], s["worst"]
        lines.append(
            f"| {w} | {b['policy']} ({b['goodput'][0]:.3f}) | {wo['policy']} "
            f"({wo['goodput'][0]:.3f}) | {b['goodput'][0] - wo['goodput'][0]:.3f} | "
            f"{', '.join(s['separated']) or 'none'} |"
        )
    return lines


def document(
    blocks: Sequence[tuple[Setting, dict]],
    horizon: float,
    num_scenarios: int,
    seed: int,
    command: str,
    notes: str = "",
) -> str:
    """The full docs/serving-leaderboard.md text (deterministic: no timings)."""
    head = [
        "# kv-serve-v0 leaderboard",
        "",
        f"Regenerate with `{command}` (writes this file). Every policy runs the same "
        f"{num_scenarios} scenarios (seed {seed}: the same request windows) of {horizon:g} "
        "simulated seconds per workload and load; each cell is the mean over scenarios ± the "
        "half-width of its 95% interval (1.96 standard errors). `load` is the offered rate as a "
        "fraction of the preset's roofline capacity for the workload (capacity.py); agentic "
        "rates count calls. Goodput: requests finished within both SLOs (TTFT <= 2 s, "
        "TPOT <= 100 ms) per second. Δ goodput: the paired difference against `engine_default` "
        "on the same windows.",
        "",
        "- `belady_offline` is **offline**: it reads the future (arrivals, tool return times, "
        "true output lengths; serve/offline.py) - a bound for the online policies, not a "
        "deployable one.",
        f"- The **{REFERENCE}** replays the same windows with a GPU pool of "
        f"{UNLIMITED_POOL_TOKENS:,} tokens (nothing is evicted or preempted for memory) and "
        f"{REFERENCE_SEGMENTS} segment rows for agentic and prefix traces, under the engine "
        "default: a bound on what the cache can hit (see hit rate below), a reference (not a "
        "bound) for goodput - an "
        "unlimited pool admits larger batches, which lengthens TPOT.",
        "- headroom = (policy - default) / (reference - default) in goodput, from the paired "
        "differences (95% interval by the delta method); **n/a** when the reference is not "
        "above the default beyond noise (its paired difference within its 95% interval): "
        "dividing by noise means nothing.",
        "- hit rate = prompt tokens served from the prefix cache / prompt tokens looked up, at "
        "every fresh admission - including re-admissions after a recompute preemption, which hit "
        "their prefix again. The reference (no preemption) can therefore show a lower hit rate "
        "than a policy that preempts; it bounds the hits of requests' lookups at unchanged "
        "admission times (tests/serve/test_leaderboard.py).",
        "",
    ]
    if notes:
        head += [notes, ""]
    body: list[str] = []
    for setting, results in blocks:
        if setting.title:
            body += [f"## {setting.title}", ""]
        main_load = 0.9 if 0.9 in setting.loads else setting.loads[-1]
        body += [f"Spread at load {main_load:g} ({setting.describe()}):", ""]
        body += spread_lines(setting, results, main_load) + [""]
        quiet = [w for w, b in results.items() if not spread(b, main_load)["separated"]]
        if quiet:
            body += [
                f"At load {main_load:g}, every online policy is within its 95% interval of the "
                f"engine default on: {', '.join(quiet)}.",
                "",
            ]
        body += section(setting, results, "###" if setting.title else "##")
    return "\n".join(head + body).rstrip() + "\n"


__all__ = [
    "EXTRA",
    "LOADS",
    "POLICIES",
    "REFERENCE",
    "Setting",
    "WORKLOADS",
    "check_args",
    "document",
    "evaluate",
    "headroom",
    "reference_setting",
    "rows",
]


# -- command line (kvjax leaderboard --env kv-serve-v0) ----------------------------------------
def setting_from_args(preset, workloads, loads, overrides) -> Setting:
    """A Setting from CLI values (None: the defaults); overrides are NAME=NUMBER strings
    (ValueError naming the ServeParams fields)."""
    over = tuple(serve_env.parse_overrides(overrides or ()).items())
    return Setting(
        preset=preset or PRESET,
        workloads=tuple(workloads or WORKLOADS),
        loads=tuple(float(x) for x in (loads or LOADS)),
        overrides=tuple(over),
    )


def command_line(args) -> str:
    """The command that regenerates the document (defaults left out)."""
    parts = ["kvjax leaderboard --env kv-serve-v0"]
    s: Setting = args.setting
    if s.preset != PRESET:
        parts.append(f"--preset {s.preset}")
    if s.workloads != WORKLOADS:
        parts.append("--workloads " + " ".join(s.workloads))
    if s.loads != LOADS:
        parts.append("--loads " + " ".join(f"{x:g}" for x in s.loads))
    if tuple(args.policies) != POLICIES:
        parts.append("--policies " + " ".join(args.policies))
    if s.overrides:
        parts.append("--set " + " ".join(f"{k}={v:g}" for k, v in s.overrides))
    parts.append(f"--horizon {args.horizon:g} --num-scenarios {args.num_scenarios}")
    if args.seed:
        parts.append(f"--seed {args.seed}")
    if args.extra is False:
        parts.append("--no-extra")
    return " ".join(parts)


def main(args) -> int:
    """Run the settings (and EXTRA unless --no-extra), write the document, print a summary and
    the wall time (kept out of the document, so regeneration is byte-identical)."""
    import time
    from pathlib import Path

    t0 = time.perf_counter()
    settings = [args.setting] + ([] if args.extra is False else list(EXTRA))
    blocks = []
    for s in settings:
        results = evaluate(s, args.policies, args.horizon, args.num_scenarios, args.seed)
        blocks.append((s, results))
    text = document(
        blocks, args.horizon, args.num_scenarios, args.seed, command_line(args), args.note
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    for s, results in blocks:
        load = 0.9 if 0.9 in s.loads else s.loads[-1]
        print(f"spread at load {load:g} ({s.describe()}):")
        print("\n".join(spread_lines(s, results, load)))
    print(f"wrote {args.output} in {time.perf_counter() - t0:.0f} s")
    return 0
