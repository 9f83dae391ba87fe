"""ARC, Adapter Re-Composing (Dong et al., NeurIPS 2023), on timm ViTs (spec ``spt_arc_hta.md`` §2).

Per block l, a linear adapter after LN1 (and, for ``arc``, after LN2):

    Z' = Z + Drop(Z · P · diag(c_l)) · Pᵀ + b_l

with one P ∈ R^{D×r} shared by every block (one for the attention side, one for the MLP side; the up-projection is
Pᵀ) and per-block c_l ∈ R^r, b_l ∈ R^D (§2.1). In a timm block LN1's output feeds only ``attn.qkv`` and LN2's only
``mlp.fc1``, so the adapter is applied at the input of those Linears; that is exactly the same function, and it is
also where it folds (§2.2): W ← W·(I + P diag(c) Pᵀ), b ← b + W·b_l. ``arc_att`` keeps only the attention side.

The shared projections live in one root-level module (``model.arc_projections``), not in any block, so an engine
that shards per block never has to gather them across units (§5.3 item 11); each block's module holds a plain
reference to it. The trainable set is exactly the ARC parameters plus the head (the release's freeze bug trained
only the head, §2.3).

Init (official, §2.1): P Xavier-uniform, c_attn zeros (identity at step 0), c_mlp Xavier-uniform on a 1×r tensor
(``mlp_scale_init: zeros`` is the exact-identity ablation, §5.4 item 14), b zeros, head zeros (``zero_head``).
Weight decay applies to every trainable tensor, biases and c included, as in the official scripts (§2.3), unless
``decay_vectors: false``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from peft_dist.config import check_range
from peft_dist.methods.base import (AdaptedModule, Method, adapter_parameters, compute_dtype, frozen_linear,
                                    head_parameters)
from peft_dist.methods.lora import merged_linear
from peft_dist.methods.registry import register_method
from peft_dist.models.targets import replace_module, vit_blocks

SIDES = ("attn", "mlp")
_SIDE_MODULE = {"attn": "attn.qkv", "mlp": "mlp.fc1"}


@dataclass
class ARCOptions:
    rank: int = 50
    """Bottleneck width r of the shared projections (``adapter_dim`` 50 for ViT-B/L/H, spec §2.1)."""
    dropout: float = 0.1
    """Dropout on the r-dim bottleneck (``adapt_drop``, official default 0.1)."""
    mlp_scale_init: Literal["xavier", "zeros"] = "xavier"
    """c_mlp init: the official Xavier-uniform on 1×r, or zeros for an exact identity at step 0 (§5.4 item 14)."""
    zero_head: bool = True
    """Zero the classification head at injection (official ``zero_head=True``)."""
    decay_vectors: bool = True
    """Official: weight decay on every trainable tensor (c and b too); false: no decay on 1-D tensors."""

    def validate(self) -> None:
        check_range("method.rank", self.rank, low=1)
        check_range("method.dropout", self.dropout, low=0.0, high=1.0)


class ARCProjections(nn.Module):
    """The shared P of each side, D×r, registered once at the model root."""

    def __init__(self, dim: int, rank: int, sides: tuple[str, ...], device=None, dtype=None):
        super().__init__()
        for side in sides:
            p = torch.empty(dim, rank, device=device, dtype=dtype)
            nn.init.xavier_uniform_(p)  # bound √(6/(D+r)), ≈0.086 for D=768, r=50
            self.register_parameter(side, nn.Parameter(p))


class ARCLinear(AdaptedModule):
    """The Linear after LN1/LN2 with ARC's adapter on its input: base(Z + Drop(Z·P·diag(c))·Pᵀ + b)."""

    def __init__(self, base: nn.Linear, projections: ARCProjections, side: str, rank: int, dropout: float,
                 scale_init: str):
        super().__init__()
        self.base = base
        # A plain reference (not a submodule): P is owned by the model root and shared by every block.
        object.__setattr__(self, "_projections", projections)
        self.side = side
        w = base.weight
        factory = {"device": w.device, "dtype": w.dtype if w.dtype == torch.float64 else torch.float32}
        self.scale = nn.Parameter(torch.zeros(rank, **factory))
        if scale_init == "xavier":
            bound = math.sqrt(6.0 / (1 + rank))  # Xavier-uniform of a 1×r tensor, as officially
            nn.init.uniform_(self.scale, -bound, bound)
        self.adapter_bias = nn.Parameter(torch.zeros(base.in_features, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def projection(self) -> torch.Tensor:
        return getattr(self._projections, self.side)

    def adapt(self, z: torch.Tensor) -> torch.Tensor:
        p = self.projection
        return z + self.dropout(z.matmul(p) * self.scale).matmul(p.t()) + self.adapter_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if compute_dtype(self.base, x) in (torch.float32, torch.float64):
            return self.base(self.adapt(x))
        return self._forward_reduced_precision(x)

    def _forward_reduced_precision(self, x: torch.Tensor) -> torch.Tensor:
        """bf16/fp16 compute: the same function by linearity, W·(Z + δZ) + bias = base(Z) + W·δZ, with W·δZ =
        Drop(Z·P·diag(c))·(W·P)ᵀ + W·b formed in fp32 and added to the frozen output before its one rounding
        (``frozen_linear``). Forming Z + δZ in bf16 first (FSDP2's policy gives a bf16 Z) rounds a δZ below half
        an ulp of Z back to Z on every token, so the adapter would not act at all at small scales (issue 17)."""
        y, dtype = frozen_linear(self.base, x)
        acc = torch.promote_types(torch.float32, x.dtype)  # fp64 stays fp64 (the equivalence test runs there)
        with torch.autocast(x.device.type, enabled=False):
            p = self.projection.to(acc)
            w = self.base.weight.to(acc)
            u = self.dropout(x.to(acc).matmul(p) * self.scale.to(acc))
            delta = u.matmul(w.matmul(p).t()) + F.linear(self.adapter_bias.to(acc), w)
        return (y + delta).to(dtype)

    def recomposed(self) -> torch.Tensor:
        """A = I + P·diag(c)·Pᵀ in float64 (symmetric, spec §2.1)."""
        p = self.projection.detach().double()
        return torch.eye(p.shape[0], dtype=torch.float64, device=p.device) + (p * self.scale.detach().double()) @ p.t()

    def merged(self) -> nn.Linear:
        """W ← W·A, b ← b + W·b_l with the old W (spec §2.2), computed in float64."""
        w = self.base.weight.detach().double()
        new_w = w @ self.recomposed()
        delta_b = w @ self.adapter_bias.detach().double()
        return merged_linear(self.base, new_w - w, delta_b)


@register_method("arc", ARCOptions)
class ARC(Method):
    """Adapters on both sides (attention and MLP), 96,432 parameters on ViT-B before the head (spec §2.1)."""

    sides: tuple[str, ...] = SIDES
    projections_name = "arc_projections"

    def inject(self, model: nn.Module) -> None:
        o = self.options
        blocks = vit_blocks(model)
        first = blocks[0].get_submodule(_SIDE_MODULE["attn"])
        dim = first.in_features
        ref = first.weight
        dtype = ref.dtype if ref.dtype == torch.float64 else torch.float32
        projections = ARCProjections(dim, o.rank, self.sides, device=ref.device, dtype=dtype)
        setattr(model, self.projections_name, projections)
        for i, block in enumerate(blocks):
            for side in self.sides:
                path = f"blocks.{i}.{_SIDE_MODULE[side]}"
                base = model.get_submodule(path)
                scale_init = "zeros" if side == "attn" else o.mlp_scale_init
                replace_module(model, path, ARCLinear(base, projections, side, o.rank, o.dropout, scale_init))
        if o.zero_head:
            with torch.no_grad():
                for p in head_parameters(model):
                    p.zero_()

    def trainable_set(self, model: nn.Module) -> Iterator[nn.Parameter]:
        yield from getattr(model, self.projections_name).parameters()
        yield from adapter_parameters(model)
        yield from head_parameters(model)

    def full_precision_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Every ARC tensor: the adapter's W·δZ is formed in fp32 under bf16 compute (``ARCLinear``), so FSDP2's
        policy gathers P, c and b in fp32 instead of rounding them (they are small: 2·D·r + L·(r + D) entries).
        Where torch lacks FSDP2's per-parameter override (2.14) none: its fallback, an fp32 FSDP2 group per owner
        module, cannot separate c and b from the frozen Linear beside them. They are then gathered in bf16 and
        converted for the fp32 W·δZ, a 2⁻⁹ relative rounding of the delta's own factors, not the sum's loss."""
        from peft_dist.engines.fsdp2 import supports_dtype_override

        if not supports_dtype_override():
            return []
        return [*getattr(model, self.projections_name).parameters(), *adapter_parameters(model)]

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        if not self.options.decay_vectors:
            return super().param_groups(model, weight_decay)
        return [{"params": [p for _, p in self.trainable_parameters(model)], "weight_decay": weight_decay}]

    def merge(self, model: nn.Module) -> nn.Module:
        model = super().merge(model)  # every ARCLinear folds while the shared projections still exist
        if hasattr(model, self.projections_name):
            delattr(model, self.projections_name)
        return model

    def summary(self, model: nn.Module) -> dict[str, Any]:
        return {"sides": list(self.sides), "rank": self.options.rank,
                "shared_projection_params": sum(p.numel() for p in getattr(model, self.projections_name,
                                                                            nn.Module()).parameters())}


@register_method("arc_att", ARCOptions)
class ARCAttention(ARC):
    """ARC_att: only the attention-side adapter, 48,216 parameters on ViT-B before the head (spec §2.1)."""

    sides = ("attn",)
