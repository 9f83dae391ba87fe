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


# ---------------------------------------------------------------------------------------------- the matrix cases
DIM = 16
"""Embedding width of the matrix's ViT: the fit's noise grows with sqrt(d_in / N), so d_in stays small."""
ROWS = 200_000
W0_STD = 0.03
"""ViT-B's attention weights have entries of about this size, which sets the bf16 ulp the delta competes with."""


class Case:
    """One adapted ``blocks.0.attn.qkv`` of a one-block ViT at a given |ΔW| scale: ``zero()`` removes the delta
    (the frozen-only layer through the same code), ``reference`` is the fp64 ΔW taken before any engine ran."""

    def __init__(self, method: str, mode: str, sparsity: float, scale: float):
        import peft_dist
        from conftest import tiny_vit

        self.method, self.mode, self.sparsity, self.scale = method, mode, sparsity, scale
        model = tiny_vit(embed_dim=DIM, num_heads=2, depth=1)
        with torch.no_grad():
            model.blocks[0].attn.qkv.weight.normal_(0.0, W0_STD, generator=torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(7)
        if method == "spt_lora":
            from peft_dist.methods.spt import SPTLinear

            qkv = model.blocks[0].attn.qkv
            positions = torch.randperm(qkv.weight.numel(), generator=g)[:qkv.weight.numel() // 10].tolist()
            # mode "branch": LoRA branches on q, k, v beside δ, added to the frozen + δ GEMM's accumulator
            lora = {n: slice(16 * i, 16 * (i + 1)) for i, n in enumerate("qkv")} if mode == "branch" else None
            model.blocks[0].attn.qkv = SPTLinear(qkv, rank=2, lora=lora, weight_positions=positions, dropout=0.0,
                                                 drop_path=0.0)
            for p in model.parameters():
                p.requires_grad_(False)
            for p in model.blocks[0].attn.qkv.parameters():
                p.requires_grad_(p is not qkv.weight and p is not qkv.bias)
            self.applied = None
        else:
            options = {"lora": dict(rank=2, targets=["q", "k", "v"]),
                       "snell": dict(rank=4, sparsity=sparsity, mode=mode, adapter_dropout=0.0,
                                     adapter_drop_path=0.0),
                       "snella": dict(rank=4, init_sparsity=sparsity, mode=mode, adapter_dropout=0.0,
                                      adapter_drop_path=0.0),
                       "hta": dict(rank=1),
                       "arc": dict(rank=4, dropout=0.0)}[method]
            self.applied = peft_dist.apply_method(model, method, **options)
        self.model = model.eval()
        self.layer = model.blocks[0].attn.qkv
        self._randomise(g)
        self._rescale()
        self.reference = self.delta64()

    # the trainable tensors the delta is linear in (k = 1) or, for the magnitude-weighted kernels, quadratic (k = 2)
    def _scaled(self) -> tuple[list[torch.Tensor], int]:
        layer = self.layer
        if self.method == "lora":
            return list(layer.lora_B.values()), 1
        if self.method in ("snell", "snella"):
            degree = 1 if self.method == "snell" and self.sparsity == 0 else 2
            extra = ["alpha", "beta", "gamma"] if self.method == "snella" else []
            return [getattr(k, n) for k in layer.kernels.values() for n in ["A", "B", *extra]], degree
        if self.method == "spt_lora":
            return [layer.weight_delta.values, *layer.lora_B.values()], 1
        if self.method == "hta":
            return [*layer.diag.values(), *layer.up.values()], 1
        return [layer.scale], 1  # arc: ΔW = W0·P·diag(c)·Pᵀ

    @torch.no_grad()
    def _randomise(self, g: torch.Generator) -> None:
        tensors, _ = self._scaled()
        for t in tensors:
            if self.method == "snella" and t.numel() == 1:
                continue  # α, γ, β keep their init (1, 1, 0); they are scaled with A and B
            if self.method not in ("snell", "snella"):  # SNELL's factors are already random (kaiming, §2.3)
                t.copy_(torch.randn(t.shape, generator=g))

    @torch.no_grad()
    def _rescale(self) -> None:
        tensors, degree = self._scaled()
        dW = self.delta64()
        ratio = self.scale / float(dW.abs()[dW != 0].mean())
        for t in tensors:
            t.mul_(ratio ** (1.0 / degree))

    @torch.no_grad()
    def delta64(self) -> torch.Tensor:
        import copy

        layer = copy.deepcopy(self.layer).double()
        if self.method == "arc":
            object.__setattr__(layer, "_projections", copy.deepcopy(self.layer._projections).double())
            eye = torch.eye(DIM, dtype=torch.float64)
            return layer.base.weight @ (layer.recomposed() - eye)
        return layer.delta_weight().double()

    @torch.no_grad()
    def zero(self) -> None:
        tensors, _ = self._scaled()
        for t in tensors:
            if not (self.method == "snella" and t is not None and _is_gamma(self.layer, t)):
                t.zero_()

    def full_precision(self) -> list[torch.nn.Parameter]:
        if self.method == "spt_lora":
            from peft_dist.methods.spt import delta_values

            return delta_values(self.model)
        return self.applied.full_precision_parameters(self.model)

    def label(self) -> str:
        mode = self.mode if self.method in ("snell", "snella") else "-"
        return f"{self.method:8s} {mode:8s} s={self.sparsity:<4} |dW|={self.scale:.0e}"


def _is_gamma(layer, t) -> bool:
    return any(t is k.gamma for k in layer.kernels.values())


def inputs(rows: int = ROWS, seed: int = 11) -> torch.Tensor:
    """fp32 rows, as autocast's Linears get them from the fp32 LayerNorm and residual stream (FSDP2's policy
    rounds them to bf16 first; the regressors are then the rounded rows)."""
    return torch.randn(rows, DIM, generator=torch.Generator().manual_seed(seed))


CASES = [(m, mode, s, scale) for scale in (1e-5, 1e-2) for m, mode, s in [
    ("lora", "-", 0.0), ("snell", "merged", 0.0), ("snell", "merged", 0.9), ("snell", "faithful", 0.0),
    ("snell", "faithful", 0.9), ("snella", "merged", 0.0), ("snella", "merged", 0.9), ("spt_lora", "-", 0.9),
    ("spt_lora", "branch", 0.9),
    ("hta", "-", 0.0), ("arc", "-", 0.0)]]
"""method × mode × s × scale; s is SNELL/SNELLA's sparsity (SPT: 90 % of the weight's entries stay frozen;
``branch``: with LoRA branches on q, k, v beside δ)."""


def autocast_error(spec) -> float:
    """Applied-delta error of one case under CPU autocast in bf16."""
    case = Case(*spec)
    x = inputs()

    def forward():
        # one autocast region per forward: autocast caches its bf16 copies of leaf parameters for the region's
        # lifetime, so zeroing the adapter inside one region would not reach the second forward
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return case.layer(x)

    y = forward()
    case.zero()
    return relative_error(fitted_delta(x, y, forward()), case.reference)


def fsdp2_matrix(rank: int, world: int, port: int, cases, out_file: str) -> None:
    """Each case under FSDP2's bf16 policy (fp32 reduction; full-precision parameters by the torch version's
    strategy) on ``world`` gloo ranks: the layer is called directly on every rank's same rows between explicit
    unshard/reshard of every FSDP2 group. Rank 0 writes {"errors": [...], "spt_delta_dtype": ...} as JSON."""
    import json

    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from dist_workers import init_gloo
    from peft_dist.engines.fsdp2 import apply_fsdp2

    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    try:
        x = inputs().bfloat16()
        errors, seen = [], {}
        for spec in cases:
            case = Case(*spec)
            apply_fsdp2(case.model, torch.device("cpu"), True, True, True, case.full_precision())
            groups = [m for m in case.model.modules() if isinstance(m, FSDPModule)]
            if spec[0] == "spt_lora":
                case.layer.weight_delta.register_forward_hook(lambda m, a, out: seen.update(spt=str(out.dtype)))

            def forward():
                for m in groups:
                    m.unshard()
                with torch.no_grad():
                    y = case.layer(x)
                for m in groups:
                    m.reshard()
                return y

            y = forward()
            case.zero()
            errors.append(relative_error(fitted_delta(x, y, forward()), case.reference))
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump({"errors": errors, "spt_delta_dtype": seen.get("spt")}, f)
    finally:
        dist.destroy_process_group()
