"""kv-serve-v0: KV-cache management inside an LLM serving engine with a clock (docs/serving.md).

    env, params = kvjax.make("kv-serve-v0", preset="toy", engine="vllm", load=0.8)

Modules, one job each: types (pytrees, config, params), presets (scales and their constants),
latency (iteration-latency model and its Vidur fit), workload (request streams), capacity
(roofline load and the load <-> arrival-rate pair), traces and replay (trace workloads), ops
(order statistics for XLA), engine/ (one iteration's rules, a module per phase), actions (the
agent's interface and its validity rule), observations, metrics (score, SLOs and serving
metrics), env (the gymnax-style API), policies, baselines and offline (the policies), reference
(the pure-Python oracle), rollout (its episodes for the rollout engine), bench, leaderboard and
sweep (documents and load sweeps), harness (what the generic harness needs: kvjax.registry).
"""

from kvjax.serve.env import ENV_ID, ServeEnv, make, normalize_params, validate_params
from kvjax.serve.metrics import METRICS, episode_metrics, score
from kvjax.serve.observations import ServeObservation
from kvjax.serve.presets import PRESETS
from kvjax.serve.types import ENGINES, KV_DTYPES, ServeConfig, ServeParams, ServeState
from kvjax.serve.workload import WORKLOADS

__all__ = [
    "ENGINES",
    "ENV_ID",
    "KV_DTYPES",
    "METRICS",
    "PRESETS",
    "WORKLOADS",
    "ServeConfig",
    "ServeEnv",
    "ServeObservation",
    "ServeParams",
    "ServeState",
    "episode_metrics",
    "make",
    "normalize_params",
    "score",
    "validate_params",
]
