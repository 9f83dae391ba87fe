"""``peft-dist train --config F --dry-run --world-size 32``: check a large-world configuration on one CPU machine.

A fake process group (torch's ``fake`` backend: collectives return immediately) stands in for the cluster and the
model is built on the meta device (no weights are allocated or read), then the configured method is applied and
the configured engine shards it exactly as in a real run. What this proves: the config validates, the checkpoint
file exists, the method injects into this backbone, the engine's sharding plan applies at this world size. What it
reports: per-rank bytes of frozen and trainable parameters, gradients and Adam state, counted from the sharded
tensors; activations come from the memory estimator when it is available.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from peft_dist.config import RunConfig
from peft_dist.models.backbone import CheckpointError

ADAM_STATE_BYTES_PER_ELEMENT = 8  # exp_avg + exp_avg_sq in fp32
ZERO_MASTER_BYTES_PER_ELEMENT = 4
"""ZeRO keeps an fp32 master partition of the trainable parameters beside the moments (stage 1/2:
``single_partition_of_fp32_groups``, stage 3: ``fp32_partitioned_groups_flat``), whatever the model's dtype."""
ZERO3_PERSISTENCE_THRESHOLD = 100_000
"""DeepSpeed's ``stage3_param_persistence_threshold`` default: a parameter of at most this many elements stays whole
on every rank (beside its partition), partition_parameters.py."""


def _fake_world(world_size: int) -> None:
    from peft_dist.compat import fake_store

    if dist.is_initialized():
        raise RuntimeError("--dry-run starts its own fake process group; run it as a single process")
    dist.init_process_group("fake", store=fake_store(), rank=0, world_size=world_size)


