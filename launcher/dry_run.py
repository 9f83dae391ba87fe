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


def _fake_world(world_size: int) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("--dry-run starts its own fake process group; run it as a single process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)


def dry_run(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    from peft_dist.memory.profiler import local_bytes
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
            from peft_dist.dist.engine import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        if engine == "fsdp2":
            from peft_dist.dist.fsdp2 import apply_fsdp2, cast_frozen

            if d.frozen_dtype == "bf16":
                cast_frozen(model, torch.bfloat16)
            apply_fsdp2(model, torch.device("cpu"), d.shard_backbone, d.reshard_after_forward, mixed_precision=False)
        frozen = sum(local_bytes(p) for p in model.parameters() if not p.requires_grad)
        trainable_local = sum(local_bytes(p) for p in model.parameters() if p.requires_grad)
        trainable_elems = sum((p.to_local() if hasattr(p, "to_local") else p).numel()
                              for p in model.parameters() if p.requires_grad)
        grads, optim = trainable_local, ADAM_STATE_BYTES_PER_ELEMENT * trainable_elems
        if engine == "deepspeed":  # ZeRO partitions optimizer state (1+), gradients (2+), parameters (3)
            optim = ADAM_STATE_BYTES_PER_ELEMENT * math.ceil(counts["trainable_params"] / world_size)
            if d.zero_stage >= 2:
                grads = math.ceil(grads / world_size)
            if d.zero_stage == 3:
                frozen = math.ceil(frozen / world_size)
        report = {
            "model": cfg.model.name, "method": cfg.method.name, "engine": engine, "world_size": world_size,
            **counts,
            "per_rank_bytes": {"params_frozen": frozen, "params_trainable": trainable_local, "grads": grads,
                               "optimizer_state": optim, "total_static": frozen + trainable_local + grads + optim},
            "seconds": time.perf_counter() - start,
        }
        report["activations"] = _estimate_activations(cfg, world_size)
        return report
    finally:
        dist.destroy_process_group()


def _estimate_activations(cfg: RunConfig, world_size: int) -> dict[str, Any] | None:
    """Activation/peak estimate from the memory estimator, when this checkout has one."""
    try:
        from peft_dist.memory.estimator import estimate_for_dry_run
    except ImportError:
        return None
    return estimate_for_dry_run(cfg, world_size)


def format_report(r: dict[str, Any]) -> str:
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    b = r["per_rank_bytes"]
    lines = [
        f"dry run: {r['model']} + {r['method']} under {r['engine']}, world size {r['world_size']} "
        f"(fake process group, meta weights; {r['seconds']:.1f} s)",
        f"trainable parameters: {r['trainable_params']:,} ({r['trainable_params_without_head']:,} without the "
        f"head); frozen: {r['frozen_params']:,}",
        "per-rank memory (every rank alike):",
        f"  {'frozen parameters':<22}{mib(b['params_frozen']):>16}",
        f"  {'trainable parameters':<22}{mib(b['params_trainable']):>16}",
        f"  {'gradients':<22}{mib(b['grads']):>16}",
        f"  {'optimizer state':<22}{mib(b['optimizer_state']):>16}",
        f"  {'total (static)':<22}{mib(b['total_static']):>16}",
    ]
    act = r.get("activations")
    if act:
        for k, v in act.items():
            if isinstance(v, (int, float)) and k.endswith("bytes"):
                lines.append(f"  {k.replace('_bytes', '').replace('_', ' '):<22}{mib(v):>16}")
    else:
        lines.append("  activations: not estimated (the memory estimator is not in this checkout)")
    return "\n".join(lines)
