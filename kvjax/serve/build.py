"""Hand-built kv-serve-v0 states for tests, notebooks and worked examples.

    state = build_state(params, cfg, requests=[dict(status=RUNNING, prompt=600, ...)],
                        segments=[dict(tokens=512, on_gpu=True)], clock=0.0)

Segment rows given are valid, keyed by their row number and roots (parent -1) unless `key` /
`parent` say otherwise; requests are not attached (`attached` -1) unless given a row.

Unspecified request fields take the values a fresh arrival has; rows beyond the given ones are
empty. The stream's next arrival is `next_arrival` (default: never, so nothing arrives).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from kvjax.serve import engine
from kvjax.serve.types import ServeConfig, ServeParams, ServeState


def build_state(
    params: ServeParams,
    cfg: ServeConfig,
    requests: Sequence[dict] = (),
    segments: Sequence[dict] | None = None,
    clock: float = 0.0,
    next_arrival: float = float(engine.NEVER),
    seed: tuple[int, int] = (0, 0),
    **scalars,
) -> ServeState:
    """A state with the given request rows (0..n-1) and segment rows; `scalars` replace
    ServeState scalars (e.g. run_counter=2)."""
    state = engine.empty_state(jnp.asarray(seed, jnp.uint32), params, cfg)
    if len(requests) > cfg.max_requests:
        raise ValueError(f"at most max_requests={cfg.max_requests} requests, got {len(requests)}")
    fields = {f: np.array(getattr(state.requests, f)) for f in state.requests.__dataclass_fields__}
    defaults = dict(index=None, queue_key=None, target=None)
    for i, row in enumerate(requests):
        unknown = set(row) - set(fields)
        if unknown:
            raise ValueError(f"unknown request fields {sorted(unknown)}; allowed: {sorted(fields)}")
        row = {**defaults, **row}
        row["index"] = i if row["index"] is None else row["index"]
        row["queue_key"] = row["index"] if row["queue_key"] is None else row["queue_key"]
        row["target"] = (
            row.get("prompt", 0) + row.get("generated", 0)
            if row["target"] is None
            else row["target"]
        )
        row.setdefault("priority", cfg.default_priority)
        for k, v in row.items():
            fields[k][i] = v
    req = state.requests.replace(**{k: jnp.asarray(v) for k, v in fields.items()})
    seg = state.segments
    if segments is not None:
        sf = {f: np.array(getattr(seg, f)) for f in seg.__dataclass_fields__}
        unknown = {k for row in segments for k in row} - set(sf)
        if unknown:
            raise ValueError(f"unknown segment fields {sorted(unknown)}; allowed: {sorted(sf)}")
        sf["valid"][:] = False
        sf["key"][:] = -1
        sf["parent"][:] = -1
        for g, row in enumerate(segments):
            sf["valid"][g] = True
            sf["key"][g] = g  # the synthetic workload's keying unless given
            for k, v in row.items():
                sf[k][g] = v
        seg = seg.replace(**{k: jnp.asarray(v) for k, v in sf.items()})
    state = state.replace(
        requests=req, segments=seg, clock=jnp.float32(clock), next_arrival=jnp.float32(next_arrival)
    )
    return state.replace(**{k: jnp.asarray(v, getattr(state, k).dtype) for k, v in scalars.items()})
