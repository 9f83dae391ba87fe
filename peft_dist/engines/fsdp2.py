"""``fsdp2``: per-parameter sharding with ``fully_shard`` (spec ecosystem.md §1), torchtitan style.

Order matters: the method has already injected and frozen (FSDP2 shards each parameter as a DTensor, so mixed
``requires_grad`` inside a block is fine); then each timm block is sharded, then the root. On GPU the compute is
bf16 with fp32 gradient reduction (``MixedPrecisionPolicy``); on CPU everything is fp32. The optimizer is built
afterwards from the (now DTensor) trainable parameters only, so Adam state exists only for adapter shards.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from peft_dist.config import ConfigError
from peft_dist.engines.engine import Engine
from peft_dist.models.materialize import is_deferred, materialize


def mesh_shape(world: int, shard: bool, mesh: Sequence[int] | None = None) -> tuple[int, ...]:
    """The device mesh's shape: ``dist.mesh`` as ``(replicate, shard)`` when given (HSDP), else ``(world,)`` (shard
    over every rank) or ``(world, 1)`` (replicate: a 2-D mesh with shard size 1 makes fully_shard behave like
    DDP)."""
    if mesh is None:
        return (world,) if shard else (world, 1)
    replicate, shards = mesh
    if replicate * shards != world:
        example = f"[{world // shards}, {shards}]" if world % shards == 0 else f"[1, {world}]"
        raise ConfigError(f"dist.mesh: got {list(mesh)} ({replicate * shards} ranks) for a world size of {world}; "
                          f"allowed: [replicate, shard] whose product is {world}, e.g. {example}")
    return replicate, shards


def _mesh(device: torch.device, shape: tuple[int, ...]):
    """init_device_mesh lays ranks out row-major: shard group i of a (R, S) mesh is ranks i*S .. i*S+S-1, so with
    S = ranks per node (torchrun and SLURM number a node's ranks consecutively) every shard group is one node."""
    from torch.distributed.device_mesh import init_device_mesh

    names = ("shard",) if len(shape) == 1 else ("replicate", "shard")
    return init_device_mesh(device.type, shape, mesh_dim_names=names)


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Store frozen weights in ``dtype``; trainable parameters (adapters, head) stay fp32."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


def balanced_placement(shards: int):
    """FSDP2 shards dim 0 by default, so a tensor with fewer rows than ranks lives on a few ranks only: SNELL's
    factors (2, d, r/2) on 2 of 32 ranks, LoRA's A (r, d) on r of them, pos_embed (1, N, D) on rank 0. Such tensors
    are sharded along their longest dimension that splits evenly (FSDP2 pads only dim 0), which spreads adapter
    state and Adam moments over every rank; without one, dim 0 it is."""
    from torch.distributed.tensor import Shard

    def placement(param: nn.Parameter):
        if param.dim() == 0 or param.shape[0] >= shards:
            return Shard(0)
        even = [d for d in range(1, param.dim()) if param.shape[d] % shards == 0]
        return Shard(max(even, key=lambda d: param.shape[d])) if even else Shard(0)

    return placement


FULL_PRECISION_STRATEGIES = ("auto", "override", "own_group")


def supports_dtype_override() -> bool:
    """torch >= 2.15: ``MixedPrecisionPolicy(param_dtype_override_fn=...)`` keeps chosen parameters in their own dtype
    inside a block's bf16 all-gather."""
    import dataclasses

    from torch.distributed.fsdp import MixedPrecisionPolicy

    return "param_dtype_override_fn" in {f.name for f in dataclasses.fields(MixedPrecisionPolicy)}


def resolve_full_precision_strategy(strategy: str) -> str:
    """``auto``: the per-parameter override where torch has it, else each owner module its own fp32 group."""
    if strategy not in FULL_PRECISION_STRATEGIES:
        raise ValueError(f"full-precision strategy {strategy!r}; allowed: {', '.join(FULL_PRECISION_STRATEGIES)}")
    if strategy == "auto":
        return "override" if supports_dtype_override() else "own_group"
    if strategy == "override" and not supports_dtype_override():
        raise RuntimeError(f"FSDP2's param_dtype_override_fn needs torch >= 2.15 (installed: {torch.__version__}); "
                           "use the own_group strategy")
    return strategy


def shard_full_precision_owners(model: nn.Module, full_precision: list[nn.Parameter], mesh, placement) -> None:
    """Give every module that owns full-precision parameters its own FSDP2 group with an fp32 policy, so its
    parameters are gathered in fp32 whatever the enclosing block's policy: the numerics of the per-parameter
    override, at the cost of one small all-gather per owner. An owner must hand its parameters out through its
    ``forward`` (SNELL's ``KernelFactors``), where FSDP2's hooks gather them; they stay gathered from forward to
    backward, since the tensors it returns are used after the call."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    keep = {id(p) for p in full_precision}
    fp32 = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not any(id(p) in keep for _, p in own):
            continue
        # recursive: fully_shard(module) also takes its children's parameters (a frozen base Linear would be gathered
        # in fp32 along with the adapter)
        mixed = [n for n, p in module.named_parameters() if id(p) not in keep]
        if mixed or type(module).forward is nn.Module.forward:
            why = f"also holds {', '.join(mixed)}" if mixed else "does not return them from forward()"
            raise RuntimeError(f"{name}: cannot keep its parameters in fp32 under FSDP2's bf16 policy on torch "
                               f"{torch.__version__}: the module {why}")
        fully_shard(module, mesh=mesh, mp_policy=fp32, reshard_after_forward=False, shard_placement_fn=placement)


def apply_fsdp2(model: nn.Module, device: torch.device, shard: bool, reshard_after_forward: bool,
                mixed_precision: bool, full_precision: list[nn.Parameter] = (),
                full_precision_strategy: str = "auto", mesh_dims: Sequence[int] | None = None) -> nn.Module:
    """``full_precision``: parameters gathered in their own dtype under the bf16 policy (SNELL's kernel factors);
    ``full_precision_strategy`` says how (see ``resolve_full_precision_strategy``). ``mesh_dims``: ``dist.mesh``
    (``[replicate, shard]``, HSDP: a 2-D mesh makes fully_shard shard within a group and replicate across groups,
    gradients reduce-scattered within a group and all-reduced across groups); None: see ``mesh_shape``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = _mesh(device, mesh_shape(dist.get_world_size(), shard, mesh_dims))
    place = balanced_placement(mesh["shard"].size())
    policy = MixedPrecisionPolicy()
    if mixed_precision:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if full_precision:
            strategy = resolve_full_precision_strategy(full_precision_strategy)
            if strategy == "override":
                keep = {id(p) for p in full_precision}
                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                              param_dtype_override_fn=lambda p: p.dtype if id(p) in keep else None)
            else:
                shard_full_precision_owners(model, list(full_precision), mesh, place)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    shard_placement_fn=place)
    # the root keeps its parameters (patch embed, tokens, norm, head) gathered after forward: they are small
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False, shard_placement_fn=place)
    return model


