"""HTA, Householder Transformation-based Adaptor (Dong et al., NeurIPS 2024), on timm ViTs (spec ``spt_arc_hta.md`` §3).

Per target matrix (paper layout, rows are tokens; Eq. 6):

    Y = X (W + W_down·W_up + H_l·diag(d)·H_r) + b,      H = I − 2 v̂ v̂ᵀ,  v̂ = v/‖v‖

as a parallel branch on the q, k, v slices of the fused qkv and on ``proj`` by default (the four square matrices
whose 5·D parameters each reproduce the paper's 0.22 M on ViT-B, §3.2). The reflector is normalised by default;
``reflector: literal`` keeps Eq. 3 as printed (H = I − v vᵀ, orthogonal only when ‖v‖² = 2; §3.1, §5.4 item 15).

Training never forms a D×D matrix (§3.1, §5.2 item 8): for tokens x the branch is
u = x − 2(x·v̂_l)v̂_l; u ← u ⊙ d; y_hta = u − 2(u·v̂_r)v̂_r; y += y_hta + (x·W_down)·W_up — O(N·D) per matrix.
Merging builds ΔW_timm = W_upᵀW_downᵀ + H_r·diag(d)·H_l once per matrix, in float64.

Non-square targets (fc1, fc2) use the natural generalisation with a rectangular diagonal of min(d_in, d_out)
entries (§3.2, flagged there as not reproducing the paper's 0.28 M exactly). Initialisation is not in the paper;
we use the spec's exact-start choice (§3.1): d = 0 (or N(0, ``diag_init_std``²)), v ~ N(0, 1/D), W_down
Kaiming-uniform, W_up = 0. Dropout, when set, acts on the branch input (the grid's "adapter dropout").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from peft_dist.config import check_range
from peft_dist.methods.base import AdaptedModule, Method, add_to_rows, frozen_linear
from peft_dist.methods.lora import inject_per_target, merged_linear
from peft_dist.methods.registry import register_method
from peft_dist.models.targets import check_targets, find_targets

_NORM_EPS = 1e-12


@dataclass
class HTAOptions:
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "proj"])
    rank: int = 1
    """Rank D′ of the W_down·W_up term (the paper's main results use 1; 0 disables it, App. Table 7)."""
    reflector: Literal["normalized", "literal"] = "normalized"
    dropout: float = 0.0
    """Dropout on the branch input (the paper's "adapter dropout" grid: 0–0.5)."""
    diag_init_std: float = 0.0
    """Std of d's init; 0 starts at the pretrained function (the v's then get gradient once d moves)."""
    decay_vectors: bool = False
    """Weight decay on every trainable tensor, the reflectors v and the diagonal d included (true; ARC's code, which
    HTA's comparison follows, decays everything: spec spt_arc_hta §2.3), or on the >= 2-D ones only (false, the
    default: decay on v would pull the reflector's direction, which its normalisation ignores, towards 0)."""

    def validate(self) -> None:
        check_range("method.rank", self.rank, low=0)
        check_range("method.dropout", self.dropout, low=0.0, high=1.0)
        check_range("method.diag_init_std", self.diag_init_std, low=0.0)
        check_targets(self.targets)


def reflect(x: torch.Tensor, v: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """x·H for rows x with H = I − 2v̂v̂ᵀ (normalised) or I − vvᵀ (literal); H is symmetric, so x·H = (H·xᵀ)ᵀ."""
    if normalized:
        v = v / v.norm().clamp_min(_NORM_EPS)
        return x - 2.0 * (x @ v).unsqueeze(-1) * v
    return x - (x @ v).unsqueeze(-1) * v


def reflector_matrix(v: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """The dense H (for merging and tests only)."""
    eye = torch.eye(v.shape[0], dtype=v.dtype, device=v.device)
    if normalized:
        v = v / v.norm().clamp_min(_NORM_EPS)
        return eye - 2.0 * torch.outer(v, v)
    return eye - torch.outer(v, v)


class HTALinear(AdaptedModule):
    """A frozen Linear plus one HTA branch per row slice (q/k/v of the fused qkv, or the whole matrix)."""

    def __init__(self, base: nn.Linear, slices: dict[str, slice], rank: int, reflector: str = "normalized",
                 dropout: float = 0.0, diag_init_std: float = 0.0):
        super().__init__()
        self.base = base
        self.slices = dict(slices)
        self.normalized = reflector == "normalized"
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        d_in = base.in_features
        w = base.weight
        factory = {"device": w.device, "dtype": w.dtype if w.dtype == torch.float64 else torch.float32}
        self.v_left, self.v_right, self.diag = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.down, self.up = nn.ParameterDict(), nn.ParameterDict()
        for name, rows in self.slices.items():
            d_out = rows.stop - rows.start
            self.v_left[name] = nn.Parameter(torch.randn(d_in, **factory) / math.sqrt(d_in))
            self.v_right[name] = nn.Parameter(torch.randn(d_out, **factory) / math.sqrt(d_out))
            self.diag[name] = nn.Parameter(torch.randn(min(d_in, d_out), **factory) * diag_init_std)
            if rank > 0:
                down = torch.empty(d_in, rank, **factory)
                # Kaiming-uniform with a=√5 over fan_in = d_in, the nn.Linear default for the down projection.
                nn.init.kaiming_uniform_(down.t(), a=math.sqrt(5))
                self.down[name] = nn.Parameter(down)
                self.up[name] = nn.Parameter(torch.zeros(rank, d_out, **factory))

    def branch(self, x: torch.Tensor, name: str, d_out: int) -> torch.Tensor:
        """The HTA update for one slice in O(N·D): reflect, scale by the (rectangular) diagonal, reflect."""
        u = reflect(x, self.v_left[name], self.normalized)
        d = self.diag[name]
        u = u[..., :d.shape[0]] * d
        if d_out > d.shape[0]:
            u = F.pad(u, (0, d_out - d.shape[0]))
        y = reflect(u, self.v_right[name], self.normalized)
        if name in self.down:
            y = y + (x @ self.down[name]) @ self.up[name]
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xd = self.dropout(x)
        y, dtype = frozen_linear(self.base, x)
        return add_to_rows(y, [(rows, self.branch(xd, name, rows.stop - rows.start))
                               for name, rows in self.slices.items()]).to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in timm layout (d_out×d_in): (W_down·W_up + H_l·Σ·H_r)ᵀ, float64, built once (merge only)."""
        w = self.base.weight
        dw = torch.zeros(w.shape, dtype=torch.float64, device=w.device)
        d_in = w.shape[1]
        for name, rows in self.slices.items():
            d_out = rows.stop - rows.start
            h_left = reflector_matrix(self.v_left[name].detach().double(), self.normalized)
            h_right = reflector_matrix(self.v_right[name].detach().double(), self.normalized)
            sigma = torch.zeros(d_in, d_out, dtype=torch.float64, device=w.device)
            d = self.diag[name].detach().double()
            sigma[range(d.shape[0]), range(d.shape[0])] = d
            paper = h_left @ sigma @ h_right
            if name in self.down:
                paper = paper + self.down[name].detach().double() @ self.up[name].detach().double()
            dw[rows] = paper.t()
        return dw

    def merged(self) -> nn.Linear:
        return merged_linear(self.base, self.delta_weight())


@register_method("hta", HTAOptions)
class HTA(Method):
    """HTA branches on q, k, v, proj by default: 5·D parameters per square D×D matrix (spec §3.2)."""

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        if not self.options.decay_vectors:
            return super().param_groups(model, weight_decay)
        return [{"params": [p for _, p in self.trainable_parameters(model)], "weight_decay": weight_decay}]

    def inject(self, model: nn.Module) -> None:
        o = self.options
        targets = find_targets(model, tuple(o.targets))
        inject_per_target(model, targets, lambda base, slices: HTALinear(
            base, slices, o.rank, o.reflector, o.dropout, o.diag_init_std))
