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
    """Train on this rank's contiguous share of each global batch and save the trainable tensors (rank 0)."""
    from launcher.env import read_dist_env
    from peft_dist.config import load_config
    from peft_dist.train.trainer import Trainer

    torch.set_num_threads(1)
    if world > 1:
        init_gloo(rank, world, port)
    try:
        share = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in batches]
        cfg = load_config(None, overrides)
        trainer = Trainer(cfg, read_dist_env() if world > 1 else __import__("launcher").DistEnv(),
                          torch.device("cpu"), share, share)
        trainer.fit()
        adapters = trainer.engine.state_dict()  # a collective under sharding engines: every rank calls it
        if rank == 0:
            torch.save(adapters, out_file)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
