"""Bottleneck adapter after the MLP of every block (Houlsby-style placement, AdaptFormer-style module):
h ← MLP(x) + s·U·act(D·MLP(x)) (``sequential``, the VTAB "Adapter-8 (FFN)" baseline, 0.16 M on ViT-B) or
h ← MLP(x) + s·U·act(D·x) (``parallel``, AdaptFormer). U is zero-initialised so training starts at the pretrained
function. The non-linearity makes it unmergeable."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from peft_dist.config import check_range
from peft_dist.methods.base import AdaptedModule, Method
from peft_dist.methods.registry import register_method
from peft_dist.models.targets import replace_module, vit_blocks


@dataclass
class AdapterOptions:
    rank: int = 8
    """Bottleneck width."""
    style: Literal["sequential", "parallel"] = "sequential"
    scale: float = 1.0
    """Output scale s (AdaptFormer uses 0.1 with the parallel style)."""

    def validate(self) -> None:
        check_range("method.rank", self.rank, low=1)


class Bottleneck(nn.Module):
    def __init__(self, dim: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(dim, rank, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, dim, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class MlpWithAdapter(AdaptedModule):
    def __init__(self, base: nn.Module, dim: int, rank: int, style: str, scale: float):
        super().__init__()
        self.base = base
        ref = next(base.parameters())
        self.adapter = Bottleneck(dim, rank, device=ref.device, dtype=ref.dtype)
        self.style = style
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        return h + self.scale * self.adapter(h if self.style == "sequential" else x)


@register_method("adapter", AdapterOptions)
class Adapter(Method):
    def inject(self, model: nn.Module) -> None:
        o = self.options
        for i, block in enumerate(vit_blocks(model)):
            dim = block.mlp.fc2.out_features
            replace_module(model, f"blocks.{i}.mlp", MlpWithAdapter(block.mlp, dim, o.rank, o.style, o.scale))