class FSDP2Engine(Engine):
    name = "fsdp2"
    forward_needs_all_ranks = True

    def wrap(self, model: nn.Module) -> nn.Module:
        if not dist.is_initialized():
            raise RuntimeError("dist.engine=fsdp2 needs a process group: start with `peft-dist launch --nproc N`")
        d = self.cfg.dist
        mixed = self.device.type == "cuda" and self.precision == "bf16"
        if d.frozen_dtype == "bf16":
            if not mixed:
                raise RuntimeError("dist.frozen_dtype=bf16 needs bf16 compute (a CUDA device and train.precision "
                                   "auto or bf16); on CPU keep dist.frozen_dtype=fp32")
            cast_frozen(model, torch.bfloat16)
        if self.precision != "fp16":  # FSDP2's bf16 policy casts parameters; autocast would double-cast
            self.autocast_dtype = None
        model = apply_fsdp2(model, self.device, d.shard_backbone, d.reshard_after_forward, mixed,
                            self.method.full_precision_parameters(model), mesh_dims=d.mesh)
        if is_deferred(model):  # built on meta: each rank fills its own shards only
            materialize(model, self.device)
        return model

    def autocast(self):
        """bf16 is FSDP2's policy (no autocast on top: it would cast twice); fp16 has no policy (its parameters
        gather in fp32) and runs under autocast, as on one process."""
        import contextlib

        return super().autocast() if self.precision == "fp16" else contextlib.nullcontext()

    def state_dict(self, adapters_only: bool = True) -> dict[str, torch.Tensor]:
        """Full (unsharded) adapter state on CPU, gathered without touching the frozen backbone. Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from peft_dist.methods.base import adapter_state_names

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=adapters_only)
        full = get_model_state_dict(self.module, options=opts)
        if not adapters_only:
            return full
        names = adapter_state_names(self.module)  # drops the backbone's own buffers, if it has any
        return {k: v for k, v in full.items() if k in names}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.module, sd, options=StateDictOptions(full_state_dict=True, strict=False))
