"""The four tools' schemas for the verifiers adapter, as an MCP tool server.

verifiers launches a tool server as its own process (`python -m kvjax.cache.llm.verifiers_tools`),
so this module stays light: it imports verifiers only, never JAX. The tools are *played* by the
task's request hook (`KVCacheTask.play_tool_call`), which answers the harness's tool gate before a
call would reach this server; the methods here only give the model their names, descriptions and
argument schemas. If a harness runs one anyway (it does not ask the gate), it gets an error.
"""

from __future__ import annotations

import verifiers.v1 as vf

NOT_GATED = (
    "error: kv_cache_eviction tools are played by the task's tool gate; run this environment "
    "with a harness that asks the gate before each call (the default kv_cache_eviction / null "
    "harness)"
)


class KVCacheToolset(vf.Toolset[vf.SharedToolsetConfig]):
    """evict / compress / swap_to_cpu / keep, advertised with bare names."""

    TOOL_PREFIX = None

    @vf.tool
    async def evict(self, seq_id: int) -> str:
        """Evict the sequence `seq_id` from the KV cache: frees all of its memory at once, but
        its request is dropped. Prefer high eviction_value (safe) sequences; evicting system or
        context blocks, high-priority or nearly finished sequences is penalised. Counts as one of
        the step's (at most 3) actions."""
        return NOT_GATED

    @vf.tool
    async def compress(self, seq_id: int) -> str:
        """Quantise the GPU sequence `seq_id` one tier (fp16 -> int8 -> int4); each tier halves
        its memory. Costs output quality (most for reasoning sequences at int4). Not possible on
        int4 or CPU sequences. Counts as one of the step's (at most 3) actions."""
        return NOT_GATED

    @vf.tool
    async def swap_to_cpu(self, seq_id: int) -> str:
        """Move the GPU sequence `seq_id` to CPU memory: frees its GPU memory and keeps the
        request, but adds transfer latency, and it stalls until it is swapped back in when
        memory allows. Counts as one of the step's (at most 3) actions."""
        return NOT_GATED

    @vf.tool
    async def keep(self) -> str:
        """Take no action this step (uses no action). Call it to let a step pass; a reply
        without any tool call ends the episode."""
        return NOT_GATED


__all__ = ["NOT_GATED", "KVCacheToolset"]

if __name__ == "__main__":
    KVCacheToolset.run()
