"""Request transitions of kv-serve-v0, each written once: a new request's fresh row
(`fresh_request`, written with `set_rows`), preemption by recompute (`recompute_preempt`) and an
agentic session's next call (`next_calls`). TPOT and the SLO test are serve/metrics.py's."""

from __future__ import annotations

import chex
import jax.numpy as jnp

from kvjax.serve import workload
from kvjax.serve.engine.blocks import attached_tokens
from kvjax.serve.types import (
    TOOL,
    WAITING,
    RequestTable,
    SegmentTable,
    ServeConfig,
    ServeParams,
)


def fresh_request(cfg: ServeConfig, prompt: chex.Array | int, queue_key: chex.Array | int = 0):
    """The progress fields of a row a new request is placed in (an arrival, an agentic
    session's next call): nothing attached, computed or generated, no token yet, the default
    retention priority, no preemption, hit or transfer; `target` its prompt, `queue_key` its
    place in the queue. A dict of field -> value (scalars or [S] arrays)."""
    return dict(
        attached=-1,
        computed=0,
        target=prompt,
        generated=0,
        queue_key=queue_key,
        run_key=0,
        priority=cfg.default_priority,
        first_token=-1.0,
        last_token=-1.0,
        preemptions=0,
        recomputed=0,
        hit_tokens=0,
        xfer_done=0.0,
        cpu_blocks=0,
    )


def set_rows(req: RequestTable, rows: chex.Array, fields: dict) -> RequestTable:
    """`req` with `fields` (field -> value) written on `rows` only."""
    return req.replace(**{k: jnp.where(rows, v, getattr(req, k)) for k, v in fields.items()})


def recompute_preempt(
    req: RequestTable, seg: SegmentTable, rows: chex.Array, queue_key: chex.Array | int
) -> tuple[RequestTable, chex.Array]:
    """Preemption by recompute (the engine's, and the agent's preempt command): `rows` free
    their private blocks, keep no computed KV and no segment, and wait at `queue_key`
    (negative: ahead of every arrival) to prefill their prompt and generated tokens again.
    Returns the table and int32 [S] the tokens each row must recompute (0 off `rows`)."""
    lost = jnp.where(rows, jnp.maximum(req.computed - attached_tokens(req, seg), 0), 0)
    req = req.replace(
        status=jnp.where(rows, WAITING, req.status),
        queue_key=jnp.where(rows, queue_key, req.queue_key),
        computed=jnp.where(rows, 0, req.computed),
        target=jnp.where(rows, req.prompt + req.generated, req.target),
        attached=jnp.where(rows, -1, req.attached),
        preemptions=req.preemptions + rows,
        recomputed=req.recomputed + lost,
    )
    return req, lost


def next_calls(
    req: RequestTable,
    done: chex.Array,
    seed: chex.Array,
    clock: chex.Array,
    params: ServeParams,
    cfg: ServeConfig,
) -> RequestTable:
    """Agentic sessions (docs/serving.md section 7): a completed call whose session has calls
    left, and whose next prompt fits, keeps its row as the next call - in TOOL until its tool
    returns - reading this call's history and publishing its own."""
    session = workload.draw_session(seed, req.index, params, cfg)
    this = workload.draw_call(seed, req.index, req.turn, params, cfg)
    turn = req.turn + 1
    following = workload.draw_call(seed, req.index, turn, params, cfg)
    prompt = req.prompt + req.generated + this["new_tokens"]
    cap = jnp.asarray(params.max_model_len, jnp.int32) - jnp.asarray(params.max_tokens, jnp.int32)
    go = done & (turn < session["turns"]) & (prompt <= cap)
    out = following["output_len"]
    return set_rows(
        req,
        go,
        dict(
            status=TOOL,
            turn=turn,
            arrival=clock + this["tool_gap"],
            prompt=prompt,
            output_len=out,
            segment=workload.history_key(req.index, req.turn, cfg),
            segment_up=session["segment"],  # the system prompt (-1: none)
            prefix_len=req.publish_len,
            publish=workload.history_key(req.index, turn, cfg),
            publish_len=workload.block_floor(prompt + out - 1),
            **fresh_request(cfg, prompt),
        ),
    )
