"""Per-rank memory report measured during a run (design.md "Memory"; spec ecosystem.md §7 "On GPU").

One schema for measured and estimated memory: :class:`MemoryReport`. The profiler fills it during training, the CPU
estimator (:mod:`peft_dist.memory.estimator`) predicts it, and both are written as ``memory.json`` =
``{"schema": ..., "ranks": [report, ...]}`` so the two can be compared field by field.

What is measured and how (ecosystem §7):

* **Exact model state**, counted from the tensors themselves after the first optimizer step: parameters (frozen /
  trainable), buffers, gradients and optimizer state, each ``numel × element_size`` of what this rank holds (a
  DTensor counts only its local shard).
* **Peaks per phase** (forward, backward, optimizer, eval): the CUDA caching allocator's peak allocated and reserved
  bytes, with the peaks reset at every phase start (``reset_peak_memory_stats``), exactly the counters the PETL papers
  and torchtitan report.
* **Activations** = peak allocated − the exact model state: "the rest" (activations, autograd temporaries and
  workspaces).
* On CPU there is no allocator to ask, so :class:`LiveStorageTracker` (a dispatch mode over the real tensors, the
  same accounting as torch's ``MemTracker``) keeps the bytes of every live tensor storage through each phase: the
  phase peaks, ``peak_allocated`` (their maximum) and ``activations`` are then measured exactly as on CUDA, and the
  process's peak resident set size stands beside them (``memory.cpu_tracking: false`` turns the tracker off and
  leaves only the RSS). A storage is counted from the first op that creates or reads it (parameters, the batch and
  the optimizer state are also registered by :meth:`MemoryProfiler.capture_state`) until Python frees it; resizes
  of a storage (FSDP2 frees and refills its unsharded parameters so) are followed. Blind to: allocator rounding and
  caching (CUDA's 512-byte blocks, ``peak_reserved``), temporaries that a single C++ kernel allocates and frees
  inside itself, and storages no Python-visible op ever touches.
* On CUDA, optional allocator snapshots for https://pytorch.org/memory_viz: ``memory.snapshot_steps: N`` records the
  allocation history of the first N steps and dumps it; ``memory.snapshot_on_oom`` dumps the allocator state when an
  allocation fails.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import resource
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from peft_dist import compat

PHASES = ("forward", "backward", "optimizer", "eval")
MEMORY_SCHEMA = "peft-dist/memory-report/v2"
CATEGORIES = ("params_frozen", "params_trainable", "buffers", "grads", "optimizer_state", "activations")
"""The stacked categories of a report; they add up to the peak (``activations`` is the rest)."""
MIB = 2**20


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds for ``t`` (the local shard of a DTensor)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def state_tensors(model: nn.Module, optimizer: Any = None) -> Iterator[torch.Tensor]:
    """Every tensor of the model state: parameters, buffers, gradients, optimizer state (ZeRO's flat partitions)."""
    for p in model.parameters():
        yield p
        if p.grad is not None:
            yield p.grad
        if hasattr(p, "ds_tensor"):
            yield p.ds_tensor
    yield from model.buffers()
    state = getattr(optimizer, "state", None) or {}
    for s in state.values():
        if isinstance(s, dict):
            yield from (v for v in s.values() if isinstance(v, torch.Tensor))
    yield from _zero_master(optimizer)
    yield from _zero_gradients(optimizer)


def _zero_master(optimizer: Any) -> list[torch.Tensor]:
    """DeepSpeed ZeRO's fp32 master partition of the trainable parameters (stage 1/2 and stage 3)."""
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        groups = getattr(optimizer, name, None)
        if groups:
            return [t for t in groups if isinstance(t, torch.Tensor)]
    return []


def _zero_gradients(optimizer: Any) -> list[torch.Tensor]:
    """DeepSpeed ZeRO's partitioned gradients (stage 1/2: ``averaged_gradients``; stage 3: the flat partition
    buffer); empty for other optimizers and after the step."""
    if optimizer is None or not hasattr(optimizer, "single_partition_of_fp32_groups") and \
            not hasattr(optimizer, "fp32_partitioned_groups_flat"):
        return []
    out: list[torch.Tensor] = []
    averaged = getattr(optimizer, "averaged_gradients", None) or {}
    for group in (averaged.values() if isinstance(averaged, dict) else averaged):
        out += [t for t in (group or []) if isinstance(t, torch.Tensor)]
    flat = getattr(optimizer, "grad_partitions_flat_buffer", None)
    if isinstance(flat, torch.Tensor) and not out:
        out.append(flat)
    return out


def _param_bytes(p: torch.Tensor) -> int:
    """Bytes this rank holds for parameter ``p``: its local shard, plus ZeRO-3's partition (``ds_tensor``)."""
    held = getattr(p, "ds_tensor", None)
    # ZeRO-3 empties p.data of a partitioned parameter and keeps it full for a persistent (small) one: both count
    return local_bytes(p) + (local_bytes(held) if isinstance(held, torch.Tensor) else 0)


def state_bytes(model: nn.Module, optimizer: Any = None) -> dict[str, int]:
    """Exact bytes of the model state this rank holds, by category (parameters shared by two modules count once).
    Under DeepSpeed ZeRO the fp32 master partition counts as optimizer state and the partitioned gradients as
    gradients (the categories the estimator models them in)."""
    params = list(model.parameters())
    counts = {
        "params_frozen_bytes": sum(_param_bytes(p) for p in params if not p.requires_grad),
        "params_trainable_bytes": sum(_param_bytes(p) for p in params if p.requires_grad),
        "buffers_bytes": sum(local_bytes(b) for b in model.buffers()),
        "grads_bytes": sum(local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer_state_bytes": 0,
    }
    state = getattr(optimizer, "state", None) or {}
    counts["optimizer_state_bytes"] = sum(local_bytes(v) for s in state.values() if isinstance(s, dict)
                                          for v in s.values() if isinstance(v, torch.Tensor))
    counts["optimizer_state_bytes"] += sum(local_bytes(t) for t in _zero_master(optimizer))
    counts["grads_bytes"] += sum(local_bytes(t) for t in _zero_gradients(optimizer))
    return counts


class LiveStorageTracker(TorchDispatchMode):
    """Bytes of the tensor storages alive at once on CPU, with the peak of each phase (see the module docstring).

    Entered around each phase (:meth:`phase`); the books stay open between phases, so a storage freed outside a phase
    is still taken off. ``seconds`` is the time spent inside the tracker's own bookkeeping (its overhead)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()
        """storage → [bytes counted for it] (a cell, so a resize and the storage's finalizer agree)."""
        self.live = 0
        self.phase: str | None = None
        self.phase_peak: dict[str, int] = {}
        self.seconds = 0.0
        self._original_resize = None

    # -- books
    def _forget(self, cell: list[int]) -> None:
        self.live -= cell[0]

    def observe(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage if it is new (or resized since it was last seen)."""
        if t.device.type == "meta" or type(t).__name__ == "FakeTensor":
            return
        if hasattr(t, "_local_tensor"):  # a DTensor: its local shard is what this rank holds
            t = t._local_tensor
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (subclasses, sparse)
            return
        nbytes = storage.nbytes()
        cell = self.sizes.get(storage)
        if cell is None:
            cell = [nbytes]
            self.sizes[storage] = cell
            weakref.finalize(storage, self._forget, cell)
            self.live += nbytes
        elif cell[0] != nbytes:
            self.live += nbytes - cell[0]
            cell[0] = nbytes
        else:
            return
        self._note_peak()

    def observe_all(self, tensors: Iterable[torch.Tensor]) -> None:
        started = time.perf_counter()
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.observe(t)
        self.seconds += time.perf_counter() - started

    def _note_peak(self) -> None:
        if self.phase is not None and self.live > self.phase_peak.get(self.phase, -1):
            self.phase_peak[self.phase] = self.live

    def _resized(self, storage: torch.UntypedStorage) -> None:
        cell = self.sizes.get(storage)
        if cell is not None and cell[0] != storage.nbytes():
            self.live += storage.nbytes() - cell[0]
            cell[0] = storage.nbytes()
            self._note_peak()

    # -- phases
    def begin(self, name: str) -> None:
        self.phase = name
        self._note_peak()
        # UntypedStorage.resize_ reaches no dispatch mode (FSDP2's free_storage/alloc_storage use it): follow it
        # the way torch's MemTracker does, while a phase runs
        original = self._original_resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, size):
            out = original(storage, size)
            tracker._resized(storage)
            return out

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        self.__enter__()

    def end(self) -> None:
        self.__exit__(None, None, None)
        if self._original_resize is not None:
            torch.UntypedStorage.resize_ = self._original_resize  # type: ignore[method-assign]
            self._original_resize = None
        self.phase = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        started = time.perf_counter()
        for t in tree_flatten((args, kwargs))[0]:  # a storage first met as an input was alive before the op
            if isinstance(t, torch.Tensor):
                self.observe(t)
        middle = time.perf_counter()
        out = func(*args, **kwargs)
        after = time.perf_counter()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.observe(t)
        self.seconds += (middle - started) + (time.perf_counter() - after)
        return out


@dataclass
class MemoryReport:
    """One rank's memory, in bytes. Measured by :class:`MemoryProfiler` or estimated by the CPU estimator."""

    rank: int
    device: str
    source: str = "measured"
    """``measured`` (this profiler) or ``estimated`` (the CPU estimator)."""
    world_size: int = 1
    params_frozen_bytes: int = 0
    params_trainable_bytes: int = 0
    buffers_bytes: int = 0
    grads_bytes: int = 0
    optimizer_state_bytes: int = 0
    activations_bytes: int | None = None
    """Peak allocated minus the exact state above: activations, autograd temporaries, workspaces."""
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    """Allocator reservation (caching); the estimator leaves it empty: fragmentation is not modelled."""
    peak_rss_bytes: int | None = None
    """Process peak resident set size (CPU runs): everything the process touched, libraries included."""
    phase_peak_allocated_bytes: dict[str, int] = field(default_factory=dict)
    phase_peak_reserved_bytes: dict[str, int] = field(default_factory=dict)
    peak_breakdown_bytes: dict[str, int] = field(default_factory=dict)
    """Estimator only: torch's MemTracker categories at the peak (Parameter, Activation, Temp, All Gather, ...)."""
    snapshot_files: list[str] = field(default_factory=list)
    """Allocator snapshots written during the run (open them in https://pytorch.org/memory_viz)."""
    notes: list[str] = field(default_factory=list)
    """How the figures were obtained where that is not obvious (approximations, skipped hooks)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "memory report") -> "MemoryReport":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(sorted(names))}")
        missing = [n for n in ("rank", "device") if n not in data]
        if missing:
            raise ValueError(f"{where}: missing field {missing[0]!r}")
        return cls(**data)

    @property
    def params_bytes(self) -> int:
        return self.params_frozen_bytes + self.params_trainable_bytes

    @property
    def static_bytes(self) -> int:
        """Everything counted exactly: parameters, buffers, gradients and optimizer state."""
        return self.params_bytes + self.buffers_bytes + self.grads_bytes + self.optimizer_state_bytes

    @property
    def peak_bytes(self) -> int:
        return self.peak_allocated_bytes if self.peak_allocated_bytes is not None else (self.peak_rss_bytes or 0)

    def categories(self) -> dict[str, int]:
        """The stacked breakdown (bytes per category of :data:`CATEGORIES`)."""
        out = {c: int(getattr(self, f"{c}_bytes") or 0) for c in CATEGORIES}
        return out


class MemoryProfiler:
    """Cheap, always-on memory accounting for one rank (the trainer wraps its phases in :meth:`phase`).

    ``config`` is the run's ``memory`` section (:class:`peft_dist.config.MemoryConfig`); ``out_dir`` receives the
    allocator snapshots (``memory_snapshots/``)."""

    def __init__(self, rank: int, device: torch.device, enabled: bool = True, *, config: Any = None,
                 out_dir: str | Path | None = None, world_size: int = 1):
        self.rank = rank
        self.device = device
        self.enabled = enabled
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.report = MemoryReport(rank=rank, device=str(device), world_size=world_size)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.snapshot_steps = int(getattr(config, "snapshot_steps", 0) or 0)
        self.snapshot_max_entries = int(getattr(config, "snapshot_max_entries", 100_000))
        self.steps_seen = 0
        self.recording = False
        self._oom_dumped = False
        self.tracker = LiveStorageTracker() if (enabled and not self.cuda and
                                                getattr(config, "cpu_tracking", True)) else None
        """CPU: the live-storage tracker that measures the phase peaks (``memory.cpu_tracking``)."""
        self.tracked_steps = int(getattr(config, "cpu_tracked_steps", 0) or 0)
        """The tracker follows this many optimizer steps and one evaluation (0: all; ``memory.cpu_tracked_steps``)."""
        self.evals_seen = 0
        self._state_owner: tuple[Any, Any] | None = None  # (model, optimizer) of the last capture_state
        self._skipped_phases = False
        self.phase_seconds = 0.0
        """Wall time spent inside tracked phases (the tracker's overhead is reported as a share of it)."""
        if self.enabled and self.cuda and self.out_dir is not None:
            if self.snapshot_steps > 0:
                compat.record_cuda_memory_history(max_entries=self.snapshot_max_entries)
                self.recording = True
            if getattr(config, "snapshot_on_oom", False):
                compat.attach_cuda_oom_observer(self._on_oom)

    # ------------------------------------------------------------------ measuring
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Peak allocated/reserved bytes of the enclosed code (peaks reset on entry); the max over calls is kept."""
        if self.tracker is not None and self.tracker.phase is None and self._tracks(name):
            r = self.report
            started = time.perf_counter()
            if self._skipped_phases and self._state_owner is not None:
                # storage made while the tracker stood aside (gradients, reallocated buffers) is live state too
                self.tracker.observe_all(state_tensors(*self._state_owner))
            self._skipped_phases = False
            self.tracker.begin(name)
            try:
                yield
            finally:
                self.tracker.end()
                self.phase_seconds += time.perf_counter() - started
                peak = self.tracker.phase_peak.get(name, 0)
                r.phase_peak_allocated_bytes[name] = max(r.phase_peak_allocated_bytes.get(name, 0), peak)
            self._count(name)
            return
        if not (self.enabled and self.cuda):
            self._skipped_phases = self.tracker is not None
            yield
            self._count(name)
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        r = self.report
        allocated = torch.cuda.max_memory_allocated(self.device)
        reserved = torch.cuda.max_memory_reserved(self.device)
        r.phase_peak_allocated_bytes[name] = max(r.phase_peak_allocated_bytes.get(name, 0), allocated)
        r.phase_peak_reserved_bytes[name] = max(r.phase_peak_reserved_bytes.get(name, 0), reserved)
        if name == "optimizer":
            self.steps_seen += 1
            if self.recording and self.steps_seen >= self.snapshot_steps:
                self.dump_snapshot(f"rank{self.rank}_first{self.snapshot_steps}steps")
                compat.record_cuda_memory_history(enabled=None)
                self.recording = False

    def _tracks(self, name: str) -> bool:
        if self.tracked_steps == 0:
            return True
        return self.evals_seen == 0 if name == "eval" else self.steps_seen < self.tracked_steps

    def _count(self, name: str) -> None:
        if name == "optimizer":
            self.steps_seen += 1
        elif name == "eval":
            self.evals_seen += 1

    def capture_state(self, model: nn.Module, optimizer: Any) -> None:
        """Count parameter, buffer, gradient and optimizer bytes (call after backward and again after the step:
        gradients exist before the step, optimizer state after it; the larger of the two counts is kept)."""
        if not self.enabled:
            return
        r = self.report
        if self.tracker is not None:  # state no op of a phase has touched yet (unused parameters) is alive too
            self._state_owner = (model, optimizer)
            self.tracker.observe_all(state_tensors(model, optimizer))
        counts = state_bytes(model, optimizer)
        r.params_frozen_bytes = counts["params_frozen_bytes"]
        r.params_trainable_bytes = counts["params_trainable_bytes"]
        r.buffers_bytes = counts["buffers_bytes"]
        r.grads_bytes = max(r.grads_bytes, counts["grads_bytes"])
        r.optimizer_state_bytes = max(r.optimizer_state_bytes, counts["optimizer_state_bytes"])

    def finish(self) -> MemoryReport:
        r = self.report
        if self.cuda and self.enabled:
            if self.recording:  # the run was shorter than snapshot_steps: keep what was recorded
                self.dump_snapshot(f"rank{self.rank}_first{self.steps_seen}steps")
                compat.record_cuda_memory_history(enabled=None)
                self.recording = False
            phases = r.phase_peak_allocated_bytes
            r.peak_allocated_bytes = max(phases.values()) if phases else torch.cuda.max_memory_allocated(self.device)
            reserved = r.phase_peak_reserved_bytes
            r.peak_reserved_bytes = max(reserved.values()) if reserved else torch.cuda.max_memory_reserved(self.device)
            r.activations_bytes = max(0, r.peak_allocated_bytes - r.static_bytes)
        elif self.tracker is not None and r.phase_peak_allocated_bytes:
            r.peak_allocated_bytes = max(r.phase_peak_allocated_bytes.values())
            r.activations_bytes = max(0, r.peak_allocated_bytes - r.static_bytes)
            share = self.tracker.seconds / max(self.phase_seconds, 1e-9)
            r.notes.append(f"cpu: peaks are live tensor storage (dispatch-mode tracker, no allocator rounding); "
                           f"bookkeeping {self.tracker.seconds:.2f} s of {self.phase_seconds:.2f} s in tracked "
                           f"phases ({100 * share:.1f} %)")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r.peak_rss_bytes = rss if sys.platform == "darwin" else rss * 1024
        return r

    # ------------------------------------------------------------------ snapshots
    def dump_snapshot(self, stem: str) -> Path | None:
        """Write the allocator snapshot (with the recorded history, if any) as a memory_viz pickle."""
        if self.out_dir is None or not self.cuda:
            return None
        folder = self.out_dir / "memory_snapshots"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stem}.pickle"
        compat.dump_cuda_snapshot(str(path))
        self.report.snapshot_files.append(str(path))
        return path

    def _on_oom(self, device: int, alloc: int, device_alloc: int, device_free: int) -> None:
        # Called by the allocator when an allocation fails; the exception follows, so write what we know now.
        if self._oom_dumped:
            return
        self._oom_dumped = True
        path = self.dump_snapshot(f"oom_rank{self.rank}")
        print(f"[rank {self.rank}] CUDA out of memory (asked {alloc / MIB:.0f} MiB, {device_free / MIB:.0f} MiB "
              f"free); allocator snapshot: {path} (open it in https://pytorch.org/memory_viz)", file=sys.stderr)

    def write(self, path: Path, reports: list[MemoryReport]) -> None:
        write_memory_json(path, reports)


# ---------------------------------------------------------------------- files, metrics, text
def memory_document(reports: Iterable[MemoryReport], **context: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"schema": MEMORY_SCHEMA}
    if context:
        doc["context"] = context
    doc["ranks"] = [r.to_dict() for r in reports]
    return doc


def write_memory_json(path: str | Path, reports: Iterable[MemoryReport], **context: Any) -> Path:
    """``memory.json``: ``{"schema", ["context"], "ranks": [...]}`` (one report per rank)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(memory_document(reports, **context), indent=2) + "\n")
    return path


def read_memory_json(path: str | Path) -> list[MemoryReport]:
    """The reports of a ``memory.json`` (measured or estimated); errors name the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "memory.json"
    if not path.is_file():
        raise FileNotFoundError(f"memory report not found: {path}")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON memory report ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("ranks"), list):
        raise ValueError(f"{path}: not a memory report (expected an object with a 'ranks' list)")
    return [MemoryReport.from_dict(d, where=f"{path} ranks[{i}]") for i, d in enumerate(doc["ranks"])]


def memory_metrics(reports: Iterable[MemoryReport]) -> dict[str, float]:
    """Flat MLflow metrics: ``memory/rank{r}/{field}`` in bytes for every numeric field and phase peak."""
    out: dict[str, float] = {}
    for r in reports:
        prefix = f"memory/rank{r.rank}"
        for name in ("params_frozen_bytes", "params_trainable_bytes", "buffers_bytes", "grads_bytes",
                     "optimizer_state_bytes", "activations_bytes", "peak_allocated_bytes", "peak_reserved_bytes",
                     "peak_rss_bytes"):
            value = getattr(r, name)
            if value is not None:
                out[f"{prefix}/{name}"] = float(value)
        for phase, value in r.phase_peak_allocated_bytes.items():
            out[f"{prefix}/peak_allocated_{phase}_bytes"] = float(value)
    return out


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / MIB:,.1f}"


def format_memory_table(reports: list[MemoryReport]) -> str:
    """Per-rank table in MiB (the run summary prints it)."""
    rows = [("rank", "frozen", "trainable", "buffers", "grads", "optimizer", "activations", "peak alloc",
             "peak reserved")]
    for r in reports:
        rows.append((str(r.rank), _mib(r.params_frozen_bytes), _mib(r.params_trainable_bytes), _mib(r.buffers_bytes),
                     _mib(r.grads_bytes), _mib(r.optimizer_state_bytes), _mib(r.activations_bytes),
                     _mib(r.peak_allocated_bytes if r.peak_allocated_bytes is not None else r.peak_rss_bytes),
                     _mib(r.peak_reserved_bytes)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["memory per rank (MiB" + ("; peak = process RSS, no CUDA allocator)" if reports and
                                       reports[0].peak_allocated_bytes is None else ")")]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def compare_reports(measured: MemoryReport, estimated: MemoryReport) -> str:
    """Field-by-field comparison (MiB and estimated/measured ratio) of one rank's measured and estimated reports."""
    lines = [f"{'field':<26}{'measured':>14}{'estimated':>14}{'est/meas':>10}"]
    fields = ["params_frozen_bytes", "params_trainable_bytes", "buffers_bytes", "grads_bytes",
              "optimizer_state_bytes", "activations_bytes", "peak_allocated_bytes"]
    for name in fields:
        a, b = getattr(measured, name), getattr(estimated, name)
        ratio = f"{b / a:.3f}" if a and b is not None else "—"
        lines.append(f"{name:<26}{_mib(a):>14}{_mib(b):>14}{ratio:>10}")
    return "\n".join(lines)
