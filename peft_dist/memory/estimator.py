"""CPU memory estimator: the profiler's report predicted without a GPU (spec ecosystem.md §7 "On a CPU-only machine").

``peft-dist memory --config F [overrides] --world-size N`` builds the run's model exactly as training does
(:func:`peft_dist.train.trainer.build_model`, on the meta device), gives it fake tensors (``FakeTensorMode``: shapes and
dtypes, no storage), applies the engine's own functions (``apply_activation_checkpointing``, ``cast_frozen``,
``apply_fsdp2`` on a ``fake`` process group of N ranks, on ``dist.mesh``'s 2-D mesh when set), builds the optimizer
from the method's parameter groups, lets the optimizer create its state (one step on zero gradients, so the traced step sees the state alive, as every
step of a real run after the first does) and traces one training step (forward, backward, optimizer step, the
method's hooks) plus one evaluation forward under torch's ``MemTracker`` (``FSDPMemTracker`` for fsdp2). Output: a
:class:`MemoryReport` (``source: estimated``) with the same fields the profiler measures. The tests check that this
equals tracing two real steps and that fake tensors change nothing (peaks of the same trace on real tensors).

How each field is obtained:

* parameters (frozen / trainable) and buffers: counted exactly on the full-size meta model after the engine's
  sharding (``local_bytes``); gradients and optimizer state: counted exactly from the fake tensors after the traced
  step, like :meth:`MemoryProfiler.capture_state` does on a real run;
* phase peaks and the breakdown at the peak: the tracker's running total of live tensor storage per phase.

Depth extrapolation (why the anchor study fits in CI). A ViT is a stack of identical blocks, so every quantity of a
step is affine in the depth D once each phase peaks at the same kind of moment: traced at D = d and d + 1, a
quantity q gives q(D) = q(d) + (D − d)·(q(d + 1) − q(d)). Two checks guard it on every run: the extrapolated
parameter bytes must equal the full meta model's exactly, and the line through depths d − 1 and d must predict the
traced depth d + 1 exactly, in every phase peak and every category at the peak (else the three depths move one block
deeper: torch 2.14's FSDP2 forward peaks elsewhere at 2 blocks; a reduce-scatter buffer can join the peak from 3
blocks on). Starting at d − 1 = 2, after two moves, or when the model is no deeper than that, the full depth is
traced. The tests compare extrapolated with full-depth traces byte for byte. ``extrapolate=False`` traces the full
depth.

Traps handled (ecosystem §7, found again here): timm's drop-path rates call ``.item()`` (the model is built on meta,
then given fake tensors); a device mesh cannot be created inside ``FakeTensorMode`` (sharding runs outside it: fake
tensors carry their mode); plain ``MemTracker`` hooks every parameter and a frozen one refuses hooks (only trainable
parameters are hooked here); torch's per-module peak bookkeeping is O(modules) per op (replaced by a global one, which
makes the trace ~8x faster); host reads of data (``float(t)``, ``int(t)``) and data-dependent shapes (boolean
indexing, ``nonzero``), e.g. in SNELL's threshold search, get placeholders: 0 and empty selections. Memory does not
depend on values, but a selection's size does; such answers are counted in the report's notes.

Not traced: ``ddp`` (its C++ reducer allocates real bucket storage: modelled as one persistent copy of the trainable
gradients), ``fairscale_oss`` (ddp + optimizer state / world) and ``deepspeed`` (ZeRO's flat buffers, fp32 master
partition and its ``reduce_bucket_size`` staging buffer are modelled from the generated DeepSpeed config on top of a
traced single-process step). CPU kernels stand in for CUDA ones (e.g. SDPA's CPU flash kernel for CUDA's efficient or
flash kernel: both keep only the output and the log-sum-exp), the caching allocator's 512-byte rounding,
fragmentation (``peak_reserved``) and cuBLAS workspaces are not modelled, and bf16 autocast follows CPU autocast's op
lists.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from peft_dist.config import ConfigError, RunConfig
from peft_dist.memory.profiler import MemoryReport, local_bytes, state_bytes

BASE_DEPTH = 2
"""Depth extrapolation traces from BASE_DEPTH on (one block has no 'middle' block)."""
TARGET_DEVICES = ("cuda", "cpu")
_STATE_FIELDS = ("params_frozen_bytes", "params_trainable_bytes", "buffers_bytes", "grads_bytes",
                 "optimizer_state_bytes")


# ====================================================================================== what the engine would do
@dataclass
class EnginePlan:
    """The engine's memory-relevant choices for this config, resolved exactly as the engines resolve them."""

    engine: str
    world_size: int
    target: str
    autocast_dtype: torch.dtype | None = None
    fsdp_mixed_precision: bool = False
    frozen_bf16: bool = False
    model_bf16: bool = False
    """deepspeed bf16 mode (only when a ``dist.deepspeed_config`` file enables it): DeepSpeed casts the whole module
    (frozen and trainable) to bf16."""
    frozen_matrices_bf16: bool = False
    """deepspeed with ``dist.frozen_dtype=bf16``: frozen Linear/Conv weights stored in bf16 (``cast_frozen_matrices``)."""
    activation_checkpointing: bool = False
    shard_backbone: bool = True
    reshard_after_forward: bool = True
    mesh: tuple[int, int] | None = None
    """fsdp2's ``dist.mesh`` (replicate, shard): per-rank state is divided by the shard size, not the world size."""
    notes: list[str] = field(default_factory=list)

    @property
    def sharded(self) -> bool:
        return self.engine == "fsdp2"


