"""Per-rank memory report measured during a run (design.md "Memory").

Exact bytes of parameters (frozen / trainable), gradients and optimizer state are counted from the tensors
themselves (DTensor-aware: a sharded tensor counts only its local shard). Peaks come from the CUDA caching
allocator per phase (peaks reset at each phase start); on CPU there is no allocator to ask, so the report carries the
process's peak resident set size instead and leaves the allocator fields empty.
"""
from __future__ import annotations

import contextlib
import json
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

PHASES = ("forward", "backward", "optimizer", "eval")


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds for ``t`` (the local shard of a DTensor)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


@dataclass
class MemoryReport:
    rank: int
    device: str
    source: str = "measured"
    """``measured`` (this profiler) or ``estimated`` (the CPU estimator)."""
    params_frozen_bytes: int = 0
    params_trainable_bytes: int = 0
    grads_bytes: int = 0
    optimizer_state_bytes: int = 0
    activations_bytes: int | None = None
    """Peak allocated minus the static bytes above (allocator devices only)."""
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    peak_rss_bytes: int | None = None
    """Process peak resident set size (CPU runs): everything the process touched, libraries included."""
    phase_peak_allocated_bytes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def peak_bytes(self) -> int:
        return self.peak_allocated_bytes if self.peak_allocated_bytes is not None else (self.peak_rss_bytes or 0)


class MemoryProfiler:
    def __init__(self, rank: int, device: torch.device, enabled: bool = True):
        self.rank = rank
        self.device = device
        self.enabled = enabled
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.report = MemoryReport(rank=rank, device=str(device))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not (self.enabled and self.cuda):
            yield
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        peak = torch.cuda.max_memory_allocated(self.device)
        prev = self.report.phase_peak_allocated_bytes.get(name, 0)
        self.report.phase_peak_allocated_bytes[name] = max(prev, peak)

    def capture_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Count parameter, gradient and optimizer bytes (call after backward/step, before grads are cleared)."""
        if not self.enabled:
            return
        r = self.report
        r.params_frozen_bytes = sum(local_bytes(p) for p in model.parameters() if not p.requires_grad)
        r.params_trainable_bytes = sum(local_bytes(p) for p in model.parameters() if p.requires_grad)
        grads = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
        r.grads_bytes = max(r.grads_bytes, grads)
        if optimizer is not None:
            state = getattr(optimizer, "state", None) or {}
            opt = sum(local_bytes(v) for s in state.values() for v in s.values() if isinstance(v, torch.Tensor))
            r.optimizer_state_bytes = max(r.optimizer_state_bytes, opt)

    def finish(self) -> MemoryReport:
        r = self.report
        if self.cuda:
            r.peak_allocated_bytes = max(r.phase_peak_allocated_bytes.values(), default=0)
            r.peak_reserved_bytes = torch.cuda.max_memory_reserved(self.device)
            static = r.params_frozen_bytes + r.params_trainable_bytes + r.grads_bytes + r.optimizer_state_bytes
            r.activations_bytes = max(0, r.peak_allocated_bytes - static)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r.peak_rss_bytes = rss if sys.platform == "darwin" else rss * 1024
        return r

    def write(self, path: Path, reports: list[MemoryReport]) -> None:
        path.write_text(json.dumps({"ranks": [x.to_dict() for x in reports]}, indent=2) + "\n")
