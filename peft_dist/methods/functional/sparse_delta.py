"""SPT's unstructured tuning as one autograd Function with bounded memory (spec ``spt_arc_hta.md`` §1.5, §5.2 item 6).

The layer computes ``y = x · (W0 + scatter(δ))ᵀ`` where ``W0`` is the frozen weight and ``δ ∈ R^K`` holds the K
trainable entries at flat positions ``index`` of ``W0``. The official code saves a full clone of the effective weight
and the gathered input columns ``x[..., cols]`` (B·N·K numbers), and takes the diagonal of a K×K product in backward.
A frozen ``nn.Linear`` saves nothing for its weight (only what a weight gradient would need, and frozen it needs
none); ∂L/∂δ needs the input only at the C ≤ min(K, d_in) distinct columns its entries touch. So the Function saves
``x[..., touched]`` (B·N·C numbers, never more than the official B·N·K) together with the C touched columns and the K
entries' positions among them, or the whole ``x`` where that is not smaller (C close to d_in); ``W0``, ``δ`` and
``index`` are parameters/buffers that exist anyway:

* forward rebuilds ``W0 + scatter(δ)`` transiently and runs one GEMM;
* backward rebuilds it again for ``∂L/∂x = G · W_eff`` and forms the weight gradient on the touched columns only,
  ``Gᵀ·X[:, touched]`` (d_out×C, transient), then gathers it at the entries for ``∂L/∂δ``. No K×K matrix.

The touched columns of an index buffer are worked out once (:func:`touched_columns`, cached per index tensor: no
``unique`` and no host synchronisation per step).

Under autocast, :func:`sparse_delta_linear` casts the input and weight to the autocast dtype itself and runs the
Function with autocast off, so ``δ`` keeps its own (fp32) dtype and receives its gradient in that dtype (§5.2 item 6).
In bf16/fp16 the effective weight is never rounded as one matrix (a δ below half a bf16 ulp of W0 would vanish, 91 %
of δ = 1e-5 entries on ViT weights): as SNELL's merged mode, either one GEMM in the compute dtype over
``[x, x]·[W0, scatter(δ)]ᵀ`` (``split``, CUDA) or one fp32 GEMM on the fp32 ``W0 + scatter(δ)`` (``fp32``, CPU);
see ``kernelized.merged_gemm_for``. :func:`sparse_delta_linear` adds the bias after the GEMM in the compute dtype;
:func:`sparse_delta_accumulated` (SPT's layers) returns the fp32 accumulator plus the bias in fp32, for the
layer's branches to be added before the one rounding.
"""
from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from peft_dist.methods.functional.kernelized import default_merged_gemm


def check_index(index: torch.Tensor, numel: int, what: str = "index") -> None:
    """Raise ``ValueError`` unless ``index`` is a 1-D integer tensor of distinct positions in ``[0, numel)``."""
    if index.dtype not in (torch.int32, torch.int64) or index.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D int32/int64 tensor, got {index.dtype} with shape "
                         f"{tuple(index.shape)}")
    if index.numel() == 0:
        return
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= numel:
        raise ValueError(f"{what}: positions must lie in [0, {numel}), got min {low} and max {high}")
    # Duplicate positions would be summed by the scatter but each copy would receive the full gradient, which is a
    # different (and surprising) parameterisation: refuse them.
    if torch.unique(index).numel() != index.numel():
        raise ValueError(f"{what}: positions must be distinct ({index.numel() - torch.unique(index).numel()} "
                         "duplicates)")


def compact_index_dtype(numel: int) -> torch.dtype:
    """int32 positions whenever they fit (spec §1.5: non-persistent int32 index buffers), int64 beyond 2³¹."""
    return torch.int32 if numel < 2**31 else torch.int64


