"""LoRA (Hu et al. 2022) on timm ViTs: ΔW = (alpha / r)·B·A per target matrix, q/k/v as independent slices of the
fused qkv (design.md: never one low-rank update across all three). A Kaiming-uniform (a=√5, the nn.Linear
default), B zero, so training starts at the pretrained function. Merges exactly. In fp32/fp64 without LoRA dropout
the update is folded into the frozen GEMM (``functional.low_rank``: one GEMM forward, one for the input gradient, q/k/v
down-projections from one GEMM); otherwise a parallel branch. Parameter names and shapes are the same either way."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from peft_dist.config import check_range
from peft_dist.methods.base import AdaptedModule, Method, add_to_rows, frozen_linear
from peft_dist.methods.functional.low_rank import merged_low_rank_linear
from peft_dist.methods.registry import register_method
from peft_dist.models.targets import Target, check_targets, find_targets, group_by_path, replace_module


@dataclass
class LoraOptions:
    rank: int = 8
    alpha: float = 8.0
    """Scale is alpha / rank (alpha = rank gives scale 1, the VTAB LoRA-8 baseline)."""
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    dropout: float = 0.0

    def validate(self) -> None:
        check_range("method.rank", self.rank, low=1)
        check_range("method.dropout", self.dropout, low=0.0, high=1.0)
        check_targets(self.targets)


class LoRALinear(AdaptedModule):
    """A frozen Linear plus one low-rank update per row slice (one slice unless it is the fused qkv)."""

    def __init__(self, base: nn.Linear, slices: dict[str, slice], rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.slices = dict(slices)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        d_in = base.in_features
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, rows in self.slices.items():
            a = torch.empty(rank, d_in, **factory)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(rows.stop - rows.start, rank, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merges_into_frozen_gemm(x):
            return merged_low_rank_linear(x, self.base.weight, self.base.bias, self._rows, self.scale,
                                          self._factors())
        xd = self.dropout(x)
        y, dtype = frozen_linear(self.base, x)
        return add_to_rows(y, [
            (rows, F.linear(F.linear(xd, self.lora_A[name]), self.lora_B[name]) * self.scale)
            for name, rows in self.slices.items()]).to(dtype)

    def _merges_into_frozen_gemm(self, x: torch.Tensor) -> bool:
        """fp32/fp64 compute with no LoRA dropout: one GEMM on W0 + ΔW (``functional.low_rank``), measured faster
        than the parallel branch (``benchmarks/snell_step.py``: ``lora_over_plain_lora_step``). bf16/fp16 keep the
        parallel branch, whose frozen output stays fp32 until the delta is added (``frozen_linear``)."""
        if self.training and not isinstance(self.dropout, nn.Identity):
            return False
        if torch.is_autocast_enabled(x.device.type):
            return False
        return x.dtype in (torch.float32, torch.float64) and x.dtype == self.base.weight.dtype

    @property
    def _rows(self) -> tuple[tuple[int, int], ...]:
        return tuple((rows.start, rows.stop) for rows in self.slices.values())

    def _factors(self) -> list[torch.Tensor]:
        return [t for name in self.slices for t in (self.lora_A[name], self.lora_B[name])]

    def delta_weight(self) -> torch.Tensor:
        dw = torch.zeros_like(self.base.weight)
        for name, rows in self.slices.items():
            dw[rows] = (self.lora_B[name] @ self.lora_A[name]) * self.scale
        return dw

    def merged(self) -> nn.Linear:
        return merged_linear(self.base, self.delta_weight())


def merged_linear(base: nn.Linear, delta_weight: torch.Tensor, delta_bias: torch.Tensor | None = None) -> nn.Linear:
    """A plain nn.Linear holding ``W0 + ΔW`` (and ``b0 + Δb``), summed in at least fp32 then cast back."""
    out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None or delta_bias is not None,
                    device=base.weight.device, dtype=base.weight.dtype)
    acc = torch.promote_types(torch.float32, base.weight.dtype)  # fp64 layers merge in fp64
    with torch.no_grad():
        out.weight.copy_((base.weight.to(acc) + delta_weight.to(acc)).to(base.weight.dtype))
        if out.bias is not None:
            bias = base.bias.to(acc) if base.bias is not None else torch.zeros_like(out.bias, dtype=acc)
            if delta_bias is not None:
                bias = bias + delta_bias.to(acc)
            out.bias.copy_(bias.to(out.bias.dtype))
    out.requires_grad_(False)
    return out


def inject_per_target(model: nn.Module, targets: list[Target], make) -> None:
    """Wrap each targeted Linear once, passing ``make(base_linear, {target_name: rows})``."""
    for path, group in group_by_path(targets).items():
        base = model.get_submodule(path)
        replace_module(model, path, make(base, {t.name: t.rows for t in group}))


@register_method("lora", LoraOptions)
class LoRA(Method):
    def inject(self, model: nn.Module) -> None:
        o = self.options
        targets = find_targets(model, tuple(o.targets))
        inject_per_target(model, targets, lambda base, slices: LoRALinear(base, slices, o.rank, o.alpha, o.dropout))
