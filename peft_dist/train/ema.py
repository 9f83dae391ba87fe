"""``train.ema_decay``: an exponential moving average of the trainable tensors (SNELLA's FGVC protocol).

The official ``train_alloc_ema.py`` keeps timm's ``ModelEma`` (decay 0.9999, no decay warm-up) over a deepcopy of
the whole model and calls ``update(model)`` after every optimizer step; each entry becomes
``decay * ema + (1 - decay) * live`` (timm ``ModelEma._update``). The frozen backbone's entries never change, so
their average is the backbone itself: only the trainable tensors are averaged here (a ViT-H backbone copy would be
2.5 GB), with the same formula, in fp32.

Layout: each average has the type and placement of its parameter — a DTensor shard under FSDP2 (sharded the same
way), a plain tensor elsewhere (DDP and DeepSpeed ZeRO-1/2 replicate the module's parameters, so every rank keeps
the full average). Checkpoints hold it gathered to full tensors, like the parameters themselves.

Evaluation swaps the averages into the live parameters, evaluates, and swaps the live values back. The adapter
buffers (SNELLA's allocation) stay the live ones; the official EMA copy keeps the initial threshold instead, so its
EMA is evaluated dense (spec snell_snella §4.6 "Caveat", listed there as a bug not to reproduce silently).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class TrainableEma:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = float(decay)
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if any(p.dtype != torch.float32 for p in self.params.values()):
            found = sorted({str(p.dtype) for p in self.params.values()})
            raise ValueError(f"train.ema_decay: the trainable parameters are {', '.join(found)}; the average is "
                             "kept for fp32 parameters only")
        if any(hasattr(p, "ds_tensor") for p in self.params.values()):
            from peft_dist.config import ConfigError

            raise ConfigError("train.ema_decay: not available with DeepSpeed ZeRO-3 (its parameters are partitioned "
                              "outside the module); use dist.zero_stage 1 or 2, or dist.engine fsdp2")
        self.averages = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: ``ema = decay * ema + (1 - decay) * live`` on every trainable tensor."""
        averages, live = list(self.averages.values()), [p.detach() for p in self.params.values()]
        torch._foreach_mul_(averages, self.decay)
        torch._foreach_add_(averages, live, alpha=1.0 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """The averages in the live parameters for the duration (evaluation), the live values back afterwards."""
        live = {n: p.detach().clone() for n, p in self.params.items()}
        for n, p in self.params.items():
            p.detach().copy_(self.averages[n])
        try:
            yield
        finally:
            for n, p in self.params.items():
                p.detach().copy_(live[n])

    def full_tensors(self) -> dict[str, torch.Tensor]:
        """The averages as full tensors on CPU (collective under FSDP2: shards are gathered)."""
        return {n: (a.full_tensor() if hasattr(a, "full_tensor") else a).detach().cpu()
                for n, a in self.averages.items()}

    @torch.no_grad()
    def load_full_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`full_tensors` (any world size): each rank keeps its own shard of a DTensor average."""
        from peft_dist.models.backbone import CheckpointError

        if set(tensors) != set(self.averages):
            differ = sorted(set(tensors) ^ set(self.averages))
            raise CheckpointError(f"the checkpoint's EMA holds other tensors than this run trains, e.g. {differ[0]}")
        for n, average in self.averages.items():
            full = tensors[n].to(torch.float32)
            if hasattr(average, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full.to(average.device), average.device_mesh, average.placements)
            average.copy_(full.to(average.device) if not hasattr(full, "device_mesh") else full)