def resolve_plan(cfg: RunConfig, world_size: int, target: str = "cuda") -> EnginePlan:
    """Mirror of the engines' set-up decisions (``Engine._autocast_dtype``, ``FSDP2Engine.wrap``, DeepSpeed's bf16)."""
    from peft_dist.engines import engine_names

    if target not in TARGET_DEVICES:
        raise ConfigError(f"--device: got {target!r}; allowed: {', '.join(TARGET_DEVICES)}")
    if world_size < 1:
        raise ConfigError(f"--world-size: got {world_size}; allowed: >= 1")
    engine, d, precision = cfg.dist.engine, cfg.dist, cfg.train.precision
    if engine not in engine_names():
        raise ConfigError(f"dist.engine: unknown engine {engine!r}; allowed: {', '.join(engine_names())}")
    if engine == "single" and world_size > 1:
        raise ConfigError(f"dist.engine=single but --world-size {world_size}; use dist.engine=ddp or fsdp2")
    plan = EnginePlan(engine=engine, world_size=world_size, target=target, shard_backbone=d.shard_backbone,
                      reshard_after_forward=d.reshard_after_forward)
    if engine == "fsdp2" and d.mesh is not None:
        from peft_dist.engines.fsdp2 import mesh_shape

        plan.mesh = mesh_shape(world_size, d.shard_backbone, d.mesh)  # refuses a product other than world_size
    bf16 = precision == "bf16" or (precision == "auto" and target == "cuda")
    if precision == "fp16":
        from peft_dist.engines.engine import check_fp16_engine

        check_fp16_engine(engine)
        if d.frozen_dtype == "bf16":
            raise ConfigError("dist.frozen_dtype=bf16 needs bf16 compute; with train.precision=fp16 keep "
                              "dist.frozen_dtype=fp32")
        plan.autocast_dtype = torch.float16  # every fp16 engine autocasts (FSDP2 with no policy, as the engine)
    elif engine == "fsdp2":
        plan.fsdp_mixed_precision = target == "cuda" and bf16
        if d.frozen_dtype == "bf16":
            if not plan.fsdp_mixed_precision:
                raise ConfigError("dist.frozen_dtype=bf16 needs bf16 compute (a CUDA target and train.precision "
                                  "auto or bf16); on CPU keep dist.frozen_dtype=fp32")
            plan.frozen_bf16 = True
    elif engine == "deepspeed":  # DeepSpeedEngine: autocast over fp32 (or bf16-matrix) frozen weights
        from peft_dist.engines.deepspeed_engine import deepspeed_config

        if deepspeed_config(cfg, world_size, target == "cuda").get("bf16", {}).get("enabled"):
            plan.model_bf16 = True
        else:
            plan.autocast_dtype = torch.bfloat16 if bf16 else None
            if d.frozen_dtype == "bf16":
                if not bf16:
                    raise ConfigError("dist.frozen_dtype=bf16 needs bf16 compute under autocast (train.precision "
                                      "bf16, or auto on a CUDA target)")
                plan.frozen_matrices_bf16 = True
    else:
        plan.autocast_dtype = torch.bfloat16 if bf16 else None
    plan.activation_checkpointing = d.activation_checkpointing  # every engine applies it (Engine.__init__)
    return plan


def compute_dtype_name(plan: EnginePlan) -> str:
    """``fp16``, ``bf16`` or ``fp32``: what the forward computes in under this plan."""
    if plan.autocast_dtype == torch.float16:
        return "fp16"
    return "bf16" if (plan.autocast_dtype is not None or plan.fsdp_mixed_precision or plan.model_bf16) else "fp32"


