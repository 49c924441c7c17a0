"""The iteration-latency model: how long one engine iteration takes for the batch it schedules.

    dt = t_cpu + max(t_weights, lin_a + lin_b * N_tok)
         + attn_decode * sum_decodes(context_i * kv_factor)
         + attn_prefill * sum_prefill_chunks(c_j * (h_j + c_j / 2))

N_tok is the number of tokens scheduled (one per decode plus every prefill-chunk token), c_j a
prefill chunk and h_j the tokens its request had already computed (so c_j * (h_j + c_j / 2) is
the number of causal (query, key) pairs of the chunk); kv_factor is 1 for bf16 and 0.5 for fp8
KV (decode attention reads the cache, so it scales with bytes). Constants per preset
(serve/presets.py); the form and the constants come from Vidur's profiles (serving.md section 3).
`fit_linear_ops` fits (t_weights, lin_a, lin_b) to a Vidur linear-op profile CSV.
"""

from __future__ import annotations

import csv
from pathlib import Path

import chex
import jax.numpy as jnp
import numpy as np

from kvjax.serve.types import BLOCK_TOKENS, ServeParams

VIDUR_H100_7B = Path(__file__).parent / "data" / "vidur_h100_llama2_7b_linear_ops.csv"

# Vidur's per-layer linear ops of one decoder layer (its MLP profile minus the embedding).
VIDUR_LINEAR_OPS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)


def kv_factor(params: ServeParams) -> chex.Array:
    """Bytes per KV token relative to bf16: 1 (bf16) or 0.5 (fp8)."""
    return jnp.where(jnp.asarray(params.kv_dtype) == 1, 0.5, 1.0).astype(jnp.float32)


def linear_time(params: ServeParams, num_tokens: chex.Array) -> chex.Array:
    """Seconds of the token-parallel (linear) layers for `num_tokens` scheduled tokens."""
    n = jnp.asarray(num_tokens, jnp.float32)
    return jnp.maximum(params.t_weights, params.lin_a + params.lin_b * n)


def iteration_time(
    params: ServeParams,
    num_tokens: chex.Array,
    decode_context: chex.Array,
    prefill_pairs: chex.Array,
) -> chex.Array:
    """Seconds of one iteration (float32).

    num_tokens: tokens scheduled; decode_context: sum of decoding requests' context tokens;
    prefill_pairs: sum over prefill chunks of c * (h + c / 2)."""
    return (
        params.t_cpu
        + linear_time(params, num_tokens)
        + params.attn_decode * kv_factor(params) * jnp.asarray(decode_context, jnp.float32)
        + params.attn_prefill * jnp.asarray(prefill_pairs, jnp.float32)
    )


def prefill_pairs(chunk: chex.Array, done_before: chex.Array) -> chex.Array:
    """Causal (query, key) pairs of a prefill chunk of `chunk` tokens after `done_before`."""
    c = jnp.asarray(chunk, jnp.float32)
    return c * (jnp.asarray(done_before, jnp.float32) + 0.5 * c)


def transfer_time(params: ServeParams, blocks: chex.Array) -> chex.Array:
    """Seconds to move `blocks` KV blocks over PCIe one way."""

    nbytes = jnp.asarray(blocks, jnp.float32) * BLOCK_TOKENS * params.kv_bytes_per_token
    return nbytes * kv_factor(params) / params.pcie_bytes_per_s


def read_vidur_linear_ops(path: str | Path, tensor_parallel: int = 1) -> dict[int, float]:
    """{tokens in batch: milliseconds of one iteration's linear ops} from a Vidur MLP profile
    CSV (medians per op, summed over the ops of one layer, times the model's 32 layers; the
    median over repeated rows of one size)."""
    by_n: dict[int, list[float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if int(row["num_tensor_parallel_workers"]) != tensor_parallel:
                continue
            ms = sum(float(row[f"time_stats.{op}.median"]) for op in VIDUR_LINEAR_OPS)
            by_n.setdefault(int(row["num_tokens"]), []).append(ms)
    layers = 32
    return {n: layers * float(np.median(v)) for n, v in sorted(by_n.items())}


def fit_linear_ops(table: dict[int, float], knee: int = 1024) -> tuple[float, float, float]:
    """(t_weights, lin_a, lin_b) in seconds: the floor is the median at <= 64 tokens; a and b
    are a least-squares line through the sizes >= `knee` (where the GEMMs are compute-bound)."""
    n = np.array(list(table), np.float64)
    ms = np.array(list(table.values()), np.float64)
    floor = float(np.median(ms[n <= 64]))
    big = n >= knee
    b, a = np.polyfit(n[big], ms[big], 1)
    return floor / 1e3, float(a) / 1e3, float(b) / 1e3


def bundled_vidur_table() -> dict[int, float]:
    """The bundled Vidur H100 Llama-2-7B linear-op table {tokens: ms} (kvjax/serve/NOTICE)."""
    with open(VIDUR_H100_7B, newline="") as f:
        return {int(r["num_tokens"]): float(r["linear_ops_ms"]) for r in csv.DictReader(f)}
