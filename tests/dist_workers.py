"""Entry points for processes spawned by the multi-process tests (importable by the spawn start method)."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init_gloo(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))


def train_shard_of_global_batches(rank: int, world: int, port: int, overrides: list[str], batches, out_file: str):
    """Train on this rank's contiguous share of each global batch; rank 0 saves ``{"adapters": trainable tensors,
    "allocation": SNELLA's per-matrix sparsity, "allocation_per_rank": [every rank's]}``."""
    train_methods_on_shards(rank, world, port, [(overrides, out_file)], batches)


def train_methods_on_shards(rank: int, world: int, port: int, runs: list[tuple[list[str], str]], batches):
    """:func:`train_shard_of_global_batches` for several runs in one process group (one spawn, many methods)."""
    from launcher.env import DistEnv, read_dist_env
    from peft_dist.config import load_config
    from peft_dist.train.trainer import Trainer

    torch.set_num_threads(1)
    if world > 1:
        init_gloo(rank, world, port)
    try:
        share = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in batches]
        for overrides, out_file in runs:
            trainer = Trainer(load_config(None, overrides), read_dist_env() if world > 1 else DistEnv(),
                              torch.device("cpu"), share, share)
            trainer.fit()
            adapters = trainer.engine.state_dict()  # a collective under sharding engines: every rank calls it
            allocation = torch.tensor(trainer.method.history[-1]["sparsity"], dtype=torch.float64) \
                if hasattr(trainer.method, "history") and trainer.method.history else torch.zeros(0)
            per_rank = [torch.zeros_like(allocation) for _ in range(world)]
            if world > 1:
                dist.all_gather(per_rank, allocation)
            else:
                per_rank = [allocation]
            if rank == 0:
                torch.save({"adapters": adapters, "allocation": allocation, "allocation_per_rank": per_rank},
                           out_file)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def engine_matrix(rank: int, world: int, port: int, engine: str, zero_stage: int, methods: list[str],
                  out_dir: str, result_file: str):
    """Train every method 2 steps under one engine and record the per-rank memory invariants."""
    import json

    from launcher.env import read_dist_env
    from peft_dist.config import load_config
    from peft_dist.memory.profiler import local_bytes
    from peft_dist.train.trainer import Trainer

    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    results = {}
    try:
        g = torch.Generator().manual_seed(rank)
        batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g))] * 2
        for method in methods:
            cfg = load_config(None, [
                "model.name=vit_tiny_patch16_224", "model.num_classes=5",
                "model.kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}",
                "data.source=synthetic", f"method.name={method}", f"dist.engine={engine}",
                f"dist.zero_stage={zero_stage}", f"train.out_dir={out_dir}/{method}", "train.progress=false",
                "tracking.enabled=false", "train.steps=2", "data.batch_size=4"])
            trainer = Trainer(cfg, read_dist_env(), torch.device("cpu"), batches, batches[:1])
            summary = trainer.fit()
            module, opt = trainer.engine.module, trainer.engine.optimizer
            inner = getattr(opt, "optimizer", opt)  # DeepSpeed wraps the torch optimizer
            moments = sum(local_bytes(v) for s in inner.state.values() for k, v in s.items()
                          if k in ("exp_avg", "exp_avg_sq"))
            trainable_local = sum(local_bytes(p) // p.element_size() for p in module.parameters() if p.requires_grad)
            results[method] = {
                "top1": summary["top1"],
                "optimizer_moment_bytes": moments,
                "trainable_local_elements": trainable_local,
                "trainable_elements": summary["trainable_params"],
                "frozen_with_grad": [n for n, p in module.named_parameters() if not p.requires_grad and
                                     p.grad is not None],
                "frozen_local_bytes": sum(local_bytes(p) for p in module.parameters() if not p.requires_grad),
                "frozen_full_bytes": summary["frozen_params"] * 4,
            }
        with open(f"{result_file}.rank{rank}", "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def fail_on_rank(rank: int, world: int, port: int, failing_rank: int, overrides: list[str]):
    """Train; ``failing_rank`` raises before its third step. Every rank must exit (non-zero), none may hang."""
    from launcher.env import read_dist_env
    from peft_dist.config import load_config
    from peft_dist.train.trainer import Trainer

    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g))] * 2
    trainer = Trainer(load_config(None, overrides), read_dist_env(), torch.device("cpu"), batches, batches)
    original = trainer.train_step

    def train_step(step, stream):
        if rank == failing_rank and step == 2:
            raise RuntimeError(f"rank {rank} failed on purpose")
        return original(step, stream)

    trainer.train_step = train_step
    trainer.fit()


def fsdp2_bf16_dtypes(rank: int, world: int, port: int, result_file: str, strategy: str = "auto"):
    """Under FSDP2's bf16 policy, SNELL's factors kept fp32 by ``strategy``: the dtypes SNELL's fused Function
    receives (input, frozen weight, factors), the dtype LoRA's factors are gathered in, the gradient dtypes of the
    sharded trainable parameters, and the loss and full SNELL factor gradients of one step (to compare
    strategies)."""
    import json

    import peft_dist
    import peft_dist.methods.functional.kernelized as kernelized
    from conftest import tiny_vit
    from peft_dist.engines.fsdp2 import apply_fsdp2

    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    try:
        seen = {}
        original = kernelized.KernelizedLinearFunction.apply

        def spy(x, weight, bias, out_features, slices, cfg, compute_dtype, *factors):
            seen.update(input=str(x.dtype), frozen_weight=str(weight.dtype), snell_factors=str(factors[0].dtype))
            return original(x, weight, bias, out_features, slices, cfg, compute_dtype, *factors)

        kernelized.KernelizedLinearFunction.apply = spy
        results = {}
        for method, options in (("snell", {"rank": 4, "mode": "merged"}), ("lora", {"rank": 4})):
            model = tiny_vit()
            applied = peft_dist.apply_method(model, method, **options)
            apply_fsdp2(model, torch.device("cpu"), True, True, True, applied.full_precision_parameters(model),
                        full_precision_strategy=strategy)
            lora_dtypes = set()
            for module in model.modules():
                if hasattr(module, "lora_A"):
                    module.register_forward_pre_hook(
                        lambda m, _: lora_dtypes.update(str(p.dtype) for p in m.lora_A.values()))
            seen.clear()
            loss = model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))).float().sum()
            loss.backward()
            factor_grads = [p.grad.full_tensor().double().flatten().tolist()
                            for p in applied.full_precision_parameters(model)]
            results[method] = {**seen, "lora_gathered": sorted(lora_dtypes), "loss": loss.item(),
                               "factor_grads": factor_grads,
                               "grads": sorted({str(p.grad.dtype) for p in model.parameters()
                                                if p.requires_grad and p.grad is not None})}
        if rank == 0:
            with open(result_file, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def crash_after_forward(rank: int, world: int, port: int, crash_rank: int):
    """One forward of a Linear, then ``crash_rank`` dies of SIGSEGV (a native crash in training)."""
    import os
    import signal

    torch.nn.Linear(2, 2)(torch.ones(1, 2))
    if rank == crash_rank:
        os.kill(os.getpid(), signal.SIGSEGV)


def crash_once_at_start_up(rank: int, world: int, port: int, flag_file: str):
    """Rank 1 dies of SIGABRT before any forward on the first attempt only (``flag_file`` remembers it); then both
    ranks run one forward."""
    import os
    import signal
    from pathlib import Path

    if rank == 1 and not Path(flag_file).exists():
        Path(flag_file).touch()
        os.kill(os.getpid(), signal.SIGABRT)
    torch.nn.Linear(2, 2)(torch.ones(1, 2))


def measured_memory_runs(rank: int, world: int, port: int, runs: list[list[str]]):
    """Train each config (a list of overrides with its own ``train.out_dir``) in one process group, the trainer
    building its own loaders; the memory profiler's per-rank reports land in each run's ``memory.json``."""
    from launcher.env import read_dist_env
    from peft_dist.config import load_config
    from peft_dist.train.trainer import Trainer

    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    try:
        for overrides in runs:
            Trainer(load_config(None, overrides), read_dist_env(), torch.device("cpu")).fit()
    finally:
        dist.destroy_process_group()
