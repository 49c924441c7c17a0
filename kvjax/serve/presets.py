"""Scale presets of kv-serve-v0: static shapes (ServeConfig) and traced constants (ServeParams).

Every number's source is in docs/serving.md section 2 (hardware and model: serving.md sections
3-4; engine defaults: vLLM `get_batch_defaults`). Latency constants: t_weights / lin_a / lin_b
are the fit of Vidur's H100 Llama-2-7B linear-op profile (serve/latency.fit_linear_ops: 5.79 ms,
1.41 ms, 20.7 us/token) with lin_b x 1.15 for Llama-3-8B's larger MLP; H200 divides the
weight-read floor by the HBM ratio 4.8 / 3.35; attention constants are 128 KiB (or 320 KiB)
per token over 0.7 x HBM bandwidth and 4 x layers x d FLOPs per (query, key) pair over
0.5 x 989 TFLOP/s. Pools: (0.92 x HBM - weights - ~3.5 GiB) / KV bytes per token.
"""

from __future__ import annotations

H100_8B = dict(
    t_cpu=1e-3,
    t_weights=5.79e-3,
    lin_a=1.41e-3,
    lin_b=23.9e-6,
    attn_decode=56e-9,
    attn_prefill=1.06e-9,
    kv_bytes_per_token=131072.0,
    pcie_bytes_per_s=50e9,
)
H200_8B = dict(H100_8B, t_weights=4.04e-3, attn_decode=39e-9)
# Llama-3-70B, FP8 weights on one H200: weights ~70 GB read at 4.8 TB/s with the 8B profile's
# efficiency (4.8 ms model / 5.79 ms measured); FP8 GEMMs twice bf16's rate for 8.75x the
# FLOPs of 8B; 80 layers x 8 KV heads x 128 x 2 x 2 B = 320 KiB/token; d = 8192, 80 layers.
H200_70B_FP8 = dict(
    t_cpu=1e-3,
    t_weights=17.6e-3,
    lin_a=6.2e-3,
    lin_b=104.6e-6,
    attn_decode=97.5e-9,
    attn_prefill=5.3e-9,
    kv_bytes_per_token=327680.0,
    pcie_bytes_per_s=50e9,
)

PRESETS: dict[str, dict] = {
    # Trainable on a 2-core CPU: an 8B model on an H100 with a small pool and batch.
    "toy": dict(
        config=dict(max_requests=64, max_segments=8, finished_log=2048),
        params=dict(
            H100_8B,
            gpu_pool_tokens=131072,
            cpu_pool_tokens=262144,
            max_num_seqs=64,
            max_batched_tokens=2048,
        ),
    ),
    "h100-llama3-8b": dict(
        config=dict(max_requests=512, max_segments=16, finished_log=8192),
        params=dict(
            H100_8B,
            gpu_pool_tokens=440000,
            cpu_pool_tokens=880000,
            max_num_seqs=1024,
            max_batched_tokens=8192,
        ),
    ),
    "h200-llama3-8b": dict(
        config=dict(max_requests=1024, max_segments=16, finished_log=8192),
        params=dict(
            H200_8B,
            gpu_pool_tokens=840000,
            cpu_pool_tokens=1680000,
            max_num_seqs=1024,
            max_batched_tokens=8192,
        ),
    ),
    "h200-llama3-70b-fp8": dict(
        config=dict(max_requests=256, max_segments=16, finished_log=8192),
        params=dict(
            H200_70B_FP8,
            gpu_pool_tokens=170000,
            cpu_pool_tokens=340000,
            max_num_seqs=1024,
            max_batched_tokens=8192,
        ),
    ),
}


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)