# ====================================================================================== fake world and model
@contextlib.contextmanager
def fake_process_group(world_size: int):
    """A ``fake`` process group of ``world_size`` ranks (collectives return at once); reuses one that exists."""
    if dist.is_initialized():
        if dist.get_backend() != "fake" or dist.get_world_size() != world_size:
            raise RuntimeError("the memory estimator needs its own fake process group; run it in a process without "
                               f"one (found backend {dist.get_backend()!r}, world {dist.get_world_size()})")
        yield
        return
    from peft_dist.compat import fake_store

    dist.init_process_group("fake", store=fake_store(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _config_at_depth(cfg: RunConfig, depth: int | None, options: dict[str, Any] | None) -> RunConfig:
    out = copy.deepcopy(cfg)
    out.model.checkpoint = None  # weights never matter to memory, and meta tensors cannot hold them
    if depth is not None:
        out.model.kwargs = {**out.model.kwargs, "depth": depth}
    if options is not None:
        out.method.options = dict(options)
    return out


def build_meta_model(cfg: RunConfig):
    """The run's model (backbone + method) on the meta device, as the trainer builds it."""
    from peft_dist.train.trainer import build_model

    with torch.device("meta"):
        return build_model(cfg)


def materialize_fake(model: nn.Module, fake_mode) -> None:
    """Give every meta parameter, buffer and tensor attribute a fake CPU tensor of the same shape and dtype (shared
    tensors stay shared, ``requires_grad`` is kept)."""
    memo: dict[int, torch.Tensor] = {}

    def fake_like(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            with fake_mode:
                memo[id(t)] = torch.empty(t.shape, dtype=t.dtype, device="cpu")
        return memo[id(t)]

    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in memo:
                with fake_mode:
                    memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cpu"),
                                               requires_grad=p.requires_grad)
            module._parameters[name] = memo[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = fake_like(b)
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.is_meta:
                object.__setattr__(module, name, fake_like(value))


def input_shape(model: nn.Module, cfg: RunConfig) -> tuple[int, int, int]:
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None) or (cfg.data.img_size, cfg.data.img_size)
    proj = getattr(embed, "proj", None)
    channels = getattr(proj, "in_channels", 3)
    return int(channels), int(size[0]), int(size[1])


def apply_engine(model: nn.Module, plan: EnginePlan) -> None:
    """The engine's own sharding functions, in the engine's order (freeze → AC → cast → shard)."""
    if plan.activation_checkpointing:
        from peft_dist.engines.engine import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    if plan.engine == "fsdp2":
        from peft_dist.engines.fsdp2 import apply_fsdp2, cast_frozen

        if plan.frozen_bf16:
            cast_frozen(model, torch.bfloat16)
        method = getattr(model, "peft_method", None)
        apply_fsdp2(model, torch.device("cpu"), plan.shard_backbone, plan.reshard_after_forward,
                    plan.fsdp_mixed_precision, method.full_precision_parameters(model) if method else [],
                    mesh_dims=plan.mesh)
    elif plan.frozen_matrices_bf16:
        from peft_dist.engines.deepspeed_engine import cast_frozen_matrices

        cast_frozen_matrices(model, torch.bfloat16)
    elif plan.model_bf16:
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)


# ====================================================================================== the tracker
def _tracker_classes():
    """MemTracker / FSDPMemTracker with three changes (see the module docstring): frozen-safe gradient hooks, a
    cheap global peak kept per phase, placeholders for data-dependent reads under fake tensors."""
    from peft_dist.compat import fake_tensor_api, private_attr

    DataDependentOutputException = fake_tensor_api("DataDependentOutputException")
    DynamicOutputShapeException = fake_tensor_api("DynamicOutputShapeException")
    feature = "the memory estimator"
    FSDPMemTracker = private_attr("torch.distributed._tools.fsdp2_mem_tracker", "FSDPMemTracker", feature)
    MemTracker = private_attr("torch.distributed._tools.mem_tracker", "MemTracker", feature)
    _MemRefType = private_attr("torch.distributed._tools.mem_tracker", "_MemRefType", feature)

    aten = torch.ops.aten
    total_key = "Total"

    class PhaseMixin:
        def _init_phases(self, fake: bool) -> None:
            self.fake = fake
            self.phase: str | None = None
            self.phase_peak: dict[str, int] = {}
            self.phase_snapshot: dict[str, dict[str, int]] = {}
            self.placeholder_reads = 0
            self.empty_selections = 0

        def current_total(self) -> int:
            return sum(s[total_key] for s in self._curr_mem_snap.values())

        def begin_phase(self, name: str | None) -> None:
            self.phase = name
            if name is not None:
                self._note_phase_peak()

        def _note_phase_peak(self) -> None:
            total = self.current_total()
            if self.phase is not None and total >= self.phase_peak.get(self.phase, -1):
                self.phase_peak[self.phase] = total
                merged: dict[str, int] = {}
                for snap in self._curr_mem_snap.values():
                    for k, v in snap.items():
                        key = getattr(k, "value", str(k))
                        merged[key] = merged.get(key, 0) + v
                self.phase_snapshot[self.phase] = merged

        def _update_peak_stats(self, peak_state) -> None:  # replaces torch's O(modules) per-op bookkeeping
            for dev, snap in self._curr_mem_snap.items():
                if snap[total_key] > self._peak_mem.get(dev, 0):
                    self._peak_mem[dev] = snap[total_key]
                    self._peak_mem_snap[dev] = dict(snap)
            self._note_phase_peak()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if self.fake and func is aten._local_scalar_dense.default:
                try:
                    return func(*args, **kwargs)  # constants the fake mode knows come back exactly
                except DataDependentOutputException:
                    self.placeholder_reads += 1
                    t = args[0]
                    return False if t.dtype == torch.bool else (0.0 if t.is_floating_point() else 0)
            if self.fake and func in (aten.nonzero.default, aten.masked_select.default, aten.index.Tensor):
                try:
                    return super().__torch_dispatch__(func, types, args, kwargs)
                except DynamicOutputShapeException:
                    self.empty_selections += 1
                    return self._empty_selection(func, types, args, kwargs)
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _empty_selection(self, func, types, args, kwargs):
            x = args[0]
            new_empty = aten.new_empty.default
            if func is aten.nonzero.default:
                return super().__torch_dispatch__(new_empty, types, (x, [0, x.dim()]), {"dtype": torch.long})
            if func is aten.masked_select.default:
                return super().__torch_dispatch__(new_empty, types, (x, [0]), {})
            indices = []
            for idx in args[1]:
                if idx is not None and idx.dtype == torch.bool:
                    empty = super().__torch_dispatch__(new_empty, types, (idx, [0]), {"dtype": torch.long})
                    indices.extend([empty] * idx.dim())
                else:
                    indices.append(idx)
            return super().__torch_dispatch__(func, types, (x, indices), kwargs)

    class Tracker(PhaseMixin, MemTracker):
        def __init__(self, fake: bool):
            MemTracker.__init__(self)
            self._init_phases(fake)

        def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
            # torch hooks every parameter; a frozen one raises, and only trainable ones ever get a gradient
            def on_grad(grad: torch.Tensor) -> None:
                self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

            param_bytes = buffer_bytes = 0
            for p in module.parameters():
                param_bytes += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(p, _MemRefType.PARAM))
                if p.grad is not None:
                    self._update_and_maybe_create_winfos(p.grad, _MemRefType.GRAD)
                if install_grad_hooks and p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                    self._param_to_grad_hook_handles[p] = (
                        p.register_hook(on_grad),
                        p.register_post_accumulate_grad_hook(lambda q: on_grad(q.grad)))
            for b in module.buffers():
                buffer_bytes += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(b, _MemRefType.BUFFER))
            return param_bytes, buffer_bytes

    class ShardedTracker(PhaseMixin, FSDPMemTracker):
        def __init__(self, module: nn.Module, optimizer, fake: bool):
            FSDPMemTracker.__init__(self, module, optimizer)
            self._init_phases(fake)

    return Tracker, ShardedTracker


