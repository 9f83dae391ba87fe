"""Process-group set-up: pick the device per local rank and start NCCL (GPU) or gloo (CPU)."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from launcher.env import DistEnv


def pick_device(env: DistEnv) -> torch.device:
    """This rank's device, the one every engine uses (DeepSpeed is handed it: ``deepspeed_engine.device_rank``): the
    local rank modulo the GPUs the process sees (with ``srun --gpus-per-task=1`` each task sees one GPU, index 0)."""
    if torch.cuda.is_available():
        index = env.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_process_group(env: DistEnv, backend: str = "auto", timeout_s: int = 600) -> torch.device:
    """Start the default process group when the environment has more than one rank; returns this rank's device."""
    # torchrun's contract for the libraries that read it (DeepSpeed asserts on it): an srun task's SLURM_LOCALID,
    # 0 in a single process
    os.environ["LOCAL_RANK"] = str(env.local_rank)
    device = pick_device(env)
    if env.distributed and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return device


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def distinct_over_ranks(ids: set[int], device: torch.device) -> set[int]:
    """The union of every rank's ``ids`` (63-bit integers), gathered as tensors (identity on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return set(ids)
    mine = torch.tensor(sorted(ids), dtype=torch.int64, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([mine.numel()], dtype=torch.int64, device=device))
    longest = max(int(n) for n in sizes)
    padded = torch.zeros(longest, dtype=torch.int64, device=device)
    padded[:mine.numel()] = mine
    gathered = [torch.empty(longest, dtype=torch.int64, device=device) for _ in sizes]
    dist.all_gather(gathered, padded)
    return {int(i) for t, n in zip(gathered, sizes) for i in t[:int(n)].tolist()}


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over all ranks (identity on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