def dry_run(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    from peft_dist.methods.base import count_trainable
    from peft_dist.train.trainer import build_model

    if world_size < 1:
        raise ValueError(f"--world-size: got {world_size}; allowed: >= 1")
    if cfg.model.checkpoint and not Path(cfg.model.checkpoint).is_file():
        raise CheckpointError(f"checkpoint not found: {cfg.model.checkpoint}")
    start = time.perf_counter()
    _fake_world(world_size)
    try:
        checkpoint, cfg.model.checkpoint = cfg.model.checkpoint, None  # weights stay on the meta device
        with torch.device("meta"):
            model, method = build_model(cfg)
        cfg.model.checkpoint = checkpoint
        counts = count_trainable(model)
        engine, d = cfg.dist.engine, cfg.dist
        if d.activation_checkpointing:
            from peft_dist.engines.engine import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        if engine == "fsdp2":
            from peft_dist.engines.fsdp2 import apply_fsdp2, cast_frozen

            if d.frozen_dtype == "bf16":
                cast_frozen(model, torch.bfloat16)
            apply_fsdp2(model, torch.device("cpu"), d.shard_backbone, d.reshard_after_forward, mixed_precision=False,
                        mesh_dims=d.mesh)
        ranks = [rank_bytes(model, engine, d.zero_stage, world_size, r) for r in range(world_size)]
        report = {
            "model": cfg.model.name, "method": cfg.method.name, "engine": engine, "world_size": world_size,
            "mesh": list(d.mesh) if engine == "fsdp2" and d.mesh else None,
            **counts,
            "per_rank_bytes": max(ranks, key=lambda b: b["total_static"]),  # the rank that must fit
            "ranks": ranks,
            "seconds": time.perf_counter() - start,
        }
        report["activations"] = _estimate_activations(cfg, world_size)
        return report
    finally:
        dist.destroy_process_group()


def _rows_held(rows: int, shards: int, rank: int) -> int:
    """Length of a sharded dimension on ``rank``: FSDP2 splits as ``torch.chunk`` does, ceil-sized chunks."""
    chunk = math.ceil(rows / shards)
    return max(0, min(chunk, rows - rank * chunk))


def _local_elements(p: torch.Tensor, rank: int, positions: dict[int, list[int]] | None = None) -> int:
    """Elements of parameter ``p`` that ``rank`` stores (DTensor: from its placements, any rank, not only ours).
    ``positions``: a cache of ``rank``'s coordinates per mesh (``DeviceMesh.mesh`` rebuilds its rank tensor on every
    read: three quarters of a 64-rank ViT-H dry run without it)."""
    placements = getattr(p, "placements", None)
    if not placements or p.dim() == 0:
        return p.numel()
    from torch.distributed.tensor import Shard

    mesh = p.device_mesh
    positions = {} if positions is None else positions
    if id(mesh) not in positions:
        positions[id(mesh)] = (mesh.mesh == rank).nonzero()[0].tolist()  # this rank's coordinates in the mesh
    position = positions[id(mesh)]
    shape = list(p.shape)
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            dim = placement.dim
            shape[dim] = _rows_held(shape[dim], mesh.size(mesh_dim), int(position[mesh_dim]))
    return math.prod(shape)


def rank_bytes(model: torch.nn.Module, engine: str, zero_stage: int, world_size: int, rank: int) -> dict[str, int]:
    """Static bytes of one rank, counted from the (sharded) parameters' placements; ZeRO's flat partitions are
    ceil(total / world) per rank: moments and the fp32 master partition (stage >= 1), fp32 gradients (stage >= 2),
    every parameter's partition plus the whole of each persistent (small) one (stage 3), as the memory estimator
    models them."""
    frozen = trainable = trainable_elems = 0
    zero3 = engine == "deepspeed" and zero_stage == 3
    positions: dict[int, list[int]] = {}
    for p in model.parameters():
        local = n = _local_elements(p, rank, positions)
        if zero3:
            n = math.ceil(local / world_size) + (local if local <= ZERO3_PERSISTENCE_THRESHOLD else 0)
        if p.requires_grad:
            trainable += n * p.element_size()
            trainable_elems += local
        else:
            frozen += n * p.element_size()
    grads, optim = trainable, ADAM_STATE_BYTES_PER_ELEMENT * trainable_elems
    if engine == "deepspeed":  # ZeRO partitions optimizer state (1+), gradients (2+), parameters (3)
        part = math.ceil(trainable_elems / world_size)
        optim = (ADAM_STATE_BYTES_PER_ELEMENT + ZERO_MASTER_BYTES_PER_ELEMENT) * part
        if zero_stage >= 2:
            grads = 4 * part
    return {"params_frozen": frozen, "params_trainable": trainable, "grads": grads, "optimizer_state": optim,
            "total_static": frozen + trainable + grads + optim}


def _estimate_activations(cfg: RunConfig, world_size: int) -> dict[str, Any] | None:
    """Activation/peak estimate from the memory estimator, when this checkout has one."""
    try:
        from peft_dist.memory.estimator import estimate_for_dry_run
    except ImportError:
        return None
    return estimate_for_dry_run(cfg, world_size)


def format_report(r: dict[str, Any]) -> str:
    mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    mesh = r.get("mesh")
    layout = f" as {mesh[0]} replicas x {mesh[1]} shards (HSDP mesh)" if mesh else ""
    lines = [
        f"dry run: {r['model']} + {r['method']} under {r['engine']}, world size {r['world_size']}{layout} "
        f"(fake process group, meta weights; {r['seconds']:.1f} s)",
        f"trainable parameters: {r['trainable_params']:,} ({r['trainable_params_without_head']:,} without the "
        f"head); frozen: {r['frozen_params']:,}",
    ]
    ranks = r["ranks"]
    group = mesh[1] if mesh else len(ranks)
    replicas_alike = bool(mesh) and all(b == ranks[i % group] for i, b in enumerate(ranks))
    if replicas_alike:  # HSDP: every shard group holds its own copy; one group's rows say it for all of them
        ranks = ranks[:group]
        lines.append(f"per-rank memory, MiB, shard group 0 = ranks 0-{group - 1} (each of the {mesh[0]} groups of "
                     f"{group} consecutive ranks, e.g. one node, holds the same; equal ranks share a row):")
    else:
        lines.append("per-rank memory, MiB (ranks with equal figures share a row):")
    lines.append(f"  {'ranks':<10}{'frozen':>12}{'trainable':>12}{'gradients':>12}{'optimizer':>12}{'static':>12}")
    for first, last, b in _runs_of_equal(ranks):
        label = str(first) if first == last else f"{first}-{last}"
        lines.append(f"  {label:<10}{mib(b['params_frozen']):>12}{mib(b['params_trainable']):>12}"
                     f"{mib(b['grads']):>12}{mib(b['optimizer_state']):>12}{mib(b['total_static']):>12}")
    if mesh:
        grads = r["per_rank_bytes"]["grads"]
        lines.append(f"HSDP traffic: each block's all-gather and the gradients' reduce-scatter stay inside a shard "
                     f"group of {mesh[1]} ranks; across the {mesh[0]} groups only each rank's adapter gradient shard "
                     f"is all-reduced, {mib(grads)} MiB per rank and step (frozen weights have no gradients)")
    act = r.get("activations")
    if act:
        lines.append("memory estimator, largest rank (MiB):")
        for k, v in act.items():
            if isinstance(v, (int, float)) and k.endswith("bytes"):
                lines.append(f"  {k.replace('_bytes', '').replace('_', ' '):<22}{mib(v):>12}")
    else:
        lines.append("  activations: not estimated (the memory estimator is not in this checkout)")
    return "\n".join(lines)


def _runs_of_equal(ranks: list[dict[str, int]]):
    """Consecutive ranks whose figures print alike (to 0.1 MiB)."""
    shown = [{k: round(v / 2**20, 1) for k, v in b.items()} for b in ranks]
    first = 0
    for i in range(1, len(ranks) + 1):
        if i == len(ranks) or shown[i] != shown[first]:
            yield first, i - 1, ranks[first]
            first = i