# ====================================================================================== one traced run
@dataclass
class Trace:
    """What one traced run yields; every field is affine in the depth of a ViT (see the module docstring)."""

    state: dict[str, int]
    phases: dict[str, int]
    breakdown: dict[str, dict[str, int]]
    placeholder_reads: int = 0
    empty_selections: int = 0
    notes: list[str] = field(default_factory=list)

    def extrapolate(self, other: "Trace", steps: int) -> "Trace":
        """self + steps·(other − self), field by field (other is one block deeper)."""
        def line(a: int, b: int) -> int:
            return a + steps * (b - a)

        def lines(a: dict, b: dict) -> dict:
            return {k: line(a.get(k, 0), b.get(k, 0)) for k in {**a, **b}}

        return Trace(state=lines(self.state, other.state), phases=lines(self.phases, other.phases),
                     breakdown={k: lines(self.breakdown.get(k, {}), other.breakdown.get(k, {}))
                                for k in {**self.breakdown, **other.breakdown}},
                     placeholder_reads=other.placeholder_reads, empty_selections=other.empty_selections,
                     notes=list(dict.fromkeys(self.notes + other.notes)))


def trace_step(cfg: RunConfig, plan: EnginePlan, *, fake: bool = True, steps: int = 1,
               eval_batch_size: int | None = None, attention: str = "sdpa") -> Trace:
    """Build the model of ``cfg`` (fake or real CPU tensors), apply the engine, create the optimizer state, then track
    ``steps`` training steps and one evaluation forward (``eval_batch_size`` images; 0 skips it). Needs the process
    group of ``plan`` (see :func:`fake_process_group`) for fsdp2. ``attention="explicit"`` traces the official
    PETL code's attention (:mod:`peft_dist.memory.attention`)."""
    from peft_dist.compat import fake_tensor_api
    from peft_dist.engines.engine import build_optimizer
    from peft_dist.methods.base import TrainPlan
    from peft_dist.train.trainer import build_model

    FakeTensorMode = fake_tensor_api("FakeTensorMode")

    Tracker, ShardedTracker = _tracker_classes()
    fake_mode = FakeTensorMode() if fake else None
    if fake:
        model, method = build_meta_model(cfg)
        materialize_fake(model, fake_mode)
    else:
        model, method = build_model(cfg)
    if attention != "sdpa":
        from peft_dist.memory.attention import use_attention

        use_attention(model, attention)
    apply_engine(model, plan)  # outside the fake mode: a device mesh cannot be built inside it
    notes: list[str] = []
    mode = fake_mode if fake else contextlib.nullcontext()
    with mode:
        optimizer = build_optimizer(method.param_groups(model, cfg.optim.weight_decay), cfg.optim)
    channels, height, width = input_shape(model, cfg)
    classes = cfg.model.num_classes
    in_dtype = torch.bfloat16 if plan.model_bf16 else torch.float32
    autocast = (lambda: torch.autocast("cpu", dtype=plan.autocast_dtype)) if plan.autocast_dtype else \
        contextlib.nullcontext
    grads_seen = 0

    def hook(name: str, *args) -> None:
        try:
            getattr(method, name)(model, *args)
        except Exception as e:  # a method hook that needs real values: the step is still traced
            notes.append(f"method hook {name} skipped under fake tensors ({type(e).__name__}: {e})")

    tracker = ShardedTracker(model, optimizer, fake) if plan.sharded else Tracker(fake)
    if not plan.sharded:
        tracker.track_external(model, optimizer)
    warm = [p for g in optimizer.param_groups for p in g["params"]]
    with mode, tracker:
        hook("on_train_start", TrainPlan(total_steps=steps + 1, steps_per_epoch=steps + 1, epochs=1))
        hook("on_epoch_start", 0)
        # Step 0, untimed: the optimizer creates its state (and the method its step statistics) from zero gradients,
        # so the traced steps see them alive as every step after the first one of a real run does; cheaper than
        # tracing a first training step. State of parameters a real step leaves without a gradient is taken out
        # again below.
        for p in warm:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        hook("on_step_end", 0)
        optimizer.zero_grad(set_to_none=True)
        for step in range(1, steps + 1):
            tracker.begin_phase("forward")
            images = torch.randn(cfg.data.batch_size, channels, height, width, dtype=in_dtype)
            labels = torch.randint(0, classes, (cfg.data.batch_size,))
            with autocast():
                logits = model(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.train.label_smoothing)
            tracker.begin_phase("backward")
            loss.backward()
            del logits, loss, images
            grads_seen = max(grads_seen, state_bytes(model)["grads_bytes"])
            unused = [p for p in warm if p.grad is None]
            tracker.begin_phase("optimizer")
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(warm, cfg.optim.grad_clip)
            optimizer.step()
            hook("on_step_end", step)
            optimizer.zero_grad(set_to_none=True)
            tracker.begin_phase(None)
            if step < steps:
                tracker.reset_mod_stats()  # torch's trackers refuse a second iteration otherwise
        state = state_bytes(model, optimizer)  # before eval: FSDP2 leaves the root unsharded after a forward
        batch = cfg.data.eval_batch_size if eval_batch_size is None else eval_batch_size
        if batch > 0:
            tracker.reset_mod_stats()
            tracker.begin_phase("eval")
            model.eval()
            with torch.no_grad(), autocast():
                model(torch.randn(batch, channels, height, width, dtype=in_dtype))
            model.train()
            tracker.begin_phase(None)
    state["grads_bytes"] = grads_seen
    phases = dict(tracker.phase_peak)
    stale = sum(local_bytes(v) for p in unused for v in optimizer.state.get(p, {}).values()
                if isinstance(v, torch.Tensor))
    if stale:  # state the warm-up made for parameters no real step reaches: alive in every phase, never real
        phases = {k: v - stale for k, v in phases.items()}
        state["optimizer_state_bytes"] -= stale
    return Trace(state=state, phases=phases, breakdown=dict(tracker.phase_snapshot),
                 placeholder_reads=tracker.placeholder_reads, empty_selections=tracker.empty_selections, notes=notes)


