"""Memory accounting: one report schema for measured (profiler) and estimated (estimator) memory."""
from peft_dist.memory.profiler import MemoryProfiler, MemoryReport

__all__ = ["MemoryProfiler", "MemoryReport"]
