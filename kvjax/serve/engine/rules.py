"""Per-engine rules of kv-serve-v0 (vLLM, SGLang, TRT-LLM; docs/serving.md section 3): which
engine's rules are traced, the running order each keeps, the room a running request's demand
must fit in (what preemption frees), SGLang's retract headroom and reserve, and TRT's
reservations. The scheduler forms the prefix sums these read (`*_before`: over the requests
ahead in the running or queue order)."""

from __future__ import annotations

import chex
import jax.numpy as jnp

from kvjax.serve.engine.blocks import ceil_blocks, on_gpu
from kvjax.serve.types import (
    ENGINES,
    LOADING,
    RUNNING,
    SGLANG,
    RequestTable,
    ServeConfig,
    ServeParams,
)


def engine_is(params: ServeParams, cfg: ServeConfig, engine: int):
    """Whether the scenario's engine is `engine`: a Python bool when the config names its
    engine (the other engines' rules are then not traced at all), else a traced bool."""
    if cfg.engine is None:
        return params.engine == engine
    return cfg.engine == ENGINES[engine]


def may_apply(is_engine) -> bool:
    """Whether an engine's rules have to be traced: its `engine_is` flag is traced (a config
    with engine=None) or statically True. False only for a static config of another engine,
    whose rules are then left out of the program."""
    return is_engine is not False


def surely(is_engine) -> bool:
    """Whether an engine's rules certainly apply: a static config of that engine."""
    return is_engine is True


def running_order_keys(req: RequestTable, params: ServeParams, cfg: ServeConfig):
    """Keys of the running order (first = scheduled first, last = first victim): retention
    priority (higher first), then the engine's rule - vLLM and TRT: order of admission (the
    last scheduled is preempted first); SGLang: most decoded first (fewest decoded retracted
    first, ties: longest prompt)."""
    sgl = engine_is(params, cfg, SGLANG)
    # Priority and (SGLang) decoded tokens packed in one key: each key costs an [S, S] compare.
    fewest = 0xFFFF - jnp.minimum(req.generated, 0xFFFF)
    retention = ((cfg.priority_levels - 1) - req.priority) * 0x10000
    if not may_apply(sgl):  # a static vLLM or TRT engine: no SGLang keys to compare
        return (retention, req.run_key)
    return (retention + jnp.where(sgl, fewest, 0), jnp.where(sgl, req.prompt, 0), req.run_key)


def preemption_room(
    available: chex.Array,
    running: chex.Array,
    held: chex.Array,
    held_before: chex.Array,
    can_preempt: chex.Array,
) -> chex.Array:
    """int32 [S]: the blocks the running order's demand up to each running request may use -
    what is available plus, on an engine that preempts, the blocks every later running request
    holds (victims are taken from the tail)."""
    held_run = jnp.sum(jnp.where(running, held, 0))
    return available + jnp.where(can_preempt, held_run - held_before - held, 0)


def sglang_future(req: RequestTable, params: ServeParams) -> chex.Array:
    """int32 [S]: the tokens SGLang reserves per request - its remaining output, capped."""
    return jnp.minimum(jnp.maximum(req.max_tokens - req.generated, 0), params.sglang_reserve_cap)


def sglang_retract_headroom(
    kept_before: chex.Array, retracting: chex.Array, params: ServeParams
) -> chex.Array:
    """int32 [S]: SGLang, short of blocks (`retracting`), retracts until every kept request has
    retract_tokens free for its next decodes: the free blocks a running request needs with the
    `kept_before` ahead of it."""
    return jnp.where(retracting, ceil_blocks((kept_before + 1) * params.sglang_retract_tokens), 0)


def sglang_admission_ok(
    ratio: chex.Array,
    req: RequestTable,
    future: chex.Array,
    w_reserve_before: chex.Array,
    cum_blocks: chex.Array,
    adm_available: chex.Array,
) -> chex.Array:
    """bool [S]: SGLang admits a waiting request while new_token_ratio x (the running and
    loading requests' and the queue's reserve up to it, `sglang_future`) stays free beside
    the blocks admitted up to it (`cum_blocks`)."""
    on_engine = (req.status == RUNNING) | (req.status == LOADING)
    run_reserve = jnp.sum(jnp.where(on_engine, future, 0))
    w_reserve = w_reserve_before + future
    sgl_reserve = ceil_blocks(jnp.ceil(ratio * (run_reserve + w_reserve)).astype(jnp.int32))
    return cum_blocks + sgl_reserve <= adm_available


def trt_reservation(req: RequestTable, hit: chex.Array, hit_tokens: chex.Array) -> chex.Array:
    """int32 [S]: TRT (GUARANTEED_NO_EVICT) - the blocks a waiting request reserves: its prompt
    and max_tokens beyond the segment it hits."""
    return ceil_blocks(req.prompt + req.max_tokens - jnp.where(hit > 0, hit_tokens, 0))


def trt_admission_ok(
    req: RequestTable,
    attached: chex.Array,
    full: chex.Array,
    full_before: chex.Array,
    pool: chex.Array,
    pinned_or_used: chex.Array,
) -> chex.Array:
    """bool [S]: TRT admits a waiting request while the reservations of every request on the
    GPU (prompt and max_tokens beyond its attached segment) and of the queue up to it
    (`trt_reservation`) fit in the pool beside the segments that cannot be evicted."""
    reserved_running = jnp.sum(
        jnp.where(on_gpu(req), ceil_blocks(req.prompt + req.max_tokens - attached), 0)
    )
    return reserved_running + full_before + full <= pool - pinned_or_used