# ====================================================================================== the estimate
def model_depth(cfg: RunConfig) -> int | None:
    """Number of blocks of a ViT-style backbone that accepts ``depth=`` (None: not extrapolable)."""
    from peft_dist.models.backbone import create_backbone

    try:
        with torch.device("meta"):
            backbone = create_backbone(cfg.model.name, cfg.model.num_classes, None,
                                       drop_path_rate=cfg.model.drop_path_rate, **cfg.model.kwargs)
    except Exception:
        return None
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or "depth" not in _init_params(backbone):
        return None
    return len(blocks)


def _init_params(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(type(model).__init__).parameters)


def exact_state(cfg: RunConfig, plan: EnginePlan) -> dict[str, int]:
    """Parameter and buffer bytes per rank of the full model, counted after the engine's sharding (meta tensors)."""
    model, _ = build_meta_model(cfg)
    apply_engine(model, plan)
    counts = state_bytes(model)
    return {k: counts[k] for k in ("params_frozen_bytes", "params_trainable_bytes", "buffers_bytes")}


def estimate(cfg: RunConfig, world_size: int = 1, *, device: str = "cuda", fake: bool = True,
             extrapolate: bool = True, steps: int = 1, eval_batch_size: int | None = None,
             options_at_depth: Callable[[int | None], dict[str, Any]] | None = None,
             attention: str = "sdpa") -> MemoryReport:
    """Predict the per-rank :class:`MemoryReport` of training ``cfg`` on ``world_size`` ranks of ``device``.

    ``fake=False`` runs the same pipeline on real CPU tensors (what the tests compare against). ``options_at_depth``
    supplies method options per traced depth (None = full depth) when they depend on the depth (SPT allocations).
    ``attention``: ``sdpa`` (timm's, what training runs) or ``explicit`` (the official PETL code's softmax(QKᵀ)V,
    which keeps the B×H×N×N matrix: the papers' memory tables were measured so)."""
    from peft_dist.memory.attention import ATTENTION_KINDS

    if attention not in ATTENTION_KINDS:
        raise ConfigError(f"attention: got {attention!r}; allowed: {', '.join(ATTENTION_KINDS)}")
    started = time.perf_counter()
    plan = resolve_plan(cfg, world_size, device)
    notes = list(plan.notes)

    def cfg_at(depth: int | None) -> RunConfig:
        return _config_at_depth(cfg, depth, options_at_depth(depth) if options_at_depth else None)

    group = fake_process_group(world_size) if plan.sharded else contextlib.nullcontext()
    with group:
        trace_plan = plan if plan.engine != "deepspeed" else _deepspeed_trace_plan(plan)
        depth = model_depth(cfg) if (extrapolate and fake) else None
        trace = None
        if depth is not None and depth > BASE_DEPTH + 2:
            trace = _extrapolated(cfg_at, trace_plan, depth, steps, eval_batch_size, notes, attention)
        if trace is None:
            trace = trace_step(cfg_at(None), trace_plan, fake=fake, steps=steps, eval_batch_size=eval_batch_size,
                               attention=attention)
    report = _report_from_trace(trace, plan, device)
    if plan.engine in ("ddp", "fairscale_oss"):
        _add_ddp_buckets(report, plan)
    elif plan.engine == "deepspeed":
        _model_deepspeed(report, cfg, plan)
    notes += trace.notes
    if trace.placeholder_reads or trace.empty_selections:
        notes.append(f"{trace.placeholder_reads} data-dependent host reads answered 0 and {trace.empty_selections} "
                     "data-dependent selections taken as empty (fake tensors have no values)")
    notes.append(f"estimated on CPU with {'fake' if fake else 'real'} tensors in "
                 f"{time.perf_counter() - started:.1f} s")
    if attention != "sdpa":
        notes.append(f"attention traced as {attention} (the official code's softmax(QKᵀ)V)")
    report.notes = notes + report.notes
    return report


