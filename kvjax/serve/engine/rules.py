"""Per-engine rules of kv-serve-v0 (vLLM, SGLang, TRT-LLM): which engine's rules are traced and
the running order each keeps (docs/serving.md section 3)."""

from __future__ import annotations

import jax.numpy as jnp

from kvjax.serve.types import (
    ENGINES,
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


def running_order_keys(req: RequestTable, params: ServeParams, cfg: ServeConfig):
    """Keys of the running order (first = scheduled first, last = first victim): retention
    priority (higher first), then the engine's rule - vLLM and TRT: order of admission (the
    last scheduled is preempted first); SGLang: most decoded first (fewest decoded retracted
    first, ties: longest prompt)."""
    sgl = engine_is(params, cfg, SGLANG)
    # Priority and (SGLang) decoded tokens packed in one key: each key costs an [S, S] compare.
    fewest = 0xFFFF - jnp.minimum(req.generated, 0xFFFF)
    retention = ((cfg.priority_levels - 1) - req.priority) * 0x10000
    if sgl is False:  # a static vLLM or TRT engine: no SGLang keys to compare
        return (retention, req.run_key)
    return (retention + jnp.where(sgl, fewest, 0), jnp.where(sgl, req.prompt, 0), req.run_key)