def effective_weight(weight: torch.Tensor, delta: torch.Tensor, index: torch.Tensor,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W0 + scatter(δ)`` as a new tensor in ``dtype`` (default: the weight's); W0 itself is left untouched."""
    dtype = dtype or weight.dtype
    flat = weight.to(dtype).reshape(-1)
    return flat.index_add(0, index, delta.to(dtype)).view(weight.shape)


def _times_effective_weight(a: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, index: torch.Tensor,
                            transposed: bool, wide: bool = False) -> torch.Tensor:
    """``a·W_effᵀ`` (forward) or ``a·W_eff`` (``transposed=False``: the input gradient) in ``a``'s dtype, with δ
    kept out of W0's rounding in bf16/fp16 (module docstring); ``wide``: in bf16/fp16 the fp32 accumulator itself,
    unrounded (for branches still to be added, as ``methods.base.frozen_linear``)."""
    def times(w: torch.Tensor) -> torch.Tensor:
        return a.matmul(w.t() if transposed else w)

    if a.dtype in (torch.float32, torch.float64):
        return times(effective_weight(weight, delta, index, a.dtype))
    if default_merged_gemm(a.device) == "fp32":
        w = effective_weight(weight, delta, index, torch.float32)
        out = a.float().matmul(w.t() if transposed else w)
        return out if wide else out.to(a.dtype)
    scattered = torch.zeros(weight.numel(), dtype=torch.float32, device=weight.device)
    scattered = scattered.index_add_(0, index, delta.float()).view(weight.shape).to(a.dtype)
    # one GEMM over twice the inner dimension: both products are summed before the single rounding of the result
    w = torch.cat([weight.to(a.dtype), scattered], 1).t() if transposed else \
        torch.cat([weight.to(a.dtype), scattered], 0)
    stacked = torch.cat([a, a], -1)
    if not wide:
        return stacked.matmul(w)
    out = torch.mm(stacked.reshape(-1, stacked.shape[-1]), w, out_dtype=torch.float32)
    return out.view(*a.shape[:-1], w.shape[1])


_touched_cache = WeakIdKeyDictionary()


def touched_columns(index: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct input columns C the entries at ``index`` touch (ascending) and each entry's position among them.

    Cached per index tensor (SPT's index buffers are fixed once built; a tensor modified in place, as its version
    counter shows, or one moved to another device, is worked out again), so the ``unique`` and its host
    synchronisation happen once per buffer, not per forward."""
    cached = _touched_cache.get(index)
    key = (index._version, in_features)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    columns, position = torch.unique(torch.remainder(index, in_features), sorted=True, return_inverse=True)
    position = position.to(index.dtype)
    _touched_cache[index] = (key, columns, position)
    return columns, position


def _saved_input(x: torch.Tensor, index: torch.Tensor, need_weight: bool):
    """What backward needs of ``x`` for ∂L/∂δ: ``(x[..., touched], touched, positions)``, or ``(x, None, None)``
    when the weight itself wants a gradient, the touched columns would not take fewer bytes than ``x``, or the
    tensors are meta/fake (an upper bound for a traced estimate)."""
    d_in = x.shape[-1]
    if need_weight or any(t.device.type == "meta" or type(t).__name__ == "FakeTensor" for t in (x, index)):
        # a traced step (the memory estimator's fake tensors) has no index values to find the columns from
        return x, None, None
    columns, position = touched_columns(index, d_in)
    tokens = x.numel() // d_in
    gathered_bytes = (tokens * x.element_size() * columns.numel() + columns.numel() * columns.element_size()
                      + position.numel() * position.element_size())
    if gathered_bytes >= x.numel() * x.element_size():
        return x, None, None
    return x.index_select(-1, columns), columns, position


class SparseDeltaLinearFunction(torch.autograd.Function):
    """``y = x · (W0 + scatter(δ, index))ᵀ``; backward forms Gᵀ·X on the touched columns and gathers it (§1.5)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, index: torch.Tensor):
        return _sparse_delta_forward(ctx, x, weight, delta, index, wide=False)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_saved, weight, delta, index, columns, position = ctx.saved_tensors
        grad_out = grad_out.to(ctx.input_dtype)
        need_x, need_weight, need_delta = ctx.needs_input_grad[:3]
        grad_x = grad_weight = grad_delta = None
        if need_x:
            grad_x = _times_effective_weight(grad_out, weight, delta, index, transposed=False)
        if need_weight or need_delta:
            G = grad_out.reshape(-1, grad_out.shape[-1])
            # Gᵀ·X over all tokens on the saved columns (all of them or the touched ones); lives only in this call
            dense = G.t().mm(x_saved.reshape(-1, x_saved.shape[-1]))
            if need_delta:
                if ctx.gathered:
                    rows = torch.div(index, ctx.in_features, rounding_mode="floor")
                    flat = rows.long() * columns.numel() + position.long()
                else:
                    flat = index
                grad_delta = dense.reshape(-1).index_select(0, flat).to(delta.dtype)
            if need_weight:
                grad_weight = dense.to(weight.dtype)
        return grad_x, grad_weight, grad_delta, None


class _AccumulatedSparseDeltaLinear(SparseDeltaLinearFunction):
    """:class:`SparseDeltaLinearFunction` returning the fp32 accumulator under bf16/fp16 (``wide``); its incoming
    gradient is cast back to the input's dtype in backward."""

    @staticmethod
    def forward(ctx, x, weight, delta, index):
        return _sparse_delta_forward(ctx, x, weight, delta, index, wide=True)


def _sparse_delta_forward(ctx, x, weight, delta, index, wide: bool) -> torch.Tensor:
    need_weight, need_delta = ctx.needs_input_grad[1:3]
    ctx.in_features, ctx.input_dtype = x.shape[-1], x.dtype
    x_saved, columns, position = _saved_input(x, index, need_weight) if need_delta or need_weight else \
        (None, None, None)
    ctx.gathered = columns is not None
    ctx.save_for_backward(x_saved, weight, delta, index, columns, position)
    return _times_effective_weight(x, weight, delta, index, transposed=True, wide=wide)


def sparse_delta_accumulated(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, index: torch.Tensor,
                             bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.dtype]:
    """:func:`sparse_delta_linear` for a layer with parallel branches still to add: under bf16/fp16 compute the
    output is the GEMM's fp32 accumulator plus the bias in fp32 (a bias delta below half an ulp survives too), and
    the returned dtype is the one the caller rounds the finished sum to."""
    device_type = x.device.type
    compute = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else \
        torch.promote_types(x.dtype, weight.dtype)
    if compute in (torch.float32, torch.float64):
        out = sparse_delta_linear(x, weight, delta, index, bias)
        return out, out.dtype
    with torch.autocast(device_type, enabled=False):
        out = _AccumulatedSparseDeltaLinear.apply(x.to(compute), weight, delta, index)
        return (out if bias is None else out + bias.float()), compute


def sparse_delta_linear(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, index: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W0 + scatter(δ, index), bias)`` through :class:`SparseDeltaLinearFunction`.

    ``index`` holds flat positions into ``weight`` (row-major), distinct, validated by the caller once at build
    time (:func:`check_index`); checking them on every call would cost a sync per layer.
    """
    device_type = x.device.type
    # The weight goes in uncast: the Function casts W0 + scatter(δ) to x's dtype transiently, so no converted copy
    # of the weight is ever saved for backward (a bf16-stored W0 under fp32 compute, or fp32 W0 under autocast).
    if torch.is_autocast_enabled(device_type):
        compute = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            out = SparseDeltaLinearFunction.apply(x.to(compute), weight, delta, index)
            return out if bias is None else out + bias.to(compute)
    compute = torch.promote_types(x.dtype, weight.dtype)
    out = SparseDeltaLinearFunction.apply(x.to(compute), weight, delta, index)
    return out if bias is None else out + bias.to(out.dtype)