def _predicts(low: Trace, high: Trace, actual: Trace) -> bool:
    """Whether the line through ``low`` and ``high`` (one block apart) hits ``actual`` one block further, in every
    phase peak and every category at the peak. Where a phase peaks at a different kind of moment at the shallowest
    depth (torch 2.14's FSDP2 forward peak at 2 blocks, or a reduce-scatter buffer joining the peak from 3 blocks on),
    the line misses and the three points move one block deeper."""
    predicted = low.extrapolate(high, 2)
    return predicted.phases == actual.phases and all(
        {k: v for k, v in predicted.breakdown.get(p, {}).items() if v} ==
        {k: v for k, v in actual.breakdown.get(p, {}).items() if v} for p in set(predicted.breakdown) |
        set(actual.breakdown))


def _extrapolated(cfg_at, plan: EnginePlan, depth: int, steps: int, eval_batch_size: int | None,
                  notes: list[str], attention: str = "sdpa") -> Trace | None:
    """The trace of the full depth from the last two of three traced depths one block apart, once the first two
    predict the third exactly (module docstring), starting at BASE_DEPTH and moving one block deeper while they do
    not; None: trace the full depth (also when it is no deeper than the three traces)."""
    exact = exact_state(cfg_at(None), plan)
    traces: list[Trace] = []
    for d in range(BASE_DEPTH, min(depth, BASE_DEPTH + 5)):
        traces.append(trace_step(cfg_at(d), plan, fake=True, steps=steps, eval_batch_size=eval_batch_size,
                                 attention=attention))
        if len(traces) < 3:
            continue
        low, mid, high = traces[-3:]
        candidate = mid.extrapolate(high, depth - (d - 1))
        if not all(candidate.state[k] == exact[k] for k in exact):
            notes.append("depth extrapolation rejected (parameter bytes are not affine in depth for this method); "
                         "traced the full depth")
            return None
        if _predicts(low, mid, high):
            notes.append(f"depth extrapolation: traced {d - 2}, {d - 1} and {d} of {depth} blocks; parameter bytes "
                         "match the full model exactly")
            return candidate
    if depth > BASE_DEPTH + 2:
        notes.append("depth extrapolation rejected (the peak is not affine in depth over three blocks); traced "
                     "the full depth")
    return None


