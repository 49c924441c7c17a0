"""Event phases of a kv-serve-v0 engine iteration: arrivals, finished CPU transfers and client
timeouts (docs/serving.md section 3)."""

from __future__ import annotations

import chex
import jax.numpy as jnp

from kvjax.serve import ops, workload
from kvjax.serve.engine.requests import fresh_request, set_rows
from kvjax.serve.types import (
    EMPTY,
    LOADING,
    OFFLOADING,
    RUNNING,
    SWAPPED,
    TOOL,
    WAITING,
    ServeConfig,
    ServeParams,
    ServeState,
)

# A time no event reaches (float32 seconds).
NEVER = 3.0e38


def arrivals(
    state: ServeState, params: ServeParams, cfg: ServeConfig, live: chex.Array = True
) -> ServeState:
    """Move up to K arrived requests (arrival <= clock) from the stream into empty rows, in
    stream order. When no row is free they wait behind the pointer, their arrival time kept,
    so their waiting counts in TTFT and the client timeout."""
    req = state.requests
    K = cfg.max_arrivals_per_iter
    nxt = state.next_index
    # Agentic sessions' next calls whose tool has returned enter the queue first.
    woken = (req.status == TOOL) & (req.arrival <= state.clock) & live
    req = req.replace(
        status=jnp.where(woken, WAITING, req.status),
        queue_key=jnp.where(woken, nxt, req.queue_key),
    )
    n_woken = jnp.sum(woken).astype(jnp.int32)
    # The next K + 1 requests of the stream (one draw each, vectorised) and their arrival times
    # as the same float32 running sum the stream defines.
    d = workload.draw_request(state.seed, state.stream_start + nxt + jnp.arange(K + 1), params, cfg)
    times = [state.next_arrival]
    for k in range(1, K + 1):
        times.append(times[-1] + d["gap"][k])
    t = jnp.stack(times)  # t[k]: arrival of request nxt + k
    empty = req.status == EMPTY
    # Candidate k enters the k-th empty row (row order) if it has arrived; arrival times
    # increase, so the entering candidates are a prefix 0..n-1.
    n = jnp.sum((t[:K] <= state.clock) & (jnp.arange(K) < jnp.sum(empty)) & live)
    slot = ops.row_prefix_sum(empty.astype(jnp.int32))  # empty rows before each row
    put = empty & (slot < n)
    pick = lambda x: sum(jnp.where(slot == k, x[k], 0) for k in range(K))  # noqa: E731
    prompt = pick(d["prompt"])
    index = nxt + slot
    req = set_rows(
        req,
        put,
        dict(
            status=WAITING,
            index=index,
            turn=0,
            arrival=pick(t),
            prompt=prompt,
            output_len=pick(d["output_len"]),
            max_tokens=pick(d["max_tokens"]),
            segment=pick(d["segment"]),
            segment_up=pick(d["segment_up"]),
            prefix_len=pick(d["prefix_len"]),
            publish=pick(d["publish"]),
            publish_len=pick(d["publish_len"]),
            **fresh_request(cfg, prompt, queue_key=index),
        ),
    )
    nxt = nxt + n.astype(jnp.int32)
    t_next = jnp.sum(jnp.where(jnp.arange(K + 1) == n, t, 0.0))
    arrived = state.metrics.arrived + (nxt - state.next_index) + n_woken
    return state.replace(
        requests=req,
        next_index=nxt,
        next_arrival=t_next,
        metrics=state.metrics.replace(arrived=arrived),
    )


def transfers(state: ServeState, live: chex.Array = True) -> ServeState:
    """Finish CPU transfers whose time has come: an offload frees its GPU blocks (the request
    waits, swapped, at the head of the queue); a load frees its CPU blocks and resumes it."""
    req = state.requests
    done = (req.xfer_done <= state.clock) & live
    off = (req.status == OFFLOADING) & done
    load = (req.status == LOADING) & done
    req = req.replace(
        status=jnp.where(off, SWAPPED, jnp.where(load, RUNNING, req.status)),
        attached=jnp.where(off, -1, req.attached),
        cpu_blocks=jnp.where(load, 0, req.cpu_blocks),
    )
    return state.replace(requests=req)


def timeouts(state: ServeState, params: ServeParams, live: chex.Array = True) -> ServeState:
    """Drop waiting requests that have produced no token within the client timeout (the only
    way a request leaves unserved; counted)."""
    req = state.requests
    drop = (
        (req.status == WAITING)
        & (req.first_token < 0)
        & (state.clock - req.arrival > params.client_timeout)
        & live
    )
    req = req.replace(status=jnp.where(drop, EMPTY, req.status))
    m = state.metrics
    return state.replace(
        requests=req, metrics=m.replace(timed_out=m.timed_out + jnp.sum(drop).astype(jnp.int32))
    )
