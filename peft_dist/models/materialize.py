"""Sharded initialization: build on the meta device, shard, then give each rank only its slices of every tensor.

Why a recording and a replay. Parity tests compare an fsdp2 run with a 1-rank run of the same seed, so the sharded
build must give every tensor the value the plain CPU build gives it. Those values come from one global RNG stream
consumed in construction order (each Linear's kaiming init, timm's ``trunc_normal_`` over it, the head, then the
method's adapters), so they can be had only by running the same random ops in the same order. The meta build is
recorded op by op (a ``TorchDispatchMode``: meta ops draw no random numbers), and :func:`DeferredInit.replay` runs
the recording on CPU, one storage at a time:

* view ops are not run (a view is rebuilt from its storage, size, stride and offset);
* an op is run only if it draws random numbers (the stream must advance exactly as in the plain build) or writes
  content that is still needed; ``erfinv_``/``mul_``/``clamp_`` over a kaiming init that ``trunc_normal_``
  overwrites later, or over a tensor the checkpoint replaces, are skipped;
* a storage's memory exists from the op that fills it to its last needed use; when its content is final it is
  handed to ``assign`` (which keeps this rank's slice) and freed.

So a rank holds its shards, the largest single tensor and the small tensors (LayerNorm, biases) that are final
early. The checkpoint enters the replay where the plain build loads it (after the backbone, before the method), as
a lazy fill: a tensor nothing reads afterwards is read from the file as this rank's slice only
(:mod:`peft_dist.models.checkpoint_reader`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

FILL_OPS = {torch.ops.aten.uniform_.default, torch.ops.aten.normal_.default, torch.ops.aten.zero_.default,
            torch.ops.aten.fill_.Scalar, torch.ops.aten.random_.default, getattr(torch.ops.aten.random_, "from"),
            torch.ops.aten.random_.to, torch.ops.aten.bernoulli_.float, torch.ops.aten.exponential_.default}
"""In-place ops whose result does not depend on the target's old content (a full-storage target is overwritten)."""
COPY = torch.ops.aten.copy_.default


class _Ref:
    """A meta tensor as an op saw it: its storage (kept alive, so storage keys stay unique), size, stride, offset and
    dtype. Recording the tensor itself would not do: a Parameter is mutable, and a later ``p.data = ...`` (an
    engine's cast of the frozen weights to bf16) would change what the recording says an earlier op touched."""

    is_meta = True

    def __init__(self, t: torch.Tensor):
        self.storage, self.shape, self.dtype = t.untyped_storage(), t.size(), t.dtype
        self._stride, self._offset, self._contiguous = t.stride(), t.storage_offset(), t.is_contiguous()

    def untyped_storage(self):
        return self.storage

    def size(self):
        return self.shape

    def stride(self):
        return self._stride

    def storage_offset(self) -> int:
        return self._offset

    def is_contiguous(self) -> bool:
        return self._contiguous

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.dtype.itemsize


TENSORS = (torch.Tensor, _Ref)


