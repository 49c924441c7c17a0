"""The roofline capacity of a preset for a workload: the request rate a fully batched engine
could sustain, computed outside jit (numpy) from the latency model and the workload's lengths.

At saturation the engine runs B requests at once, B = min(max_num_seqs, pool tokens / mean
context) with mean context = E[prompt] + E[output] / 2. A decode iteration of B requests takes
dt = t_cpu + max(t_weights, lin_a + lin_b B) + attn_decode x kv_factor x B x context, so each
request's decodes cost E[output] x dt / B; its prefill, piggybacked on decode iterations,
costs its marginal linear time lin_b x E[prompt] plus attention attn_prefill x E[prompt^2] / 2.
capacity = 1 / (decode share + prefill share). Prefix hits, preemptions and queueing are left
out, so real engines reach less: `load = 1` is the edge this bound draws, not a promise.

Load and arrival rate, both directions in one place (`arrival_rate_at`, `load_at`):
load = arrival_rate x calls_per_arrival / capacity, calls per second offered over the calls
per second the roofline sustains (an agentic stream's arrival is a session of several calls).
"""

from __future__ import annotations

from kvjax.serve import workload
from kvjax.serve.types import ServeParams


def capacity_rps(params: ServeParams, moments: dict | None = None) -> float:
    """Requests per second at saturation (float; params must be concrete). `moments` of a
    request: prompt (E[prompt]), output (E[output]), prefill (E[tokens prefilled]) and
    prefill_pairs (E[prefilled x (cached + prefilled / 2)]: attention pairs); by default the
    synthetic workload `params.workload`'s (nothing cached: prefill = prompt). A replayed
    trace's come from replay.length_moments, agentic calls' from workload.agentic_moments."""
    if moments is None:
        moments = workload.length_moments(
            int(params.workload), int(params.max_tokens), int(params.max_model_len)
        )
    e_in, e_out = moments["prompt"], moments["output"]
    kv = 0.5 if int(params.kv_dtype) == 1 else 1.0
    context = e_in + e_out / 2
    pool = float(params.gpu_pool_tokens) / kv
    batch = max(1.0, min(float(params.max_num_seqs), pool / context))
    dt = (
        float(params.t_cpu)
        + max(float(params.t_weights), float(params.lin_a) + float(params.lin_b) * batch)
        + float(params.attn_decode) * kv * batch * context
    )
    per_request = (
        e_out * dt / batch
        + float(params.lin_b) * moments["prefill"]
        + float(params.attn_prefill) * moments["prefill_pairs"]
    )
    return 1.0 / per_request


def arrival_rate_at(load: float, capacity: float, calls_per_arrival: float = 1.0) -> float:
    """Stream arrivals per second that offer `load` x `capacity` calls per second, each
    arrival bringing `calls_per_arrival` calls (the inverse of `load_at`)."""
    return float(load) * capacity / calls_per_arrival


def load_at(arrival_rate: float, capacity: float, calls_per_arrival: float = 1.0) -> float:
    """The offered load of a stream of `arrival_rate` arrivals per second, each bringing
    `calls_per_arrival` calls, on an engine of `capacity` calls per second."""
    return float(arrival_rate) * calls_per_arrival / capacity