def _report_from_trace(trace: Trace, plan: EnginePlan, device: str) -> MemoryReport:
    r = MemoryReport(rank=0, device=device, source="estimated", world_size=plan.world_size)
    for k in _STATE_FIELDS:
        setattr(r, k, int(trace.state.get(k, 0)))
    r.phase_peak_allocated_bytes = {k: int(v) for k, v in trace.phases.items()}
    _finish_peak(r, trace.breakdown)
    return r


def _finish_peak(r: MemoryReport, breakdown: dict[str, dict[str, int]] | None = None) -> None:
    phases = r.phase_peak_allocated_bytes
    r.peak_allocated_bytes = max(phases.values()) if phases else r.static_bytes
    if breakdown is not None and phases:
        top = max(phases, key=phases.get)
        r.peak_breakdown_bytes = {k: int(v) for k, v in breakdown.get(top, {}).items() if v}
    r.activations_bytes = max(0, r.peak_allocated_bytes - r.static_bytes)


def _add_ddp_buckets(r: MemoryReport, plan: EnginePlan) -> None:
    """DDP keeps a flat bucket copy of every trainable gradient for the run's lifetime (gradient_as_bucket_view is
    off): alive in every phase, counted in the peak (and so in the rest, as the profiler measures it: its gradients
    are the parameters' ``.grad``); fairscale OSS additionally shards the optimizer state over the ranks."""
    buckets = r.params_trainable_bytes
    for k in r.phase_peak_allocated_bytes:
        r.phase_peak_allocated_bytes[k] += buckets
    r.peak_breakdown_bytes["DDP buckets (modelled)"] = buckets
    if plan.engine == "fairscale_oss":
        saved = r.optimizer_state_bytes - math.ceil(r.optimizer_state_bytes / plan.world_size)
        r.optimizer_state_bytes -= saved
        for k in ("optimizer", "eval", "forward", "backward"):
            if k in r.phase_peak_allocated_bytes:
                r.phase_peak_allocated_bytes[k] -= saved
    _finish_peak(r)


def _deepspeed_trace_plan(plan: EnginePlan) -> EnginePlan:
    """DeepSpeed is traced as one plain process (its own buffers are modelled afterwards)."""
    return EnginePlan(engine="single", world_size=1, target=plan.target, model_bf16=plan.model_bf16,
                      autocast_dtype=plan.autocast_dtype, frozen_matrices_bf16=plan.frozen_matrices_bf16,
                      activation_checkpointing=plan.activation_checkpointing)


def _zero3_parameter_bytes(cfg: RunConfig, world: int, elem: int, threshold: int) -> tuple[int, int]:
    """(frozen, trainable) bytes one ZeRO-3 rank holds: every parameter's ``ds_tensor`` partition of
    ceil(n / world) elements, and the full tensor too for a persistent one (n <= ``param_persistence_threshold``:
    partition_parameters.py ``Init._convert_to_deepspeed_param``), counted on the meta model."""
    model, _ = build_meta_model(cfg)
    frozen = trainable = 0
    for p in model.parameters():
        n = p.numel()
        held = elem * (math.ceil(n / world) + (n if n <= threshold else 0))
        if p.requires_grad:
            trainable += held
        else:
            frozen += held
    return frozen, trainable


def _model_deepspeed(r: MemoryReport, cfg: RunConfig, plan: EnginePlan) -> None:
    """ZeRO on top of the traced single-process step (stage_1_and_2.py / stage3.py of DeepSpeed 0.19.8): optimizer
    state and an fp32 master copy of the trainable parameters partitioned over the ranks (stage >= 1), gradients
    partitioned (stage >= 2), parameters partitioned (stage 3, frozen ones included, small ones persistent), plus
    the ``reduce_bucket_size``-element gradient staging buffer(s): stage 1/2 allocate them in backward and free them
    at its end (``independent_gradient_partition_epilogue`` → ``_release_ipg_buffers``), so they count in the
    backward peak only; stage 3 allocates one per dtype at start-up (``contiguous_gradients``) with its flat
    gradient partition, both alive in every phase."""
    from peft_dist.engines.deepspeed_engine import deepspeed_config

    elem = 2 if plan.model_bf16 else 4
    trainable_elems = r.params_trainable_bytes // elem
    ds = deepspeed_config(cfg, plan.world_size, plan.target == "cuda", trainable_elems)  # the engine's own config
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", cfg.dist.zero_stage))
    world = plan.world_size
    defaults = _deepspeed_zero_defaults()
    bucket = int(float(zero.get("reduce_bucket_size", defaults["reduce_bucket_size"])))
    part = math.ceil(trainable_elems / world)
    before = r.static_bytes
    adam_bytes = r.optimizer_state_bytes
    r.optimizer_state_bytes = math.ceil(adam_bytes / world) + 4 * part  # moments + the fp32 master partition
    if stage >= 2:
        r.grads_bytes = 4 * part
    if stage == 3:
        threshold = int(float(zero.get("stage3_param_persistence_threshold",
                                       defaults["stage3_param_persistence_threshold"])))
        r.params_frozen_bytes, r.params_trainable_bytes = _zero3_parameter_bytes(
            _config_at_depth(cfg, None, None), world, elem, threshold)
    delta = r.static_bytes - before
    if stage == 3:
        staging = bucket * elem  # IPGBucketZ3.buffer, one per communication dtype
        phases_with_staging = tuple(r.phase_peak_allocated_bytes)
    else:
        overlap = bool(zero.get("overlap_comm", defaults["overlap_comm"]))
        staging = bucket * (4 if stage == 1 else elem) * (2 if overlap else 1)
        phases_with_staging = ("backward",)
    for k in r.phase_peak_allocated_bytes:
        r.phase_peak_allocated_bytes[k] += delta + (staging if k in phases_with_staging else 0)
    r.peak_breakdown_bytes = {"ZeRO gradient staging buffer (reduce_bucket_size, modelled)": staging}
    r.notes.append(f"deepspeed ZeRO-{stage}: modelled (not traced): reduce_bucket_size {bucket:,} elements "
                   f"→ {staging / 2**20:,.0f} MiB staging in {', '.join(phases_with_staging)}")
    _finish_peak(r)


