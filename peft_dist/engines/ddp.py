"""``ddp``: torch DistributedDataParallel over the adapter-injected model. Frozen parameters are not registered
for reduction (DDP only buckets parameters that require grad), so only adapter gradients cross the wire."""
from __future__ import annotations

import contextlib

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from peft_dist.engines.engine import Engine


class DDPEngine(Engine):
    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        if not dist.is_initialized():
            raise RuntimeError("dist.engine=ddp needs a process group: start with `peft-dist launch --nproc N` "
                               "or torchrun (for one process use dist.engine=single)")
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.model.no_sync()
