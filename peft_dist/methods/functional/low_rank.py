"""LoRA's update folded into the frozen GEMM as one autograd Function (issue 20 item 3).

``y = x·(W0 + s·Σ_i P_i B_i A_i)ᵀ + b``, where slice i owns the output rows ``rows_i`` (q, k, v of the fused qkv, or
the whole matrix), ``P_i`` places them, and s = alpha / r. A plain LoRA runs the frozen GEMM plus two thin GEMMs per
slice and adds a T×d_out delta in forward, and in backward adds a T×d_in ``(G·B)·A`` to the frozen input gradient.
Here the merged weight is formed (d_out·d_in·r multiply-adds, no token dimension) and **one** GEMM gives y; backward
forms it again for ``∂L/∂x = G·W`` (one GEMM) and gets the factor gradients from thin GEMMs:

* ``U = X·[A_1; A_2; …]ᵀ``: one GEMM for every slice's down-projection (q, k and v read the same input);
* ``∂B_i = s·G[:, rows_i]ᵀ·U_i`` and ``∂A = s·[G_1 B_1, G_2 B_2, …]ᵀ·X``, the latter one GEMM for all slices.

The same function as the plain LoRA (it is the same sum, associated differently), tested against one built from
``nn.Linear``s. Saved for backward: the input x only (W0, A, B are parameters), as much as a plain LoRA saves; the
merged weight is never kept. Only for fp32/fp64 compute and an input shared with the frozen path (no LoRA dropout):
under bf16 rounding W0 + ΔW as one matrix would drop the small early ΔW (``kernelized.merged_gemm_for`` explains),
so the caller keeps its parallel branch there.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def merged_low_rank_weight(weight: torch.Tensor, rows: Sequence[tuple[int, int]], scale: float,
                           factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``W0 + s·P_i B_i A_i`` as a new tensor (``factors`` flat: A_1, B_1, A_2, B_2, …); W0 is left untouched.

    Each slice's rows are written by one ``addmm`` reading W0 (one pass over the weight, not a copy and then an
    in-place update); rows no slice owns are copied."""
    weight = weight.detach()
    merged = torch.empty_like(weight, memory_format=torch.contiguous_format)
    for (start, stop), A, B in zip(rows, factors[0::2], factors[1::2]):
        torch.addmm(weight[start:stop], B.detach(), A.detach(), alpha=scale, out=merged[start:stop])
    end = 0
    for start, stop in sorted(rows) + [(weight.shape[0], weight.shape[0])]:
        if start > end:
            merged[end:start].copy_(weight[end:start])
        end = max(end, stop)
    return merged


class MergedLowRankLinearFunction(torch.autograd.Function):
    """See the module docstring. Inputs: x, W0, b (frozen or None), the slices' rows, s, then A_1, B_1, …"""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, scale, *factors):
        ctx.save_for_backward(x, weight, *factors)
        ctx.rows, ctx.scale, ctx.has_bias = rows, scale, bias is not None
        return F.linear(x, merged_low_rank_weight(weight, rows, scale, factors), bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, *factors = ctx.saved_tensors
        rows, scale = ctx.rows, ctx.scale
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        d_in, d_out = x.shape[-1], grad_y.shape[-1]
        X = x.reshape(-1, d_in)
        G = grad_y.reshape(-1, d_out)
        A_all = torch.cat(factors[0::2], 0) if len(rows) > 1 else factors[0]
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = (G @ merged_low_rank_weight(weight, rows, scale, factors)).view(x.shape)
        if need_w:
            grad_w = G.t() @ X
        if need_b and ctx.has_bias:
            grad_b = G.sum(0)
        U = X @ A_all.t()  # T × (slices·r): every down-projection from one GEMM
        rank = factors[0].shape[0]
        grads_B, GB = [], []
        for i, ((start, stop), B) in enumerate(zip(rows, factors[1::2])):
            G_i = G[:, start:stop]
            grads_B.append(torch.mm(G_i.t(), U[:, i * rank:(i + 1) * rank]).mul_(scale))
            GB.append(G_i @ B)
        GB_all = torch.cat(GB, 1) if len(GB) > 1 else GB[0]
        grad_A_all = torch.mm(GB_all.t(), X).mul_(scale)
        grads: list[torch.Tensor] = []
        for i, grad_B in enumerate(grads_B):
            # own storage per parameter (a view of one shared tensor would become .grad of several parameters)
            grad_A = grad_A_all if len(grads_B) == 1 else grad_A_all[i * rank:(i + 1) * rank].clone()
            grads += [grad_A, grad_B]
        return (grad_x, grad_w, grad_b, None, None, *grads)


def merged_low_rank_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           rows: Sequence[tuple[int, int]], scale: float,
                           factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, W0 + s·Σ P_i B_i A_i, b)`` through :class:`MergedLowRankLinearFunction` (fp32/fp64 only)."""
    if len(factors) != 2 * len(rows):
        raise ValueError(f"expected an (A, B) pair per slice: {len(rows)} slices, {len(factors)} tensors")
    ranks = {A.shape[0] for A in factors[0::2]}
    if len(ranks) != 1:
        raise ValueError(f"every slice needs the same rank, got {sorted(ranks)}")
    return MergedLowRankLinearFunction.apply(x, weight, bias, tuple(rows), float(scale), *factors)