def _deepspeed_zero_defaults() -> dict[str, Any]:
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        fields = DeepSpeedZeroConfig.model_fields
        return {"reduce_bucket_size": fields["reduce_bucket_size"].default, "overlap_comm": False,
                "stage3_param_persistence_threshold": fields["param_persistence_threshold"].default}
    except Exception:  # DeepSpeed not installed: its documented defaults
        return {"reduce_bucket_size": 500_000_000, "overlap_comm": False, "stage3_param_persistence_threshold": 100_000}


def estimate_for_dry_run(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """Activation and peak figures for ``peft-dist train --dry-run`` (runs inside its fake process group)."""
    r = estimate(cfg, world_size, eval_batch_size=0)  # the training step: the dry run reports that
    return {"activations_bytes": r.activations_bytes, "peak_allocated_bytes": r.peak_allocated_bytes,
            **{f"peak_{k}_bytes": v for k, v in r.phase_peak_allocated_bytes.items()}}


# ====================================================================================== CLI
def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """``peft-dist memory --config F [overrides] [--world-size N]``: the memory report of a run, estimated on CPU."""
    parser.add_argument("--config", action="append", default=None,
                        help="run config YAML (the same files as for train); repeat to layer them")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.batch_size=32")
    parser.add_argument("--world-size", type=int, default=1, help="ranks of the run (default 1)")
    parser.add_argument("--device", choices=TARGET_DEVICES, default="cuda",
                        help="device the run would use: decides train.precision=auto and fsdp2's bf16 policy")
    parser.add_argument("--out", default=None, help="write the estimate as a memory.json file")
    parser.add_argument("--compare", default=None,
                        help="a measured memory.json (or run directory) to print beside the estimate")
    parser.add_argument("--no-extrapolate", action="store_true", help="trace the full depth (slower)")


def run_memory(args: argparse.Namespace) -> int:
    from peft_dist.config import load_config
    from peft_dist.memory.profiler import compare_reports, format_memory_table, read_memory_json, write_memory_json

    # The estimate reads no data and logs nothing: a config made for shards works without them.
    cfg = load_config(args.config, ["data.source=synthetic", "tracking.enabled=false", *(args.overrides or [])])
    report = estimate(cfg, args.world_size, device=args.device, extrapolate=not args.no_extrapolate)
    plan = resolve_plan(cfg, args.world_size, args.device)
    mesh = f" as {plan.mesh[0]} replicas x {plan.mesh[1]} shards" if plan.mesh else ""
    print(f"estimated memory: {cfg.model.name} + {cfg.method.name}, engine {cfg.dist.engine}, world "
          f"{args.world_size}{mesh}, batch {cfg.data.batch_size} per rank, {compute_dtype_name(plan)}, activation "
          f"checkpointing {'on' if plan.activation_checkpointing else 'off'}, target {args.device}")
    print(format_memory_table([report]))
    if report.peak_breakdown_bytes:
        print("at the peak (" + max(report.phase_peak_allocated_bytes, key=report.phase_peak_allocated_bytes.get)
              + "): " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in report.peak_breakdown_bytes.items()))
    for note in report.notes:
        print(f"note: {note}")
    if args.compare:
        measured = read_memory_json(args.compare)
        print(f"\nmeasured ({args.compare}, rank 0) vs estimated, MiB:")
        print(compare_reports(measured[0], report))
    if args.out:
        path = write_memory_json(args.out, [report], model=cfg.model.name, method=cfg.method.name,
                                 engine=cfg.dist.engine, world_size=args.world_size)
        print(f"wrote {path}", file=sys.stderr)
    return 0
