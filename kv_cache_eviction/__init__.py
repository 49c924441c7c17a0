"""`kv_cache_eviction`: the verifiers v1 environment package for kvjax's LLM evaluation.

verifiers finds environments by top-level module name, so this thin package re-exports the
adapter that lives in `kvjax.cache.llm.verifiers`:

    pip install -e ".[verifiers]"
    vf-eval kv_cache_eviction -m MODEL --client.base-url URL --client.api-key-var VAR \
        -n 5 -r 1 --env.taskset.difficulty hard --no-push

`__all__` exports exactly one Taskset, one Env (local subprocess runtime by default) and one
Harness (the plain tool loop), as the verifiers loaders require.
"""

from kvjax.cache.llm.verifiers import KVCacheEnv, KVCacheHarness, KVCacheTaskset

__all__ = ["KVCacheEnv", "KVCacheHarness", "KVCacheTaskset"]
