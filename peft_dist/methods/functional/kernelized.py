"""SNELL/SNELLA's kernelized sparse delta as one autograd Function (spec snell_snella.md §2, §3, §7.2, §7.3 A/E).

Layout. Everything here is in timm layout: ``ΔW[j, i]`` (output j, input i) equals the spec's ``𝒦[i, j]``, so the
delta can be added to an ``nn.Linear`` weight row by row. A (``In_Qs``) has shape (H, d_in, q) and indexes inputs;
B (``Out_Qs``) has shape (H, d_out, q) and indexes outputs; H = 2 and q = r / 2 (§2.1).

Kernels (§2.1, §2.2):

* ``piecewise``: ``K[j, i] = Σ_h c_h ‖B_h[j] − A_h[i]‖₂`` with the fixed coefficients ``c = (+0.1, −0.1)``;
* ``mixk`` (SNELLA): ``K' = K + α·softmax(K / γ) + β`` with the softmax over the output index j, i.e. dim 0 here;
* ``linear``: ``K = Σ_h B_h A_hᵀ``, the plain LoRA-r merge of the same factors (the paper's ablation baseline).

Sparsification (§3.1), per matrix with sparsity s: ``Kˢ = K ⊙ sg(m)`` where sg is stop-gradient and

* ``code`` (the official code): ``m = |K|·1[|K| > τ]``, τ the linear-interpolation quantile of |K| at s. The kept
  set of ``|K| > quantile(|K|, s)`` is exactly ``|K| > v_(⌊s(n−1)⌋+1)`` (the k-th smallest, 1-based), so τ is taken
  as that order statistic: no interpolation, no sort;
* ``paper`` (SNELL Eq. 5): ``m = max(|K| − τ, 0)`` with τ the ⌈s·n⌉-th smallest |K| (0 when s = 0); the factor is
  detached as in the code path (the paper gives no gradient convention, the code's is kept);
* SNELL at s = 0 selects the plain kernel (no magnitude factor), SNELLA does not (``KernelConfig.plain_at_zero``).

The Function (§7.3 A). Forward builds ``Kˢ`` in fp32 (or fp64 for fp64 inputs) even under bf16 autocast (§7.2),
adds it to the frozen weight and runs **one** GEMM; under bf16/fp16 compute it keeps ΔW out of the rounding of W0
(one GEMM over [W0, ΔW] in the compute dtype, or one in fp32: :func:`merged_gemm_for`). It saves only the layer
input X, the parameters and one scalar threshold per matrix, never a d_out×d_in tensor. Backward rebuilds the
kernel row block by row block (at most ``chunk_entries`` entries per transient buffer), accumulates
``G_X = G_Y·W`` block-wise, forms the weight gradient ``G_S = G_Yᵀ·X`` per block (of a sparsified matrix only at
its survivors, where the detached magnitude factor is non-zero: a sampled product, exact, taken for every matrix
before G_X exists and then scattered block by block, :func:`_survivor_slice_backward`; dense above
``SURVIVOR_MAX_DENSITY`` kept, see ``KernelConfig.survivor_grad``), and applies the closed
form of §7.3 A.4 for A and B: with ``R_h = c_h·G_K ⊘ D_h``, ``∂B_h = diag(R_h·1)·B_h − R_h·A_h`` and
``∂A_h = diag(R_hᵀ·1)·A_h − R_hᵀ·B_h`` (no autograd graph through ``cdist``). Distances are ε-guarded:
``D = sqrt(max(d², ε))`` (§7.2).

The threshold is selected once per forward by :func:`kth_smallest_magnitude` (exact: a sample brackets the k-th
value, only entries inside the bracket are selected) and reused in backward.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

KERNEL_COEFFS = (0.1, -0.1)
"""c_h of the piecewise kernel, fixed (official ``SCALE_FACTOR_fc`` = 0.1 with sign (−1)^h; spec §2.1)."""
DISTANCE_EPS = 1e-12
"""ε of the guarded distance sqrt(max(d², ε)) (spec §7.2)."""
KERNEL_KINDS = ("piecewise", "mixk", "linear")
THRESHOLDS = ("code", "paper", "none")
MERGED_GEMMS = ("auto", "split", "fp32")
SURVIVOR_GRADS = ("auto", "always", "never")

SURVIVOR_MAX_DENSITY = 0.12
"""``survivor_grad=auto`` uses the survivor-only weight gradient when at most this fraction of a matrix survives (a
sparsity of at least 0.88), and the dense Gᵀ·X above it. Measured on one CPU thread at ViT-B shapes, batch 8 (T =
1576), whole backward of one SNELL-32 matrix, survivor over dense: fc1 (768→3072) 0.82 / 0.90 / 1.02 / 1.16 / 1.91
at 5 / 10 / 15 / 20 / 30 % kept, fc2 (3072→768) 0.73 / 0.84 / 0.89 / 1.05 / 1.27: torch's sampled product (one
vectorised dot product per survivor, ~13-16 GFLOP/s against ~75 for the dense GEMM) breaks even near 15 %."""
_BLOCK_SHRINK = 8
"""Row blocks hold ``chunk_entries / 8`` entries (:func:`_block_entries`)."""
_SURVIVOR_CHUNK_ENTRIES = 1 << 19
"""Entries of X per token chunk of the sampled product (2 MiB fp32), for 128 to 256 tokens (256 of a 768-wide
input, 170 of a 3072-wide one): the transposed chunk is that pass's largest transient, and torch's CPU kernel,
one vectorised dot product per survivor, runs at about half its rate on 42-token dots against 256 (measured at
ViT-B shapes)."""
_SURVIVOR_TOKENS = (128, 256)


_SAMPLE_SIZE = 8192
"""Entries sampled to bracket the k-th magnitude; the selection is exact whatever the sample (it only sets speed)."""
_BRACKET_SIGMAS = 6.0


@dataclass(frozen=True)
class KernelConfig:
    """How every matrix of one adapted Linear is built (static: changing it never needs a new graph)."""

    kind: str = "piecewise"
    threshold: str = "code"
    """``code``, ``paper`` or ``none`` (dense: SNELLA's ``tuning_model=mixk``, §2.2)."""
    plain_at_zero: bool = True
    """s = 0 gives the plain kernel (SNELL's ``KLoRA`` switch, §3.1); SNELLA keeps the magnitude path."""
    chunk_entries: int = 1 << 20
    """Upper bound on the entries of each transient row-block buffer (memory bound of §7.3 A)."""
    merged_gemm: str = "auto"
    """How ``merged`` mode applies W0 + ΔW when the compute dtype is bf16/fp16 (see :func:`merged_gemm_for`):
    ``split`` (one GEMM in the compute dtype on [x, x] and [W0, ΔW]), ``fp32`` (one fp32 GEMM on the
    fp32 merged weight) or ``auto`` (split on CUDA, fp32 elsewhere)."""
    survivor_grad: str = "auto"
    """How backward forms the weight gradient of a sparsified matrix: ``always`` only at the survivors (a sampled
    product, exact because the magnitude factor is detached: §3.1), ``never`` the dense Gᵀ·X, ``auto`` survivors
    when the kept fraction is at most :data:`SURVIVOR_MAX_DENSITY` (fp32/fp64 only; bf16/fp16 stay dense)."""

    def __post_init__(self):
        if self.kind not in KERNEL_KINDS:
            raise ValueError(f"kernel kind {self.kind!r}; allowed: {', '.join(KERNEL_KINDS)}")
        if self.threshold not in THRESHOLDS:
            raise ValueError(f"threshold {self.threshold!r}; allowed: {', '.join(THRESHOLDS)}")
        if self.chunk_entries < 1:
            raise ValueError(f"chunk_entries must be >= 1, got {self.chunk_entries}")
        if self.merged_gemm not in MERGED_GEMMS:
            raise ValueError(f"merged_gemm {self.merged_gemm!r}; allowed: {', '.join(MERGED_GEMMS)}")
        if self.survivor_grad not in SURVIVOR_GRADS:
            raise ValueError(f"survivor_grad {self.survivor_grad!r}; allowed: {', '.join(SURVIVOR_GRADS)}")


@dataclass(frozen=True)
class SliceSpec:
    """One kernelized matrix: rows ``start:stop`` of the Linear's weight, at sparsity ``sparsity``."""

    start: int
    stop: int
    sparsity: float


def factor_count(kind: str) -> int:
    """Tensors per matrix passed to the Function: A, B (+ α, γ, β for MixK)."""
    return 5 if kind == "mixk" else 2


# ============================================================================================== threshold selection
def threshold_rank(numel: int, sparsity: float, threshold: str, plain_at_zero: bool) -> int | None:
    """1-based rank k of τ among the ascending magnitudes; 0 means τ = 0; None means the plain (dense) kernel.

    ``code``: k = ⌊s·(n − 1)⌋ + 1, the order statistic whose strict-greater set equals that of the linear
    interpolation quantile (spec §3.1, §7.2). ``paper``: k = ⌈s·n⌉ (Eq. 5's Δw_s)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    if threshold == "none" or (plain_at_zero and sparsity == 0.0):
        return None
    if threshold == "code":
        return min(numel, math.floor(sparsity * (numel - 1)) + 1)
    return min(numel, math.ceil(sparsity * numel))


_sample_cache: dict[tuple[int, str], torch.Tensor] = {}


def _sample_positions(numel: int, device: torch.device) -> torch.Tensor:
    """Fixed pseudo-random positions per matrix size: a private generator, so the global RNG (dropout, drop-path)
    is untouched and every rank samples the same entries."""
    key = (numel, str(device))
    if key not in _sample_cache:
        gen = torch.Generator().manual_seed(numel)
        _sample_cache[key] = torch.randint(0, numel, (_SAMPLE_SIZE,), generator=gen).to(device)
    return _sample_cache[key]


def kth_smallest_magnitude(values: torch.Tensor, k: int, chunk_entries: int = 1 << 20,
                           scratch: torch.Tensor | None = None) -> float:
    """The exact k-th smallest |value| (1-based) of a contiguous tensor, without sorting or copying all of it.

    A fixed sample of magnitudes brackets the k-th value (±6σ of the sample quantile); one pass over row chunks
    counts the entries below the bracket and gathers those inside, and ``kthvalue`` runs on the gathered few. If
    the bracket misses (probability ~1e-9), a full ``kthvalue`` gives the same exact answer."""
    flat = values.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}], got {k}")
    if k == 1:
        return float(flat.abs().min())
    if k == n:
        return float(flat.abs().max())
    if n <= 8 * _SAMPLE_SIZE:
        return float(flat.abs().kthvalue(k).values)
    sample = flat[_sample_positions(n, flat.device)].abs()
    m = sample.numel()
    p = k / n
    centre, half = p * m, _BRACKET_SIGMAS * math.sqrt(m * p * (1 - p)) + 2
    lo_pos, hi_pos = math.floor(centre - half), math.ceil(centre + half)  # 0-based positions in the sample
    lo = float(sample.kthvalue(lo_pos + 1).values) if lo_pos >= 0 else -1.0
    hi = float(sample.kthvalue(hi_pos + 1).values) if hi_pos < m else math.inf
    below = 0
    inside = []
    buffer = scratch.reshape(-1) if scratch is not None else None
    step = buffer.numel() if buffer is not None else max(1, chunk_entries)
    for start in range(0, n, step):
        chunk = flat[start:start + step]
        mag = chunk.abs() if buffer is None else torch.abs(chunk, out=buffer[:chunk.numel()])
        at_least_lo = mag >= lo
        below += chunk.numel() - int(torch.count_nonzero(at_least_lo))
        inside.append(mag[at_least_lo.logical_and_(mag <= hi)])
    gathered = torch.cat(inside)
    if below < k <= below + gathered.numel():
        return float(gathered.kthvalue(k - below).values)
    return float(flat.abs().kthvalue(k).values)


# ============================================================================================== kernel building
class _Factors:
    """One matrix's factors prepared for row-block kernel builds: the piecewise distances come from a single GEMM
    on augmented factors, ``[b', |b'|², 1]·[−2a', 1, |a'|²]ᵀ = ‖b' − a'‖²``, with a' = |c_h|·a and b' = |c_h|·b, so
    ``sqrt`` directly gives the scaled distance D'_h = |c_h|·D_h and no separate scaling pass is needed."""

    def __init__(self, tensors: Sequence[torch.Tensor], kind: str, dtype: torch.dtype):
        self.kind = kind
        A, B = (t.detach().to(dtype) for t in tensors[:2])
        self.A, self.B = A, B
        self.heads, self.d_in, self.q = A.shape
        self.d_out = B.shape[1]
        if kind == "mixk":
            self.alpha, self.gamma, self.beta = (t.detach().to(dtype) for t in tensors[2:5])
        if kind == "linear":
            self.A_flat = A.permute(1, 0, 2).reshape(self.d_in, self.heads * self.q)
            self.B_flat = B.permute(1, 0, 2).reshape(self.d_out, self.heads * self.q)
            return
        if self.heads != len(KERNEL_COEFFS):
            raise ValueError(f"piecewise kernel needs {len(KERNEL_COEFFS)} pieces, factors have {self.heads}")
        self.signs = [1.0 if c > 0 else -1.0 for c in KERNEL_COEFFS]
        self.sq_coeffs = [c * c for c in KERNEL_COEFFS]
        self.in_aug, self.out_aug, self.eps2 = [], [], []
        ones_in, ones_out = A.new_ones(self.d_in, 1), B.new_ones(self.d_out, 1)
        for h, c in enumerate(KERNEL_COEFFS):
            a, b = A[h] * abs(c), B[h] * abs(c)
            self.in_aug.append(torch.cat([a * -2.0, ones_in, (a * a).sum(1, keepdim=True)], 1))
            self.out_aug.append(torch.cat([b, (b * b).sum(1, keepdim=True), ones_out], 1))
            self.eps2.append(c * c * DISTANCE_EPS)
        # [A_h, 1] and [B_h, 1]: the backward GEMMs R·[A, 1] and Rᵀ·[B, 1] yield the row/column sums of R too
        self.in_ones = [torch.cat([A[h], ones_in], 1) for h in range(self.heads)]
        self.out_ones = [torch.cat([B[h], ones_out], 1) for h in range(self.heads)]

    def distance_rows(self, h: int, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        """D'_h[r0:r1] = |c_h|·sqrt(max(‖B_h[j] − A_h[i]‖², ε)) into ``out``."""
        torch.mm(self.out_aug[h][r0:r1], self.in_aug[h].t(), out=out)
        return out.clamp_min_(self.eps2[h]).sqrt_()

    def kernel_rows(self, r0: int, r1: int, out: torch.Tensor, scratch: torch.Tensor,
                    distances: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The plain kernel's rows r0:r1 into ``out``; the per-piece distances go to ``distances`` if given
        (backward needs them), otherwise ``scratch`` is used."""
        if self.kind == "linear":
            return torch.mm(self.B_flat[r0:r1], self.A_flat.t(), out=out)
        if distances is None:
            d0 = self.distance_rows(0, r0, r1, out)
            d1 = self.distance_rows(1, r0, r1, scratch)
            d0.add_(d1, alpha=self.signs[1] * self.signs[0])
            return d0 if self.signs[0] > 0 else d0.neg_()
        d0 = self.distance_rows(0, r0, r1, distances[0])
        d1 = self.distance_rows(1, r0, r1, distances[1])
        torch.add(d0, d1, alpha=self.signs[1] * self.signs[0], out=out)
        return out if self.signs[0] > 0 else out.neg_()

    def mixk_softmax(self, K: torch.Tensor) -> torch.Tensor:
        """softmax over the output index (dim 0 in timm layout; spec §2.2)."""
        return torch.softmax(K / self.gamma, dim=0)


def _rows_per_block(kind: str, rows: int, d_in: int, chunk_entries: int) -> int:
    """MixK's softmax normalises over all output rows, so its matrix is one block; the others are chunked."""
    if kind == "mixk":
        return rows
    return max(1, min(rows, chunk_entries // max(1, d_in)))


def _blocks(rows: int, per_block: int, like: torch.Tensor | None = None):
    """Row blocks ``(r0, r1)``. ``like`` a fake or meta tensor (the memory estimator's trace): only the first block
    and a shorter last one. Every full block allocates and frees the same transients into preallocated outputs, so
    the traced peak is the same, and a ViT's trace makes a fraction of the ops (the dry runs and the memory study
    spend their time tracing these loops)."""
    starts = range(0, rows, per_block)
    if like is not None and is_traced(like) and len(starts) > 1:
        starts = [0] + ([starts[-1]] if rows - starts[-1] < per_block else [])
    for r0 in starts:
        yield r0, min(rows, r0 + per_block)


def is_traced(t: torch.Tensor) -> bool:
    """A tensor with no values: the estimator's fake tensors or the meta device."""
    return t.device.type == "meta" or type(t).__name__ == "FakeTensor"


def _magnitude_factor(K: torch.Tensor, tau: float, threshold: str, out: torch.Tensor) -> torch.Tensor:
    """The detached factor m of §3.1 into ``out``: |K|·1[|K| > τ] (code) or max(|K| − τ, 0) (paper)."""
    torch.abs(K, out=out)
    if threshold == "code":
        return F.threshold_(out, tau, 0.0)  # keeps strictly greater values, as the official F.threshold
    return out.sub_(tau).clamp_min_(0.0)


def _build_sparse_kernel(fac: _Factors, out: torch.Tensor, sparsity: float, cfg: KernelConfig,
                         scratch: torch.Tensor, base: torch.Tensor | None = None) -> float | None:
    """Write Kˢ (the sparsified, possibly MixK kernel) of one matrix into ``out`` (d_out × d_in), plus ``base`` (the
    frozen weight rows) if given; return τ (None: plain kernel). Row blocks bound the transient ``scratch`` and keep
    each block cache-resident between its passes."""
    rows = out.shape[0]
    per_block = _rows_per_block(fac.kind, rows, fac.d_in, _block_entries(cfg))
    for r0, r1 in _blocks(rows, per_block, out):
        fac.kernel_rows(r0, r1, out[r0:r1], scratch[:r1 - r0])
    if fac.kind == "mixk":
        out.addcmul_(fac.mixk_softmax(out), fac.alpha).add_(fac.beta)
    rank = threshold_rank(out.numel(), sparsity, cfg.threshold, cfg.plain_at_zero)
    tau = None
    if rank is not None:
        tau = 0.0 if rank == 0 else kth_smallest_magnitude(out, rank, cfg.chunk_entries, scratch)
    if tau is None and base is None:
        return None
    for r0, r1 in _blocks(rows, per_block, out):
        magnitude = None if tau is None else _magnitude_factor(out[r0:r1], tau, cfg.threshold, scratch[:r1 - r0])
        _weight_rows(out[r0:r1], magnitude, None if base is None else base[r0:r1])
    return tau


def _weight_rows(K: torch.Tensor, magnitude: torch.Tensor | None, W0: torch.Tensor | None) -> torch.Tensor:
    """``K ← W0 + K ⊙ m`` in one pass (either term may be absent): the forward and backward both form W's rows
    with this, so they agree to the bit."""
    if magnitude is None:
        return K if W0 is None else K.add_(W0)
    if W0 is None:
        return K.mul_(magnitude)
    return torch.addcmul(W0, K, magnitude, out=K)


def _kernel_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 factors, fp64 for fp64 (gradcheck): the kernel is never built in half precision."""
    return torch.promote_types(t.dtype, torch.float32)


def _split_factors(factors: Sequence[torch.Tensor], kind: str, count: int) -> list[Sequence[torch.Tensor]]:
    per = factor_count(kind)
    if len(factors) != per * count:
        raise ValueError(f"expected {per} factor tensors per matrix for kernel {kind!r}, got {len(factors)} "
                         f"for {count} matrices")
    return [factors[i * per:(i + 1) * per] for i in range(count)]


def _uncovered_rows(slices: Sequence[SliceSpec], d_out: int) -> list[tuple[int, int]]:
    gaps, pos = [], 0
    for s in sorted(slices, key=lambda s: s.start):
        if s.start > pos:
            gaps.append((pos, s.start))
        pos = max(pos, s.stop)
    if pos < d_out:
        gaps.append((pos, d_out))
    return gaps


def merged_gemm_for(cfg: KernelConfig, device: torch.device, compute_dtype: torch.dtype) -> str | None:
    """How the merged GEMM runs: None in fp32/fp64 (one GEMM on W0 + ΔW, exact), else ``split`` or ``fp32``.

    Rounding W0 + ΔW to bf16 keeps ΔW only to half a bf16 ulp of W0 (~1e-4 for |W0| ~ 0.03): at SNELL's initial
    scale most kept entries vanish. Both strategies keep ΔW to its own precision and round the output once.
    ``split`` is one GEMM in the compute dtype over twice the inner dimension, ``[x, x]·[W0, ΔW]ᵀ`` (ΔW rounded to
    bf16 on its own, a relative 2⁻⁹); ``fp32`` is one fp32 GEMM on the fp32 W0 + ΔW. On a GPU the bf16 tensor-core
    rate is over 10x the fp32 one, so ``split`` is the faster; on a CPU with avx512_bf16 the two cost the same
    (``benchmarks/snell_step.py --precision bf16``), and ``fp32`` is the more exact."""
    if compute_dtype in (torch.float32, torch.float64):
        return None
    if cfg.merged_gemm != "auto":
        return cfg.merged_gemm
    return default_merged_gemm(device)


def default_merged_gemm(device: torch.device) -> str:
    """``split`` on CUDA, ``fp32`` elsewhere (the measurement behind it: :func:`merged_gemm_for`)."""
    return "split" if device.type == "cuda" else "fp32"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


# ============================================================================================== the Function
class KernelizedLinearFunction(torch.autograd.Function):
    """``y = x·(W0 + ΔW)ᵀ + b`` (``merged`` mode) or ``y = x·ΔWᵀ`` (``weight=None``: the faithful parallel delta),
    ΔW holding one kernelized sparse matrix per slice of rows. See the module docstring for the math."""

    @staticmethod
    def forward(ctx, x, weight, bias, out_features, slices, cfg, compute_dtype, *factors):
        groups = _split_factors(factors, cfg.kind, len(slices))
        kdtype = _kernel_dtype(factors[0])
        d_in = x.shape[-1]
        strategy = merged_gemm_for(cfg, x.device, compute_dtype) if weight is not None else None
        base_weight = None if strategy == "split" else weight  # split: W holds ΔW alone
        covered = sum(s.stop - s.start for s in slices) == out_features
        W = x.new_empty((out_features, d_in), dtype=kdtype) if covered else \
            x.new_zeros((out_features, d_in), dtype=kdtype)
        biggest = max((s.stop - s.start for s in slices), default=0)
        scratch = x.new_empty((_scratch_rows(cfg, biggest, d_in), d_in), dtype=kdtype)
        taus = []
        for spec, tensors in zip(slices, groups):
            fac = _Factors(tensors, cfg.kind, kdtype)
            base = None if base_weight is None else base_weight[spec.start:spec.stop]
            taus.append(_build_sparse_kernel(fac, W[spec.start:spec.stop], spec.sparsity, cfg, scratch, base))
        del scratch
        if base_weight is not None:
            for r0, r1 in _uncovered_rows(slices, out_features):
                W[r0:r1].copy_(base_weight[r0:r1])
        x_c = x.to(compute_dtype)
        bias_c = None if bias is None else bias.to(compute_dtype)
        if strategy == "fp32":
            # x_c.to(kdtype) is exact: the GEMM sees the same rounded input as the frozen model under autocast
            y = F.linear(x_c.to(kdtype), W, None if bias is None else bias.to(kdtype)).to(compute_dtype)
        elif strategy == "split":
            # [x, x]·[W0, ΔW]ᵀ: one GEMM accumulates both products in fp32 before the output's single rounding, so
            # a per-output delta below half an ulp still moves it (summing two rounded outputs would drop it)
            y = F.linear(torch.cat([x_c, x_c], -1), torch.cat([weight.to(compute_dtype), W.to(compute_dtype)], 1),
                         bias_c)
        else:
            y = F.linear(x_c, W.to(compute_dtype), bias_c)
        ctx.save_for_backward(x_c, weight, *factors)
        ctx.meta = (slices, cfg, tuple(taus), out_features, compute_dtype,
                    None if bias is None else (bias.dtype, bias.shape), strategy)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, *factors = ctx.saved_tensors
        slices, cfg, taus, d_out, compute_dtype, bias_meta, strategy = ctx.meta
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_f = ctx.needs_input_grad[7:]
        with torch.autocast(x.device.type, enabled=False):
            grads = _backward(x, weight, factors, grad_y.to(compute_dtype), slices, cfg, taus, d_out,
                              need_x, need_w, need_f, strategy)
        gx, gw, gfactors = grads
        gb = None
        if need_b:
            gb = grad_y.reshape(-1, d_out).sum(0).to(bias_meta[0])
        return (gx, gw, gb, None, None, None, None, *gfactors)


def _block_entries(cfg: KernelConfig) -> int:
    """Entries of every row block, forward and backward alike (the same partition rebuilds the kernel bit for bit):
    an eighth of ``chunk_entries`` (0.5 MiB fp32 blocks by default). The forward holds the merged weight beside one
    block buffer; the backward up to four (dense G_Yᵀ·X) or three (survivor path) block buffers beside the layer's
    input gradient, while a merged LoRA holds a d_out×d_in weight there. SNELL also trains ``cls_token``, whose
    gradient path keeps block 0's LayerNorm input (T×768, 4.6 MiB at ViT-B batch 8) that LoRA does not: with an
    eighth SNELL-8's peak stays at LoRA-8's (measured by ``benchmarks/snell_step.py``: ``snell_over_lora_peak``;
    with a quarter it was 1.87 MiB above)."""
    return max(1, cfg.chunk_entries // _BLOCK_SHRINK)


def _scratch_rows(cfg: KernelConfig, biggest_rows: int, d_in: int) -> int:
    return _rows_per_block(cfg.kind, biggest_rows, d_in, _block_entries(cfg)) if biggest_rows else 1


def _backward(x, weight, factors, grad_y, slices, cfg, taus, d_out, need_x, need_w, need_f, strategy=None):
    kdtype = _kernel_dtype(factors[0])
    d_in = x.shape[-1]
    X = x.reshape(-1, d_in)
    G = grad_y.reshape(-1, d_out)
    low_precision = X.dtype not in (torch.float32, torch.float64)
    # fp32/fp64: G_X accumulates block by block; reduced precision: the weight G_X needs is assembled whole (ΔW in
    # the GEMM dtype for the delta-only and split paths, W0 + ΔW in fp32 for the fp32 path) and G_X is formed by
    # whole GEMMs, so no partial sum is rounded to bf16 between blocks, and ΔW is never rounded against W0.
    groups = _split_factors(factors, cfg.kind, len(slices))
    per = factor_count(cfg.kind)
    facs = [_Factors(tensors, cfg.kind, kdtype) for tensors in groups]
    # the survivor-only matrices sample G_Yᵀ·X first, while no input gradient is alive yet
    sampled = [_sampled_survivors(fac, spec, tau, cfg, G[:, spec.start:spec.stop], X)
               if any(need_f[i * per:(i + 1) * per]) and uses_survivor_grad(cfg, spec, tau, G.dtype, kdtype, X)
               else None for i, (fac, spec, tau) in enumerate(zip(facs, slices, taus))]
    gx = None
    W_lp = None
    if need_x:
        if low_precision:
            if strategy == "fp32":
                W_lp = weight.to(kdtype, copy=True)
            else:
                W_lp = X.new_zeros(d_out, d_in)
        else:
            gx = _InputGrad()
            if weight is not None:
                for r0, r1 in _uncovered_rows(slices, d_out):
                    gx.add(G[:, r0:r1], weight[r0:r1].to(X.dtype))
    gw = (G.t().to(kdtype) @ X.to(kdtype)).to(weight.dtype) if need_w else None
    gfactors: list[torch.Tensor | None] = [None] * len(factors)
    for index, (spec, tensors, tau, fac) in enumerate(zip(slices, groups, taus, facs)):
        wants = need_f[index * per:(index + 1) * per]
        W0 = None if weight is None or strategy == "split" else weight[spec.start:spec.stop]
        out = _slice_backward(fac, spec, tau, cfg, G[:, spec.start:spec.stop], X, W0, gx, W_lp, any(wants),
                              sampled[index])
        sampled[index] = None
        for j, (g, want) in enumerate(zip(out, wants)):
            if want:
                gfactors[index * per + j] = g.to(tensors[j].dtype).reshape(tensors[j].shape)
    if need_x:
        if not low_precision:
            gx = gx.value
        elif strategy == "fp32":
            gx = (G.to(kdtype) @ W_lp).to(X.dtype)
        elif strategy == "split":
            gx = torch.cat([G, G], 1) @ torch.cat([weight.to(X.dtype), W_lp], 0)  # one rounding, as forward
        else:
            gx = G @ W_lp
        gx = gx.reshape(x.shape)
    return gx, gw, gfactors


def uses_survivor_grad(cfg: KernelConfig, spec: SliceSpec, tau, grad_dtype: torch.dtype,
                       kernel_dtype: torch.dtype, operand: torch.Tensor | None = None) -> bool:
    """Whether backward forms this matrix's weight gradient at the survivors only (``KernelConfig.survivor_grad``).

    Only a sparsified matrix (τ set) has survivors; the plain kernel (SNELL at s = 0) and dense MixK
    (threshold ``none``) need the whole Gᵀ·X. bf16/fp16 gradients keep the dense product: torch's sampled product
    runs in fp32/fp64 only, and the dense bf16 GEMM is already the fast one there. Meta and fake ``operand``s (the
    memory estimator's traced step) keep it too: the survivors' count is data the trace does not have; so does a
    step under a dispatch-mode tracker unless the mode says ``handles_sparse_csr = True``."""
    if tau is None or cfg.survivor_grad == "never" or grad_dtype != kernel_dtype:
        return False
    if operand is not None and is_traced(operand):
        return False
    if any(not getattr(mode, "handles_sparse_csr", False) for mode in _dispatch_modes()):
        return False  # a tracer (torch's MemTracker, the estimator) that cannot take the sampled product's CSR
    return cfg.survivor_grad == "always" or 1.0 - spec.sparsity <= SURVIVOR_MAX_DENSITY


def _dispatch_modes() -> list:
    """The active ``TorchDispatchMode``s (torch's private stack; none if this torch lacks it)."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    except ImportError:
        return []
    return list(_get_current_dispatch_mode_stack())



def survivor_weight_grad(G_rows: torch.Tensor, X: torch.Tensor, magnitude: torch.Tensor,
                         out: torch.Tensor) -> torch.Tensor:
    """``G_K = (G_Yᵀ·X) ⊙ m`` into ``out`` (n × d_in), formed only where ``m ≠ 0`` (zero elsewhere).

    Exact, not an approximation: m is the detached magnitude factor of §3.1, zero on every pruned entry (``code``:
    |K|·1[|K| > τ]; ``paper``: max(|K| − τ, 0), zero exactly where |K| ≤ τ), so ∂L/∂K vanishes there whatever
    G_Yᵀ·X holds. The backward runs the same steps over a whole matrix's row blocks (:class:`_Survivors`); this
    form, on one dense ``magnitude``, states the contract the tests check."""
    survivors = _Survivors(magnitude.shape[1])
    survivors.add_block(0, magnitude.shape[0], magnitude)
    survivors.sample(G_rows, X)
    positions = survivors.positions(0)
    return survivors.scatter(0, positions, magnitude.reshape(-1).index_select(0, positions), out)


class _Survivors:
    """The survivors of one matrix, row block by row block: each block's CSR pattern (int32 row offsets and
    columns) from backward's first pass, then the sampled G_Yᵀ·X there.

    torch's CPU kernel reads one contiguous token row of each operand per survivor, so G's block columns and X are
    transposed per token chunk; sampling runs chunk by chunk over all blocks, so each chunk of X is transposed
    once for the matrix, not once per block. Held per survivor: its column and its value, 8 bytes, i.e. 8·ρ bytes
    per matrix entry at a kept fraction ρ (0.8 at s = 0.9: 1.9 MB for a 3072×768 matrix, four 0.5 MiB block
    buffers). The magnitude factor at the survivors is recomputed from the rebuilt kernel in the third pass."""

    def __init__(self, d_in: int):
        self.d_in = d_in
        self.blocks: list[tuple[int, int, torch.Tensor] | None] = []

    def add_block(self, r0: int, r1: int, magnitude: torch.Tensor) -> None:
        mask = magnitude.ne(0)
        crow = mask.new_zeros(r1 - r0 + 1, dtype=torch.int32)
        torch.cumsum(mask.sum(1, dtype=torch.int32), 0, dtype=torch.int32, out=crow[1:])
        flat = mask.view(-1).nonzero().squeeze(1)  # on a bool mask: a third faster than on the floats
        cols = (flat - torch.div(flat, self.d_in, rounding_mode="floor") * self.d_in).to(torch.int32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta": said once, not actionable
            # the pattern is valid by construction (cumulative counts, in-range sorted columns): no checks
            sampled = torch.sparse_csr_tensor(crow, cols, magnitude.new_zeros(cols.numel()), (r1 - r0, self.d_in),
                                              check_invariants=False)
        self.blocks.append((r0, r1, sampled))

    def sample(self, G_rows: torch.Tensor, X: torch.Tensor) -> None:
        """Every block's values = G_Yᵀ·X at its survivors; ``G_rows`` holds G_Y's columns of the matrix's rows."""
        tokens = G_rows.shape[0]
        chunk = min(max(_SURVIVOR_CHUNK_ENTRIES // self.d_in, _SURVIVOR_TOKENS[0]), _SURVIVOR_TOKENS[1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta": said once, not actionable
            for t0 in range(0, tokens, chunk):
                t1 = min(tokens, t0 + chunk)
                x_t = X[t0:t1].t().contiguous()
                for r0, r1, sampled in self.blocks:
                    g_t = G_rows[t0:t1, r0:r1].t().contiguous()
                    torch.sparse.sampled_addmm(sampled, g_t, x_t.t(), out=sampled)

    def positions(self, block: int) -> torch.Tensor:
        """Flat positions (row·d_in + column) of block ``block``'s survivors within the block."""
        r0, r1, sampled = self.blocks[block]
        counts = sampled.crow_indices().diff()
        rows = torch.repeat_interleave(torch.arange(r1 - r0, device=counts.device), counts)
        return rows.mul_(self.d_in).add_(sampled.col_indices())

    def scatter(self, block: int, positions: torch.Tensor, kept: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (the block's rows × d_in) ← G_K: zero, and (G_Yᵀ·X)·m at the survivors (``kept`` = m there).
        The block's survivors are dropped: each is scattered once."""
        values = self.blocks[block][2].values().mul_(kept)
        self.blocks[block] = None
        out.zero_()
        out.view(-1).index_copy_(0, positions, values)
        return out


class _InputGrad:
    """G_X = Σ_blocks G[:, J]·W[J]: the first block writes a fresh tensor (no zero-filled T×d_in buffer), the
    others accumulate into it."""

    def __init__(self):
        self.value: torch.Tensor | None = None

    def add(self, g: torch.Tensor, w: torch.Tensor) -> None:
        if self.value is None:
            self.value = g @ w
        else:
            self.value.addmm_(g, w)


def _add_weight_block(K_eff: torch.Tensor, M, W0, r0: int, r1: int, G, gx, W_lp, row0: int) -> None:
    """Rows r0:r1 of W = W0 + K' ⊙ m (``K_eff`` holds K', overwritten) into G_X (fp32/fp64) or ``W_lp``."""
    if gx is None and W_lp is None:
        return
    W_block = _weight_rows(K_eff, M, None if W0 is None else W0[r0:r1])
    if gx is not None:
        gx.add(G[:, r0:r1], W_block if W_block.dtype == G.dtype else W_block.to(G.dtype))
    else:
        W_lp[row0 + r0:row0 + r1].copy_(W_block)


def _factor_grads_block(fac: _Factors, GK: torch.Tensor, D: list[torch.Tensor], R_out: list[torch.Tensor],
                        r0: int, r1: int, gA: torch.Tensor, gB: torch.Tensor) -> None:
    """Accumulate ∂A, ∂B from one block's G_K (spec §7.3 A.4); ``R_out[h]`` receives R_h (it may be ``D[h]``)."""
    n = r1 - r0
    if fac.kind == "linear":
        gB[:, r0:r1] = (GK @ fac.A_flat).reshape(n, fac.heads, fac.q).permute(1, 0, 2)
        gA += (GK.t() @ fac.B_flat[r0:r1]).reshape(fac.d_in, fac.heads, fac.q).permute(1, 0, 2)
        return
    for h in range(fac.heads):
        R = torch.div(GK, D[h], out=R_out[h])  # R_h (up to c_h²·sign, applied on the small results)
        scale = fac.signs[h] * fac.sq_coeffs[h]
        rA = R @ fac.in_ones[h]
        rB = R.t() @ fac.out_ones[h][r0:r1]
        gB[h, r0:r1] = (rA[:, -1:] * fac.B[h, r0:r1] - rA[:, :-1]) * scale
        gA[h] += (rB[:, -1:] * fac.A[h] - rB[:, :-1]) * scale


def _sampled_survivors(fac: _Factors, spec: SliceSpec, tau: float, cfg: KernelConfig, G, X) -> _Survivors:
    """Passes 1 and 2 of the survivor-only backward of one matrix: rebuild Kˢ's magnitude factor on the forward's
    row blocks (two block buffers), record the survivors, then the sampled products (:class:`_Survivors`).
    :func:`_backward` runs them for every matrix before any input gradient exists, so the transposed token chunks
    never sit beside G_X."""
    rows, d_in = spec.stop - spec.start, fac.d_in
    per_block = _rows_per_block(fac.kind, rows, d_in, _block_entries(cfg))
    survivors = _Survivors(d_in)
    K_buf, M_buf = (X.new_empty((per_block, d_in), dtype=fac.A.dtype) for _ in range(2))
    for r0, r1 in _blocks(rows, per_block):
        K, M = K_buf[:r1 - r0], M_buf[:r1 - r0]
        fac.kernel_rows(r0, r1, K, M)
        if fac.kind == "mixk":
            K.addcmul_(fac.mixk_softmax(K), fac.alpha).add_(fac.beta)
        survivors.add_block(r0, r1, _magnitude_factor(K, tau, cfg.threshold, M))
    del K_buf, M_buf, K, M
    survivors.sample(G, X)
    return survivors


def _survivor_slice_backward(fac: _Factors, spec: SliceSpec, tau: float, cfg: KernelConfig, G, X, W0, gx, W_lp,
                             survivors: _Survivors):
    """Pass 3 of :func:`_slice_backward` with G_K formed at the survivors only (passes 1 and 2:
    :func:`_sampled_survivors`): per forward row block, rebuild the kernel with its distances, take K and m at the
    survivors, add W's rows (W0, plus K·m at the survivors) to G_X, scatter G_K = (G_Yᵀ·X)·m there and apply the
    closed form. Three block buffers (the kernel, then W's rows, then G_K; the two distances, then R), one fewer
    than the dense path; between the passes only 8 bytes per survivor stay alive, no d_out×d_in tensor."""
    rows, d_in = spec.stop - spec.start, fac.d_in
    per_block = _rows_per_block(fac.kind, rows, d_in, _block_entries(cfg))
    kdtype = fac.A.dtype
    gA, gB = torch.zeros_like(fac.A), torch.zeros_like(fac.B)
    g_mix = None
    GK_buf = X.new_empty((per_block, d_in), dtype=kdtype)
    D_buf = [X.new_empty((per_block, d_in), dtype=kdtype) for _ in range(fac.heads)] if fac.kind != "linear" else []
    for index, (r0, r1) in enumerate(_blocks(rows, per_block)):
        n = r1 - r0
        D = [d[:n] for d in D_buf]
        # MixK keeps K for ∂γ, in its own tensor; the others rebuild K in the buffer that then holds W and G_K
        K = fac.kernel_rows(r0, r1, X.new_empty((n, d_in), dtype=kdtype) if fac.kind == "mixk" else GK_buf[:n],
                            None, D or None)
        positions = survivors.positions(index)
        K_s = K.reshape(-1).index_select(0, positions)
        P = None
        if fac.kind == "mixk":
            P = fac.mixk_softmax(K)
            K_s.addcmul_(P.reshape(-1).index_select(0, positions), fac.alpha).add_(fac.beta)
        kept = _magnitude_factor(K_s, tau, cfg.threshold, torch.empty_like(K_s))
        if gx is not None or W_lp is not None:
            W_rows = GK_buf[:n].zero_() if W0 is None else GK_buf[:n].copy_(W0[r0:r1])
            W_rows.view(-1).index_add_(0, positions, K_s.mul_(kept))  # Kˢ is K·m at the survivors, 0 elsewhere
            _add_weight_block(W_rows, None, None, r0, r1, G, gx, W_lp, spec.start)
        GK = survivors.scatter(index, positions, kept, GK_buf[:n])
        if fac.kind == "mixk":
            GK, g_mix = _mixk_backward(fac, K, P, GK, g_mix)
        _factor_grads_block(fac, GK, D, D, r0, r1, gA, gB)
    if fac.kind == "mixk":
        return [gA, gB, *g_mix]
    return [gA, gB]


def _slice_backward(fac: _Factors, spec: SliceSpec, tau, cfg: KernelConfig, G, X, W0, gx, W_lp, want_factors,
                    survivors: _Survivors | None = None):
    """Gradients of one matrix, row block by row block: adds ``G·W_slice`` into ``gx`` (or writes ``W_slice`` into
    ``W_lp``) and returns the factor gradients [∂A, ∂B (, ∂α, ∂γ, ∂β)] (spec §7.3 A.4). Four block buffers: the
    kernel (reused for W and then G_S), the magnitude factor (reused for R) and the two distances. ``survivors``:
    G_S ⊙ m is formed at the survivors only (:func:`_survivor_slice_backward` on the sampled ``survivors``),
    else as the dense G_Yᵀ·X."""
    if survivors is not None:
        return _survivor_slice_backward(fac, spec, tau, cfg, G, X, W0, gx, W_lp, survivors)
    rows, d_in = spec.stop - spec.start, fac.d_in
    # the forward's row blocks, so each entry is rebuilt bit for bit (an entry at τ must not flip between passes)
    per_block = _rows_per_block(fac.kind, rows, d_in, _block_entries(cfg))
    kdtype = fac.A.dtype
    sparse = tau is not None
    K_buf = X.new_empty((per_block, d_in), dtype=kdtype)
    M_buf = X.new_empty((per_block, d_in), dtype=kdtype)
    D_buf = [X.new_empty((per_block, d_in), dtype=kdtype) for _ in range(fac.heads)] if fac.kind != "linear" else []
    gA, gB = torch.zeros_like(fac.A), torch.zeros_like(fac.B)
    g_mix = None
    for r0, r1 in _blocks(rows, per_block, X):
        n = r1 - r0
        K, M = K_buf[:n], M_buf[:n]
        D = [d[:n] for d in D_buf]
        fac.kernel_rows(r0, r1, K, M, D or None)
        P = None
        if fac.kind == "mixk":
            P = fac.mixk_softmax(K)
            K_eff = torch.addcmul(K, P, fac.alpha).add_(fac.beta)  # K' in its own tensor: K stays for ∂γ
        else:
            K_eff = K  # from here on only D and m are needed, so K's buffer is reused for W and then G_S
        if sparse:
            _magnitude_factor(K_eff, tau, cfg.threshold, M)
        _add_weight_block(K_eff, M if sparse else None, W0, r0, r1, G, gx, W_lp, spec.start)
        if not want_factors:
            continue
        # G_S = G_Yᵀ·X on rows r0:r1: the dense weight gradient
        if G.dtype == kdtype:
            GK = torch.mm(G[:, r0:r1].t(), X, out=K_eff)
        else:
            GK = (G[:, r0:r1].t() @ X).to(kdtype)
        if sparse:
            GK.mul_(M)  # G_K' = G_S ⊙ m: zero on pruned entries, g·|w| on survivors (code threshold)
        if fac.kind == "mixk":
            GK, g_mix = _mixk_backward(fac, K, P, GK, g_mix)
        _factor_grads_block(fac, GK, D, [M] * len(D), r0, r1, gA, gB)
    if fac.kind == "mixk":
        return [gA, gB, *g_mix]
    return [gA, gB]


def _mixk_backward(fac: _Factors, K, P, GKp, acc):
    """Chain G_K' through K' = K + α·softmax_j(K/γ) + β (one block holds the whole matrix)."""
    g_beta = GKp.sum()
    g_alpha = (GKp * P).sum()
    col = (P * GKp).sum(0, keepdim=True)  # softmax over dim 0: per input column i
    g_u = (GKp - col).mul_(P).mul_(fac.alpha)
    g_gamma = -(g_u * K).sum() / (fac.gamma * fac.gamma)
    GK = GKp.add_(g_u / fac.gamma)
    mix = [g_alpha, g_gamma, g_beta]
    if acc is not None:
        mix = [a + b for a, b in zip(acc, mix)]
    return GK, mix


def kernelized_linear(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      slices: Sequence[SliceSpec], factors: Sequence[torch.Tensor], cfg: KernelConfig,
                      out_features: int | None = None) -> torch.Tensor:
    """Apply the fused Function. ``weight``/``bias`` are the frozen Linear's (``weight=None``: the delta only, with
    ``out_features`` rows). ``factors`` is flat: per slice A, B (+ α, γ, β for MixK). Under autocast the kernel is
    built in fp32 and the GEMMs run as :func:`merged_gemm_for` says; the Function itself runs with autocast off."""
    if out_features is None:
        if weight is None:
            raise ValueError("out_features is required when weight is None")
        out_features = weight.shape[0]
    compute_dtype = _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return KernelizedLinearFunction.apply(x, weight, bias, out_features, tuple(slices), cfg, compute_dtype,
                                              *factors)


@torch.no_grad()
def kernelized_delta_weight(slices: Sequence[SliceSpec], factors: Sequence[torch.Tensor], cfg: KernelConfig,
                            out_features: int, in_features: int) -> torch.Tensor:
    """ΔW (out_features × in_features, fp32/fp64) exactly as the forward builds it: the merge of §7.3 E."""
    groups = _split_factors(factors, cfg.kind, len(slices))
    kdtype = _kernel_dtype(factors[0])
    W = factors[0].new_zeros((out_features, in_features), dtype=kdtype)
    biggest = max((s.stop - s.start for s in slices), default=0)
    scratch = factors[0].new_empty((_scratch_rows(cfg, biggest, in_features), in_features), dtype=kdtype)
    for spec, tensors in zip(slices, groups):
        _build_sparse_kernel(_Factors(tensors, cfg.kind, kdtype), W[spec.start:spec.stop], spec.sparsity, cfg,
                             scratch)
    return W


# ============================================================================================== references
def reference_kernel(A: torch.Tensor, B: torch.Tensor, kind: str = "piecewise", alpha=None, gamma=None, beta=None,
                     official_layout: bool = False) -> torch.Tensor:
    """The kernel as the official code writes it, differentiable by autograd: ``Σ_h c_h·cdist(A_h, B_h)`` in the
    official d_in × d_out layout, MixK's softmax over dim 1 (outputs) there. Returned in timm layout (d_out × d_in)
    unless ``official_layout``."""
    if kind == "linear":
        K = torch.einsum("hiq,hjq->ij", A, B)
    else:
        K = sum(c * torch.cdist(A[h], B[h]) for h, c in enumerate(KERNEL_COEFFS))
        if kind == "mixk":
            K = K + alpha * torch.softmax(K / gamma, dim=1) + beta
    return K if official_layout else K.t()


def reference_delta_weight(A: torch.Tensor, B: torch.Tensor, sparsity: float, kind: str = "piecewise",
                           threshold: str = "code", plain_at_zero: bool = True, alpha=None, gamma=None,
                           beta=None) -> torch.Tensor:
    """ΔW (timm layout) through the official expression (spec §3.1): detached ``torch.quantile`` with linear
    interpolation, ``F.threshold`` (strict >), multiplied by the detached magnitude. Autograd through ``cdist``
    and the kernel; the test and benchmark reference for the fused Function."""
    K = reference_kernel(A, B, kind, alpha, gamma, beta, official_layout=True)
    rank = threshold_rank(K.numel(), sparsity, threshold, plain_at_zero)
    if rank is None:
        return K.t()
    mag = K.detach().abs()
    if threshold == "code":
        flat = mag.flatten()
        if flat.numel() <= 1 << 24:  # torch.quantile's limit; kthvalue at rank k has the same kept set (§7.2)
            tau = torch.quantile(flat, sparsity)
        else:
            tau = flat.kthvalue(rank).values
        factor = F.threshold(mag, float(tau), 0.0)
    else:
        tau = 0.0 if rank == 0 else float(mag.flatten().kthvalue(rank).values)
        factor = (mag - tau).clamp_min(0.0)
    return (K * factor).t()
