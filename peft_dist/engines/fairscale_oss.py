"""``fairscale_oss`` (legacy extra): torch DDP for gradients + fairscale's OSS, which shards the optimizer state of
the trainable parameters over the ranks (ZeRO-1). Kept for users with fairscale pipelines; the native equivalent is
``torch.distributed.optim.ZeroRedundancyOptimizer``. fairscale's FSDP is deliberately not used (spec ecosystem.md
§3: unmaintained, GPU-only, rejects mixed requires_grad)."""
from __future__ import annotations

import torch

from peft_dist.engines.ddp import DDPEngine


def _import_oss():
    try:
        from fairscale.optim import OSS
    except ImportError:
        raise RuntimeError("dist.engine=fairscale_oss needs the legacy extra: pip install 'peft-dist[legacy]'") \
            from None
    return OSS


class FairscaleOSSEngine(DDPEngine):
    name = "fairscale_oss"

    def build_optimizer(self) -> torch.optim.Optimizer:
        OSS = _import_oss()
        o = self.cfg.optim
        groups = self.method.param_groups(self.module, o.weight_decay)
        if o.name == "adamw":
            return OSS(groups, optim=torch.optim.AdamW, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        return OSS(groups, optim=torch.optim.SGD, lr=o.lr, momentum=o.momentum)

    def save(self, path) -> None:
        """OSS shards optimizer state: consolidate on rank 0 and store it beside the adapters (torch.save of
        tensors and plain values only, so it loads with weights_only=True)."""
        import torch.distributed as dist

        from peft_dist.train.checkpoint import save_dcp

        self.optimizer.consolidate_state_dict(recipient_rank=0)
        if dist.get_rank() == 0:
            torch.save(self.optimizer.state_dict(), f"{path}/oss_optimizer.pt")
        save_dcp(self.module, None, path)

    def load(self, path) -> None:
        from peft_dist.train.checkpoint import load_dcp

        load_dcp(self.module, None, path)
        self.optimizer.load_state_dict(torch.load(f"{path}/oss_optimizer.pt", weights_only=True))
