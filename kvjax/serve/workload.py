"""Open-loop synthetic workloads calibrated to the Azure LLM inference 2023 traces.

A scenario's request stream is a pure function of (scenario seed, request index): request i's
inter-arrival gap, prompt and output lengths and prefix come from hashed counters
`8 * i + j` (kvjax.rng), so the engine draws a request when it arrives (reset is O(table), not
O(future requests)) and an oracle can read any request ahead.

- Gaps: lognormal with mean 1 / arrival_rate and sigma `gap_sigma` (per workload, fitted so
  that per-second arrival counts have the trace's variance / mean: 1.39 for conversation with
  sigma 1.0, 13.2 for code with sigma 2.77; fitted by simulation, scripts/fit_workloads.py).
- Lengths: the inverse of the trace's empirical CDF at the 101 percentiles below (linear
  between them), so every percentile of the trace is reproduced; input and output lengths are
  drawn independently (their log-correlation in the traces is 0.09 and 0.00). Outputs are
  clipped to `max_tokens`, prompts to `max_model_len - max_tokens`.
- Prefixes: with probability `prefix_share` a request's prompt starts with one of
  `num_prefixes` shared system prompts of `prefix_tokens` tokens (rounded down to whole blocks;
  only when the prompt is longer than that), which the prefix cache can share.

Tables: percentiles 0..100 of ContextTokens and GeneratedTokens of azure2023_conv.csv (19,366
requests) and azure2023_code.csv (8,819), Azure LLM inference trace 2023, CC-BY-4.0
(kvjax/serve/NOTICE).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from kvjax import rng
from kvjax.serve import replay
from kvjax.serve.types import BLOCK_TOKENS, ServeConfig, ServeParams

WORKLOADS = ("synthetic-conv", "synthetic-code")
ALIASES = {"synthetic": "synthetic-conv"}
# Lognormal sigma of inter-arrival gaps giving the trace's per-second variance / mean.
GAP_SIGMA = (1.0, 2.77)
DRAWS_PER_REQUEST = 8

INPUT_PERCENTILES = (
    (
        2,
        29,
        91,
        161,
        181,
        181,
        191,
        197,
        201,
        203,
        207,
        212,
        222,
        242,
        317,
        372,
        375,
        378,
        381,
        384,
        387,
        390,
        392,
        394,
        395,
        396,
        398,
        399,
        400,
        402,
        403,
        405,
        406,
        408,
        411,
        414,
        419,
        424,
        433,
        456,
        703,
        863,
        903,
        946,
        972,
        984,
        994,
        1002,
        1009,
        1014,
        1020,
        1025,
        1031,
        1036,
        1041,
        1045,
        1050,
        1055,
        1060,
        1065,
        1071,
        1076,
        1081,
        1086,
        1092,
        1097,
        1102,
        1109,
        1116,
        1122,
        1130,
        1139,
        1147,
        1159,
        1171,
        1189,
        1214,
        1249,
        1311,
        1314,
        1315,
        1321,
        1368,
        1508,
        1689,
        1876,
        2032,
        2221,
        2401,
        2584,
        2734,
        3291,
        4073,
        4076,
        4079,
        4083,
        4086,
        4090,
        4098,
        4142,
        14050,
    ),
    (
        3,
        17,
        35,
        50,
        62,
        75,
        88,
        97,
        109,
        130,
        147,
        162,
        179,
        193,
        209,
        232,
        253,
        283,
        319,
        352,
        386,
        423,
        469,
        501,
        539,
        578,
        604,
        651,
        698,
        745,
        770,
        816,
        848,
        880,
        908,
        939,
        969,
        997,
        1027,
        1049,
        1075,
        1105,
        1133,
        1174,
        1205,
        1261,
        1296,
        1346,
        1377,
        1417,
        1469,
        1500,
        1555,
        1600,
        1642,
        1690,
        1724,
        1774,
        1823,
        1873,
        1909,
        1964,
        2024,
        2077,
        2128,
        2164,
        2226,
        2284,
        2329,
        2386,
        2433,
        2480,
        2546,
        2615,
        2671,
        2744,
        2804,
        2896,
        2975,
        3066,
        3192,
        3294,
        3451,
        3599,
        3714,
        3920,
        4107,
        4320,
        4559,
        4759,
        5188,
        5633,
        5959,
        6194,
        6585,
        7303,
        7430,
        7435,
        7436,
        7436,
        7437,
    ),
)
OUTPUT_PERCENTILES = (
    (
        7,
        16,
        24,
        32,
        38,
        41,
        44,
        47,
        49,
        52,
        54,
        57,
        59,
        62,
        64,
        67,
        69,
        71,
        73,
        75,
        77,
        79,
        81,
        82,
        84,
        85,
        86,
        87,
        89,
        90,
        91,
        92,
        93,
        94,
        95,
        96,
        97,
        99,
        100,
        101,
        103,
        105,
        107,
        108,
        110,
        113,
        116,
        118,
        122,
        125,
        129,
        133,
        137,
        141,
        145,
        151,
        156,
        161,
        163,
        169,
        177,
        182,
        190,
        202,
        216,
        217,
        237,
        371,
        375,
        378,
        384,
        387,
        390,
        393,
        394,
        395,
        396,
        396,
        397,
        398,
        400,
        402,
        404,
        407,
        410,
        411,
        414,
        415,
        417,
        420,
        424,
        428,
        429,
        433,
        442,
        451,
        468,
        509,
        540,
        601,
        1000,
    ),
    (
        6,
        6,
        6,
        6,
        6,
        6,
        6,
        6,
        6,
        7,
        7,
        7,
        7,
        7,
        7,
        7,
        8,
        8,
        8,
        8,
        8,
        8,
        9,
        9,
        9,
        9,
        9,
        9,
        9,
        9,
        9,
        10,
        10,
        10,
        10,
        10,
        10,
        11,
        11,
        11,
        11,
        11,
        12,
        12,
        12,
        12,
        12,
        13,
        13,
        13,
        13,
        13,
        13,
        14,
        14,
        14,
        14,
        15,
        15,
        15,
        16,
        16,
        16,
        17,
        17,
        18,
        18,
        19,
        19,
        19,
        20,
        21,
        21,
        22,
        23,
        24,
        25,
        26,
        27,
        28,
        29,
        31,
        32,
        34,
        37,
        39,
        42,
        45,
        48,
        52,
        55,
        59,
        65,
        72,
        79,
        90,
        105,
        128,
        171,
        251,
        1899,
    ),
)


def workload_index(name: str) -> int:
    """'synthetic-conv' | 'synthetic-code' | 'synthetic' -> index into WORKLOADS."""
    name = ALIASES.get(name, name)
    if name not in WORKLOADS:
        raise ValueError(
            f"unknown workload {name!r}; allowed: {sorted(WORKLOADS + tuple(ALIASES))}"
        )
    return WORKLOADS.index(name)


def _inverse_cdf(table: chex.Array, u: chex.Array) -> chex.Array:
    """Piecewise-linear inverse CDF through percentiles 0..100 at u in (0, 1)."""
    pos = u * 100.0
    i = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, 99)
    lo, hi = table[i], table[i + 1]
    return lo + (pos - i.astype(jnp.float32)) * (hi - lo)


def draw_request(
    seed: chex.Array, index: chex.Array, params: ServeParams, cfg: ServeConfig | None = None
) -> dict:
    """Request `index` of the stream: its gap after the previous arrival (request 0: after time
    0), prompt, output length, max_tokens and prefix fields (segment and prefix length, the
    fallback segment, the published segment and its length; keys -1 for none). With a trace in
    `cfg`, `index` is a row of the trace (serve/replay.py)."""
    if cfg is not None and cfg.trace is not None:
        return replay.draw(cfg.trace, jnp.asarray(index, jnp.int32), params)
    if cfg is not None and cfg.agentic:
        d = draw_session(seed, index, params, cfg)
        d.pop("turns")
        return d
    counters = jnp.asarray(index, jnp.uint32)[..., None] * DRAWS_PER_REQUEST + jnp.arange(
        5, dtype=jnp.uint32
    )
    u = rng.uniform(rng.hash_words(seed, counters))
    w = jnp.asarray(params.workload, jnp.int32)
    rate = jnp.asarray(params.arrival_rate, jnp.float32)
    sigma = jnp.asarray(params.gap_sigma, jnp.float32)
    z = jax.scipy.special.ndtri(u[..., 0])
    gap = jnp.exp(-jnp.log(rate) - 0.5 * sigma * sigma + sigma * z)
    inp = jnp.asarray(INPUT_PERCENTILES, jnp.float32)[w]
    out = jnp.asarray(OUTPUT_PERCENTILES, jnp.float32)[w]
    max_tokens = jnp.asarray(params.max_tokens, jnp.int32)
    output_len = jnp.clip(jnp.round(_inverse_cdf(out, u[..., 2])).astype(jnp.int32), 1, max_tokens)
    prompt = jnp.clip(
        jnp.round(_inverse_cdf(inp, u[..., 1])).astype(jnp.int32),
        1,
        jnp.asarray(params.max_model_len, jnp.int32) - max_tokens,
    )
    plen = (jnp.asarray(params.prefix_tokens, jnp.int32) // BLOCK_TOKENS) * BLOCK_TOKENS
    n_pre = jnp.asarray(params.num_prefixes, jnp.int32)
    has = (u[..., 3] < params.prefix_share) & (prompt > plen) & (plen > 0) & (n_pre > 0)
    which = jnp.minimum((u[..., 4] * n_pre.astype(jnp.float32)).astype(jnp.int32), n_pre - 1)
    return dict(
        gap=gap,
        prompt=prompt,
        output_len=output_len,
        max_tokens=jnp.broadcast_to(max_tokens, prompt.shape),
        segment=jnp.where(has, which, -1),
        segment_up=jnp.full_like(prompt, -1),
        prefix_len=jnp.where(has, plen, 0),
        publish=jnp.full_like(prompt, -1),
        publish_len=jnp.zeros_like(prompt),
    )


def stream_start(seed: chex.Array, params: ServeParams, cfg: ServeConfig | None = None):
    """int32: the stream's first request - a replayed trace's window start, else 0."""
    if cfg is not None and cfg.trace is not None:
        return replay.window_start(cfg.trace, seed, params)
    return jnp.int32(0)


def request_stream(
    seed: chex.Array, n: int, params: ServeParams, cfg: ServeConfig | None = None
) -> dict[str, np.ndarray]:
    """The first `n` requests of a stream as numpy arrays, with absolute `arrival` times
    (float32 running sums in stream order, the same sums the engine forms)."""
    d = _stream_drawer(int(n), cfg)(jnp.asarray(seed, jnp.uint32), params)
    out = {k: np.asarray(v) for k, v in d.items()}
    arrival = np.zeros(n, np.float32)
    t = np.float32(0.0)
    for i in range(n):
        t = np.float32(t + out["gap"][i])
        arrival[i] = t
    out["arrival"] = arrival
    return out


@functools.lru_cache(maxsize=32)
def _stream_drawer(n: int, cfg: ServeConfig | None):
    """jit of the first `n` draws, one per (n, config): a jit made anew on each call of
    request_stream would compile anew each time (~0.2 s, every reference scenario)."""

    @jax.jit
    def draw(seed, params):
        start = stream_start(seed, params, cfg)
        if cfg is not None and cfg.agentic:  # with each session's number of calls
            return draw_session(seed, start + jnp.arange(n), params, cfg)
        return draw_request(seed, start + jnp.arange(n), params, cfg)

    return draw


def length_moments(workload: int, max_tokens: int, max_model_len: int, grid: int = 100_001):
    """(E[prompt], E[prompt^2], E[output]) of a workload after clipping (numpy, exact up to the
    grid) - for capacity estimates outside jit."""
    u = (np.arange(grid) + 0.5) / grid
    pos = u * 100.0
    i = np.clip(np.floor(pos).astype(int), 0, 99)

    def inv(table):
        t = np.asarray(table, np.float64)
        return t[i] + (pos - i) * (t[i + 1] - t[i])

    prompt = np.clip(np.round(inv(INPUT_PERCENTILES[workload])), 1, max_model_len - max_tokens)
    out = np.clip(np.round(inv(OUTPUT_PERCENTILES[workload])), 1, max_tokens)
    return replay.moments(prompt, out)


# -- agentic sessions (closed loop; docs/serving.md section 7) --------------------------------
AGENTIC = "agentic"
MAX_CALLS = 64  # calls of a session at most (history keys hold 64 per session)
CALL_SEED_XOR = 0x9E3779B9  # per-call draws use the seed with its first word XORed with this
SYSTEM_KEYS = (0, 1)  # the main agents' and the subagents' system prompts


def _lognormal(u: chex.Array, median, sigma) -> chex.Array:
    return jnp.asarray(median, jnp.float32) * jnp.exp(sigma * jax.scipy.special.ndtri(u))


def history_key(session: chex.Array, turn: chex.Array, cfg: ServeConfig) -> chex.Array:
    """The segment key of call `turn` of `session`'s history (above the system prompts')."""
    return cfg.max_segments + MAX_CALLS * session + turn


def block_floor(tokens: chex.Array) -> chex.Array:
    return tokens // BLOCK_TOKENS * BLOCK_TOKENS


def draw_call(
    seed: chex.Array, session: chex.Array, turn: chex.Array, params: ServeParams, cfg=None
) -> dict:
    """Call `turn` of agentic `session`: its output tokens, the tool gap after it (s) and the
    new tokens the next call adds (counters 4 (64 session + turn) + j under the XORed seed)."""
    seed = jnp.asarray(seed, jnp.uint32)
    call_seed = jnp.stack([seed[0] ^ jnp.uint32(CALL_SEED_XOR), seed[1]])
    t = jnp.minimum(jnp.asarray(turn, jnp.int32), MAX_CALLS - 1)
    base = (jnp.asarray(session, jnp.int32) * MAX_CALLS + t).astype(jnp.uint32) * 4
    u = rng.uniform(rng.hash_words(call_seed, base[..., None] + jnp.arange(3, dtype=jnp.uint32)))
    max_tokens = jnp.asarray(params.max_tokens, jnp.int32)
    out = jnp.round(_lognormal(u[..., 0], params.agent_output_tokens, 0.8))
    new = jnp.round(_lognormal(u[..., 2], params.agent_turn_tokens, 0.5))
    return dict(
        output_len=jnp.clip(out.astype(jnp.int32), 1, max_tokens),
        tool_gap=_lognormal(u[..., 1], params.tool_gap_median, params.tool_gap_sigma),
        new_tokens=jnp.maximum(new.astype(jnp.int32), 1),
    )


def draw_session(seed: chex.Array, index: chex.Array, params: ServeParams, cfg) -> dict:
    """Agentic session `index`: its gap after the previous session, number of calls and call 0
    as a request (draw_request's fields plus `turns`)."""
    seed = jnp.asarray(seed, jnp.uint32)
    index = jnp.asarray(index, jnp.int32)
    counters = index.astype(jnp.uint32)[..., None] * DRAWS_PER_REQUEST + jnp.arange(
        4, dtype=jnp.uint32
    )
    u = rng.uniform(rng.hash_words(seed, counters))
    rate = jnp.asarray(params.arrival_rate, jnp.float32)
    sigma = jnp.asarray(params.gap_sigma, jnp.float32)
    gap = jnp.exp(-jnp.log(rate) - 0.5 * sigma * sigma + sigma * jax.scipy.special.ndtri(u[..., 0]))
    sub = u[..., 1] < params.subagent_share
    p = 1.0 / jnp.asarray(params.agent_turns, jnp.float32)
    geometric = jnp.floor(jnp.log(u[..., 2]) / jnp.log1p(-p))
    main_turns = jnp.minimum(1 + geometric, MAX_CALLS).astype(jnp.int32)
    sub_turns = jnp.minimum(1 + jnp.floor(3 * u[..., 2]), 3).astype(jnp.int32)
    max_tokens = jnp.asarray(params.max_tokens, jnp.int32)
    plen = block_floor(jnp.asarray(params.prefix_tokens, jnp.int32))
    task = jnp.round(_lognormal(u[..., 3], params.agent_task_tokens, 0.5)).astype(jnp.int32)
    prompt = jnp.clip(plen + task, 1, jnp.asarray(params.max_model_len, jnp.int32) - max_tokens)
    out = draw_call(seed, index, 0, params, cfg)["output_len"]
    reads = prompt > plen
    return dict(
        gap=gap,
        prompt=prompt,
        output_len=out,
        max_tokens=jnp.broadcast_to(max_tokens, prompt.shape),
        segment=jnp.where(reads, jnp.where(sub, SYSTEM_KEYS[1], SYSTEM_KEYS[0]), -1),
        segment_up=jnp.full_like(prompt, -1),
        prefix_len=jnp.where(reads, plen, 0),
        publish=history_key(index, 0, cfg),
        publish_len=block_floor(prompt + out - 1),
        turns=jnp.where(sub, sub_turns, main_turns),
    )


def agentic_moments(params: ServeParams, sessions: int = 20_000, seed: int = 0) -> dict:
    """Expected calls per session and capacity.capacity_rps's moments of a call, with the
    prefill an unconstrained cache leaves (Monte Carlo over `sessions` sessions in NumPy, the
    distributions of draw_session / draw_call)."""
    g = np.random.default_rng(seed)
    f = lambda name: float(np.asarray(getattr(params, name)))  # noqa: E731
    cap = int(f("max_model_len") - f("max_tokens"))
    plen = int(f("prefix_tokens")) // BLOCK_TOKENS * BLOCK_TOKENS
    lognormal = lambda median, sigma, n: median * np.exp(sigma * g.standard_normal(n))  # noqa: E731
    sub = g.random(sessions) < f("subagent_share")
    u = g.random(sessions)
    main = np.minimum(1 + np.floor(np.log(u) / np.log1p(-1 / f("agent_turns"))), MAX_CALLS)
    turns = np.where(sub, np.minimum(1 + np.floor(3 * u), 3), main).astype(int)
    prompt = np.clip(plen + np.round(lognormal(f("agent_task_tokens"), 0.5, sessions)), 1, cap)
    cached = np.where(prompt > plen, plen, 0)
    prompts, outputs, hits = [], [], []
    alive = np.ones(sessions, bool)
    for t in range(MAX_CALLS):
        out = np.clip(
            np.round(lognormal(f("agent_output_tokens"), 0.8, sessions)), 1, f("max_tokens")
        )
        prompts.append(prompt[alive]), outputs.append(out[alive]), hits.append(cached[alive])
        new = np.maximum(np.round(lognormal(f("agent_turn_tokens"), 0.5, sessions)), 1)
        cached = (prompt + out - 1) // BLOCK_TOKENS * BLOCK_TOKENS
        prompt = prompt + out + new
        alive &= (t + 1 < turns) & (prompt <= cap)
        if not alive.any():
            break
    calls = sum(len(p) for p in prompts)
    m = replay.moments(np.concatenate(prompts), np.concatenate(outputs), np.concatenate(hits))
    return dict(m, calls_per_session=calls / sessions)
