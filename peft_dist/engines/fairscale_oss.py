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

    def full_state(self):
        """OSS shards optimizer state over the ranks: consolidate it on rank 0, keyed by parameter FQN."""
        import torch.distributed as dist

        from peft_dist.train.checkpoint import FullState

        model = self.state_dict(adapters_only=True)
        self.optimizer.consolidate_state_dict(recipient_rank=0)  # collective
        if dist.get_rank() != 0:
            return FullState({}, {}, [])
        consolidated = self.optimizer.state_dict()
        order = [n for group in self.param_group_fqns() for n in group]
        ids = [i for g in consolidated["param_groups"] for i in g["params"]]
        fqn_of = dict(zip(ids, order))
        state = {fqn_of[i]: s for i, s in consolidated["state"].items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [fqn_of[i] for i in g["params"]]}
                  for g in consolidated["param_groups"]]
        return FullState(model, state, groups)

    def load_full_state(self, full) -> None:
        """Every rank hands OSS the whole state in torch's positional format; OSS keeps its own share."""
        from peft_dist.engines.engine import check_param_groups

        current = self.param_group_fqns()
        check_param_groups(current, full.param_groups)
        self.load_state_dict(full.model)
        index = {n: i for i, n in enumerate(n for group in current for n in group)}
        groups = [{**{k: v for k, v in saved.items() if k != "params"}, "params": [index[n] for n in now]}
                  for now, saved in zip(current, full.param_groups)]
        state = {index[n]: dict(s) for n, s in full.optimizer_state.items() if n in index}
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
