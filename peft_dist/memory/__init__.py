"""Memory accounting (design.md "Memory"): one report schema for measured (profiler) and estimated (estimator)
memory, the study runner and its plots.

    report = peft_dist.memory.estimate(cfg, world_size=8)        # CPU estimate of a run's per-rank memory
    peft-dist memory --config F [overrides] --world-size 8        # the same from the command line
    peft-dist study --grid configs/studies/snell_table_a8.yaml    # a grid → CSV + Markdown + PNG
"""
from peft_dist.memory.profiler import (MemoryProfiler, MemoryReport, format_memory_table, memory_metrics,
                                       read_memory_json, state_bytes, write_memory_json)

__all__ = ["MemoryProfiler", "MemoryReport", "estimate", "format_memory_table", "memory_metrics", "read_memory_json",
           "state_bytes", "write_memory_json"]


def __getattr__(name: str):
    # The estimator pulls in fake tensors and the engines; import it only when asked for.
    if name == "estimate":
        from peft_dist.memory.estimator import estimate

        return estimate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
