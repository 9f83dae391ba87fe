"""Measuring the delta a layer applies under reduced precision (issue 17): least squares over many rows.

A bf16 output carries a delta smaller than half its ulp only statistically (the frozen part's sub-ulp position
dithers the rounding), so one forward says little; fitting ``outputs(adapted) - outputs(adapter zeroed)`` on the
inputs over N rows averages the rounding out. The fit's own noise, for a delta of typical entry ``a`` on W0 entries
of ``w``, is about sqrt(d_in·w·2⁻⁸ / (a·N)) relative (Bernoulli rounding of each output), which sets N.
"""
from __future__ import annotations

import torch

from peft_dist.methods.functional.kernelized import KernelConfig, SliceSpec, kernelized_delta_weight


def fitted_delta(inputs: torch.Tensor, adapted: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """ΔW (d_out × d_in, fp64) with ``adapted - frozen ≈ inputs·ΔWᵀ`` in the least-squares sense."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    diff = (adapted.double() - frozen.double()).reshape(x.shape[0], -1)
    return torch.linalg.lstsq(x, diff).solution.t()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm())


def snell_factors_at_scale(d_in: int, d_out: int, scale: float, sparsity: float, rank: int = 4, seed: int = 0,
                           cfg: KernelConfig = KernelConfig()) -> list[torch.Tensor]:
    """fp32 SNELL factors (A, B) whose nonzero ΔW entries have mean magnitude ``scale``. The piecewise kernel is
    homogeneous of degree 1 in (A, B); the magnitude-weighted sparse kernel K·|K| of degree 2, so A and B are
    scaled by the ratio, or by its square root when s > 0."""
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(2, d_in, rank // 2, generator=g) * 2 - 1
    B = torch.rand(2, d_out, rank // 2, generator=g) * 2 - 1
    spec = [SliceSpec(0, d_out, sparsity)]
    dW = kernelized_delta_weight(spec, [A, B], cfg, d_out, d_in)
    ratio = scale / float(dW.abs()[dW != 0].mean())
    factor = ratio ** 0.5 if sparsity > 0 else ratio
    return [A * factor, B * factor]