def _snapshot(x):
    return _Ref(x) if isinstance(x, torch.Tensor) and x.is_meta else x


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _covers_storage(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.numel() * t.element_size() == t.untyped_storage().nbytes()


@dataclass
class _Op:
    func: Any
    args: tuple
    kwargs: dict
    out: Any
    generators: dict[int, torch.Tensor]
    """States of the explicit generators the op was given, when it ran (a generator's first state starts its
    stand-in in the replay)."""
    reads: set[int] = field(default_factory=set)
    writes: set[int] = field(default_factory=set)
    produced: set[int] = field(default_factory=set)
    overwritten: set[int] = field(default_factory=set)
    random: bool = False
    view: bool = False
    checkpoint_names: dict[int, str] = field(default_factory=dict)
    """Only for the checkpoint's pseudo-op: storage key -> the plain backbone's state-dict name it loads."""
    constant: torch.Tensor | None = None
    """Only for a meta tensor made from data (``torch.tensor(x)``, ``cpu_tensor.to(meta)``): its value on CPU."""
    needed: bool = True
    drop_after: set[int] = field(default_factory=set)
    final_after: set[int] = field(default_factory=set)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[_Op] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        generators = {id(g): g.get_state() for g in flat if isinstance(g, torch.Generator)}
        out = func(*args, **kwargs)
        self.ops.append(_Op(func, tree_map(_snapshot, args), tree_map(_snapshot, kwargs), tree_map(_snapshot, out),
                            generators))
        return out


class _ConstantRecorder(TorchFunctionMode):
    """A meta tensor made from data (``torch.tensor(x, device=meta)``: SNELL's sparsity buffer; ``cpu_tensor.to(meta)``:
    a mask's indices) is filled below the dispatcher, so the recording would miss its value: such calls are recorded
    here, with the value they give on CPU."""

    def __init__(self, ops: list[_Op]):
        super().__init__()
        self.ops = ops

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if isinstance(out, torch.Tensor) and out.device.type == "meta" and not any(t.is_meta for t in inputs) \
                and (inputs or func in (torch.tensor, torch.as_tensor)):
            with torch.device("cpu"):
                self.ops.append(_Op(None, (), {}, _Ref(out), {}, constant=func(*tree_map(_on_cpu, args),
                                                                           **tree_map(_on_cpu, kwargs))))
        return out


def _on_cpu(x):
    if isinstance(x, torch.device) and x.type == "meta" or isinstance(x, str) and x == "meta":
        return torch.device("cpu")
    return x


class MetaBuildError(RuntimeError):
    """The model cannot be built on the meta device (its construction reads tensor values)."""


class _LazyCheckpoint:
    """A storage whose content is a checkpoint tensor not yet read (read as a slice if nothing else reads it)."""

    def __init__(self, name: str):
        self.name = name


@dataclass
class DeferredInit:
    """A recorded meta build: replayed on CPU, it yields every tensor's plain-build value one storage at a time."""

    ops: list[_Op]
    rng_state: torch.Tensor
    names: dict[int, list[str]]
    """Storage key -> every FQN (parameters and buffers, as in the finished model) that views it."""
    tensors: dict[str, torch.Tensor]
    """FQN -> the finished model's tensor as recorded (its size, stride and offset into its storage)."""
    plain_names: dict[str, int]
    """The plain backbone's state-dict names (what a checkpoint holds) -> storage key."""
    checkpoint_at: int
    """Index in ``ops`` where the plain build loads the checkpoint."""
    storage_bytes: dict[int, int] = field(default_factory=dict)
    storage_order: dict[int, int] = field(default_factory=dict)
    """Storage key -> its rank in the recording (keys are addresses: their own order differs between processes)."""
    build_backbone: Callable[[], nn.Module] | None = None
    """Builds the plain backbone (no method), on the meta device: what a checkpoint is checked against."""
    checkpoint: str | None = None

    def replay(self, assign: Callable[[str, torch.Tensor | None, _LazyCheckpoint | None], None],
               checkpoint=None) -> None:
        """Run the recording; call ``assign(fqn, value, lazy)`` once per tensor when its value is final: ``value``
        the full tensor (CPU), or None with ``lazy`` naming the checkpoint tensor to read the slice of.
        ``checkpoint``: a :class:`~peft_dist.models.checkpoint_reader.CheckpointReader` or None (random init). Leaves
        the global RNG where the plain build leaves it."""
        ops = list(self.ops)
        if checkpoint is not None:
            ops.insert(self.checkpoint_at, self._checkpoint_op(checkpoint))
        self._plan(ops)
        real: dict[int, Any] = {}

        def real_of(t: torch.Tensor) -> torch.Tensor:
            key = _key(t)
            if key not in self.storage_bytes:  # made outside the recording (a constant): use as it is
                if t.is_meta:
                    raise MetaBuildError("dist.init=sharded: a meta tensor of the build was made where the "
                                         "recording cannot see its value; use dist.init=full")
                return t
            held = real.get(key)
            if held is None:  # content dead (or never filled): a fresh storage for an op that overwrites it
                held = real[key] = torch.UntypedStorage(self.storage_bytes[key])
            elif isinstance(held, _LazyCheckpoint):  # read in full: a later op uses the loaded value
                full = checkpoint.read(held.name).contiguous()
                held = real[key] = full.untyped_storage()
            return torch.empty(0, dtype=t.dtype).set_(held, t.storage_offset(), t.size(), t.stride())

        generators: dict[int, torch.Generator] = {}  # meta ops never advance a generator: the stand-ins do
        torch.set_rng_state(self.rng_state)
        with torch.no_grad():
            for op in ops:
                if not op.needed:
                    continue
                if op.checkpoint_names:
                    for key, name in op.checkpoint_names.items():
                        real[key] = _LazyCheckpoint(name)
                elif op.constant is not None:
                    real[_key(op.out)] = op.constant.clone().untyped_storage()
                else:
                    self._run(op, real_of, real, generators)
                # in recording order, the same on every rank (ZeRO-3's conversion is a collective)
                for key in sorted(op.final_after, key=self.storage_order.__getitem__):
                    held = real.pop(key)
                    for fqn in self.names[key]:
                        if isinstance(held, _LazyCheckpoint):
                            assign(fqn, None, held)
                        else:
                            t = self.tensors[fqn]
                            assign(fqn, torch.empty(0, dtype=t.dtype).set_(held, t.storage_offset(), t.size(),
                                                                             t.stride()), None)
                for key in op.drop_after:
                    real.pop(key, None)
        leftover = [n for k in real for n in self.names.get(k, [])]
        if leftover:
            raise RuntimeError(f"sharded init: {', '.join(leftover[:4])} never reached a final value")

    def _run(self, op: _Op, real_of, real: dict, generators: dict) -> None:
        def convert(x):
            if isinstance(x, TENSORS):
                return real_of(x)
            if isinstance(x, torch.Generator):  # one stand-in per generator, from its state at first use
                if id(x) not in generators:
                    generators[id(x)] = torch.Generator(device=x.device)
                    generators[id(x)].set_state(op.generators[id(x)])
                return generators[id(x)]
            if isinstance(x, torch.device) and x.type == "meta":
                return torch.device("cpu")
            return x

        args, kwargs = tree_map(convert, op.args), tree_map(convert, op.kwargs)
        out = op.func(*args, **kwargs)
        metas, _ = tree_flatten(op.out)
        outs, _ = tree_flatten(out)
        for m, r in zip(metas, outs):
            if isinstance(m, TENSORS) and _key(m) in op.produced:
                if r.stride() != m.stride() or r.storage_offset() != m.storage_offset():
                    raise MetaBuildError(f"{op.func}: the meta kernel lays its output out unlike the CPU kernel")
                real[_key(m)] = r.untyped_storage()

    def _checkpoint_op(self, checkpoint) -> _Op:
        names = {self.plain_names[n]: n for n in checkpoint.loads if n in self.plain_names}
        return _Op(None, (), {}, None, {}, overwritten=set(names), writes=set(names), checkpoint_names=names)

    def _plan(self, ops: list[_Op]) -> None:
        """Backward liveness over storages: which ops must run, what is dropped or final after each."""
        live = set(self.names)  # content the finished model needs
        touched_later: set[int] = set()
        for op in reversed(ops):
            op.needed = not op.view and (op.random or bool((op.writes | op.produced) & live))
            if not op.needed:
                continue
            touched = op.reads | op.writes | op.produced
            op.final_after = (touched & live) - touched_later
            op.drop_after = touched - live
            touched_later |= touched
            live -= op.overwritten | op.produced
            live |= op.reads


def _analyse(ops: list[_Op]) -> dict[int, int]:
    """Fill each op's storage sets; return every recorded storage's size in bytes."""
    sizes: dict[int, int] = {}
    for op in ops:
        if op.constant is not None:
            op.produced = {_key(op.out)}
            sizes[_key(op.out)] = op.out.untyped_storage().nbytes()
            continue
        if op.func.is_view:
            op.view = True
            continue
        schema = op.func._schema.arguments
        inputs = []
        for i, arg in enumerate(op.args):
            tensors = [t for t in tree_flatten(arg)[0] if isinstance(t, TENSORS)]
            written = i < len(schema) and schema[i].alias_info is not None and schema[i].alias_info.is_write
            inputs.append((tensors, written))
        for name, arg in op.kwargs.items():
            tensors = [t for t in tree_flatten(arg)[0] if isinstance(t, TENSORS)]
            spec = next((a for a in schema if a.name == name), None)
            inputs.append((tensors, spec is not None and spec.alias_info is not None and spec.alias_info.is_write))
        arg_keys = {_key(t) for tensors, _ in inputs for t in tensors}
        for tensors, written in inputs:
            for t in tensors:
                if _key(t) not in sizes:
                    continue  # made outside the recording
                (op.writes if written else op.reads).add(_key(t))
                if written:
                    op.reads.add(_key(t))
        if op.func in FILL_OPS or op.func is COPY:
            target = op.args[0]
            if _covers_storage(target) and _key(target) in sizes:
                op.overwritten.add(_key(target))
                if op.func in FILL_OPS or _key(op.args[1]) != _key(target):
                    op.reads.discard(_key(target))
        for t in tree_flatten(op.out)[0]:
            if isinstance(t, TENSORS) and _key(t) not in arg_keys:
                op.produced.add(_key(t))
                sizes[_key(t)] = t.untyped_storage().nbytes()
        op.random = torch.Tag.nondeterministic_seeded in op.func.tags
    return sizes


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    return tensors


def record_build(build_backbone: Callable[[], nn.Module], apply_method: Callable[[nn.Module], Any]):
    """Run ``build_backbone()`` then ``apply_method(model)`` on the meta device, recorded; returns
    ``(model, apply_method's result, DeferredInit)``. Python's and NumPy's RNGs advance as in the plain build; torch's
    global RNG is where it was (the replay advances it)."""
    rng_state = torch.get_rng_state()
    recorder = _Recorder()
    try:
        with torch.device("meta"), recorder, _ConstantRecorder(recorder.ops):
            model = build_backbone()
            plain = {name: _key(t) for name, t in model.state_dict(keep_vars=True).items()}
            checkpoint_at = len(recorder.ops)
            result = apply_method(model)
    except (NotImplementedError, RuntimeError) as e:
        if "meta" not in str(e):
            raise
        raise MetaBuildError(f"dist.init=sharded: the model cannot be built on the meta device ({e}); "
                             "use dist.init=full") from None
    torch.set_rng_state(rng_state)  # CPU ops inside the build (timm's drop-path linspace) are run again by the replay
    sizes = _analyse(recorder.ops)
    tensors = {fqn: _snapshot(t) for fqn, t in _named_tensors(model).items()}
    names: dict[int, list[str]] = {}
    for fqn, t in tensors.items():
        if _key(t) not in sizes:
            raise MetaBuildError(f"dist.init=sharded: {fqn} was not created during the build; use dist.init=full")
        names.setdefault(_key(t), []).append(fqn)
    deferred = DeferredInit(recorder.ops, rng_state, names, tensors, plain, checkpoint_at, sizes,
                            {key: i for i, key in enumerate(sizes)})
    return model, result, deferred


# ---------------------------------------------------------------------- materializing a sharded model
def local_slices(global_shape, mesh, placements) -> tuple[slice, ...]:
    """This rank's index into a tensor of ``global_shape`` laid out by ``placements`` on ``mesh``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tuple(global_shape), mesh, placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def materialize(model: nn.Module, device: torch.device) -> None:
    """Give ``model`` (built by :func:`record_build`, then sharded by ``fully_shard`` while on meta) real storage on
    ``device`` and fill this rank's shards with the plain build's values, the checkpoint's where it has them."""
    from torch.distributed.tensor import DTensor

    deferred: DeferredInit = model.__dict__.pop("deferred_init")
    model.to_empty(device=device)
    targets = _named_tensors(model)

    def index_of(fqn: str) -> tuple[slice, ...]:
        target = targets[fqn]
        if isinstance(target, DTensor):
            return local_slices(target.shape, target.device_mesh, target.placements)
        return tuple(slice(None) for _ in target.shape)

    checkpoint = _open_checkpoint(deferred, index_of)

    def assign(fqn: str, value: torch.Tensor | None, lazy: _LazyCheckpoint | None) -> None:
        target = targets[fqn]
        local = target.to_local() if isinstance(target, DTensor) else target
        index = index_of(fqn)
        local.copy_(checkpoint.read(lazy.name, index) if lazy is not None else value[index])

    deferred.replay(assign, checkpoint)


def _open_checkpoint(deferred: DeferredInit, index_of: Callable[[str], tuple[slice, ...]] | None):
    """The recorded build's checkpoint, or None; ``index_of(fqn)``: this rank's slice of a tensor (None: whole)."""
    from peft_dist.models.checkpoint_reader import CheckpointReader

    if deferred.checkpoint is None:
        return None
    fqn_of = {name: deferred.names[key][0] for name, key in deferred.plain_names.items() if key in deferred.names}
    with torch.device("meta"):
        plain = deferred.build_backbone()
    slice_of = (lambda name: index_of(fqn_of[name])) if index_of is not None else None
    return CheckpointReader(deferred.checkpoint, plain, slice_of=slice_of)


def materialize_zero3(model: nn.Module, ds_config: dict) -> None:
    """DeepSpeed ZeRO-3's partitioned initialization for a model from :func:`build_on_meta`: each parameter gets its
    plain-build (or checkpoint) value when the replay reaches it, and is at once partitioned by ``zero.Init``'s own
    conversion (rank 0's copy broadcast, this rank's partition kept, the full tensor freed), so a rank holds its
    partitions and one full tensor at a time. Buffers, never partitioned, get their full value. Parameters keep
    their identity: an optimizer built over them on meta stays valid."""
    import deepspeed

    deferred: DeferredInit = model.__dict__.pop("deferred_init")
    checkpoint = _open_checkpoint(deferred, None)
    # DeepSpeed's communication layer over the existing process group (deepspeed.initialize does the same later):
    # without it the config sees a world of 1
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False)
    partitioner = deepspeed.zero.Init(config_dict_or_path=ds_config)  # not entered: converts only what it is given
    converted: set[int] = set()

    def assign(fqn: str, value: torch.Tensor | None, lazy: _LazyCheckpoint | None) -> None:
        owner_path, _, name = fqn.rpartition(".")
        owner = model.get_submodule(owner_path)
        full = checkpoint.read(lazy.name) if lazy is not None else value.clone()
        param = owner._parameters.get(name)
        if param is None:
            owner._buffers[name] = full.to(owner._buffers[name].dtype)
            return
        if id(param) in converted:  # a tensor shared under two names
            return
        converted.add(id(param))
        # a meta tensor's data cannot be swapped for a CPU tensor's; swapping the whole objects keeps the identity
        torch.utils.swap_tensors(param, nn.Parameter(full.to(param.dtype), requires_grad=param.requires_grad))
        partitioner._convert_to_zero_parameters([param])

    deferred.replay(assign, checkpoint)


def build_on_meta(build_backbone: Callable[[], nn.Module], apply_method: Callable[[nn.Module], Any],
                  checkpoint: str | None):
    """:func:`record_build` for an engine that shards on meta and then calls :func:`materialize`: returns
    ``(model, apply_method's result)``, the model on meta carrying its recording (``model.deferred_init``)."""
    model, result, deferred = record_build(build_backbone, apply_method)
    deferred.build_backbone, deferred.checkpoint = build_backbone, checkpoint
    model.deferred_init = deferred
    return model, result


def is_deferred(model: nn.Module) -> bool:
    """True for a model from :func:`build_on_meta` not yet materialized."""
    return "deferred_init" in model.__dict__
