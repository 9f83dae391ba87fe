"""``sparse_masked``: the memory-hungry sparse-tuning baseline that SNELL's memory reductions are measured against.

What it is (spec snell_snella.md §6.2, §6.3; issue 9 item 3). GPS-style / SPT-paper-style unstructured sparse tuning
as it is usually implemented: every adapted weight matrix stays a whole trainable ``nn.Parameter`` and a fixed 0/1
mask zeroes the gradient of the entries that are not tuned. So the trainable entries are few, but autograd produces
**full-size gradients**, AdamW keeps **full-size moments**, and the mask itself costs one byte per entry. That is the
memory profile behind the paper's GPS row (2,428 / 7,522 / 16,119 MB at batch 8 on ViT-B/L/H vs SNELL's
1,673 / 4,519 / 9,692 MB). Its only purpose is to be measured and compared; it is not a selection method.

* **Matrices** (same placement as SNELL, §1.1 and §1.3): q, k, v, proj, fc1 and fc2 of every block; q/k/v are row
  thirds of the fused ``attn.qkv`` with one mask each, so each has its own density.
* **Density per matrix** matches a SNELL run: ``sparsity`` takes SNELL's own option format (one number, or a map with
  ``default`` / a kind such as ``fc1`` / one matrix such as ``blocks.3.fc1``), or ``sparsity_file`` reads the
  per-matrix table a SNELL or SNELLA run writes (``snell_sparsity.csv``, ``snella_allocation.csv``: columns
  ``matrix`` and ``sparsity``). A matrix keeps exactly ⌊(1 − s)·N⌉ entries, chosen uniformly at random with the
  ``seed`` (the memory does not depend on which entries).
* **Trainable**: the adapted weight matrices (masked), the head and ``cls_token`` (SNELL's trainable set, §1.1).
* **Gradient masking** happens inside the Linear's backward (:class:`MaskedWeightLinear`), so it sees the
  unsharded weight under FSDP2 and no hook has to follow parameters across engines. The masked matrices get no
  weight decay: with decoupled decay AdamW would otherwise shrink the untouched entries, and they must stay W0.
* ``merge`` is trivial: the tuned weights already hold W0 + ΔW.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from peft_dist.config import ConfigError
from peft_dist.methods.base import AdaptedModule, Method, head_parameters
from peft_dist.methods.registry import register_method
from peft_dist.methods.sparsity_option import MATRIX_KEY, check_sparsity_option, lookup_sparsity
from peft_dist.models.targets import TARGET_NAMES, check_targets, find_targets, group_by_path, replace_module



@dataclass
class SparseMaskedOptions:
    sparsity: float | dict[str, float] = 0.9
    """Zeroed (untuned) fraction s per matrix, SNELL's option format: a number, or a map with keys ``default``, a
    kind (``q``, ``fc1``, ...) or one matrix (``blocks.3.fc1``); the most specific key wins."""
    sparsity_file: str | None = None
    """Per-matrix sparsity of a SNELL/SNELLA run (``snell_sparsity.csv`` / ``snella_allocation.csv``, columns
    ``matrix`` and ``sparsity``); overrides ``sparsity``."""
    targets: list[str] = field(default_factory=lambda: list(TARGET_NAMES))
    seed: int = 0
    """Seeds the choice of tuned entries (a private generator: the global RNG is untouched)."""
    train_cls_token: bool = True

    run_files: ClassVar[dict[str, str]] = {"sparsity_file": "sparse_masked_sparsity.csv"}
    """Options naming files, and the copy a run keeps of each (``eval``/``export`` of a copied run use the copy)."""

    def validate(self) -> None:
        check_targets(self.targets)
        check_sparsity_option(self.sparsity)
        if self.sparsity_file is not None:
            read_sparsity_file(self.sparsity_file)

    def sparsity_for(self, block: int, kind: str, table: dict[str, float] | None = None) -> float:
        name = f"blocks.{block}.{kind}"
        if table is not None:
            if name not in table:
                raise ConfigError(f"method.sparsity_file: {self.sparsity_file} has no row for matrix {name} "
                                  "(was it written for another backbone or target set?)")
            return table[name]
        s = lookup_sparsity(self.sparsity, block, kind)
        if s is not None:
            return s
        raise ConfigError(f"method.sparsity: no value for {name}; add a 'default' key")


def read_sparsity_file(path: str | Path) -> dict[str, float]:
    """``{matrix: sparsity}`` from a SNELL/SNELLA per-matrix CSV; errors name the file and the row."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"method.sparsity_file: file not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "matrix" not in columns or "sparsity" not in columns:
            raise ConfigError(f"method.sparsity_file: {path} needs the columns 'matrix' and 'sparsity' "
                              f"(found: {', '.join(columns) or 'none'})")
        table: dict[str, float] = {}
        for line, row in enumerate(reader, start=2):
            name = row["matrix"]
            if not MATRIX_KEY.match(name or ""):
                raise ConfigError(f"method.sparsity_file: {path} line {line}: matrix {name!r} is not "
                                  "blocks.<i>.<q|k|v|proj|fc1|fc2>")
            try:
                value = float(row["sparsity"])
            except (TypeError, ValueError):
                raise ConfigError(f"method.sparsity_file: {path} line {line}: sparsity {row['sparsity']!r} is not "
                                  "a number") from None
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"method.sparsity_file: {path} line {line}: sparsity {value} is outside [0, 1]")
            table[name] = value
    if not table:
        raise ConfigError(f"method.sparsity_file: {path} has no rows")
    return table


def kept_entries(numel: int, sparsity: float) -> int:
    """Entries a matrix of ``numel`` entries tunes at ``sparsity``: round((1 − s)·N)."""
    return int(round((1.0 - sparsity) * numel))


class MaskedWeightGrad(torch.autograd.Function):
    """``y = x·Wᵀ + b`` whose weight gradient is ``(gᵀ·x) ⊙ mask``: dense, full size, then masked, as GPS-style
    sparse tuning computes it. The bias is frozen (no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor):
        ctx.save_for_backward(x, weight, mask)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, mask = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            x2 = x.reshape(-1, x.shape[-1]).to(g2.dtype)
            grad_w = (g2.t() @ x2).to(weight.dtype)
            grad_w.mul_(mask)  # in place: the full-size gradient is the point, no second full-size copy
        return grad_x, grad_w, None, None


class MaskedWeightLinear(AdaptedModule):
    """A Linear whose weight trains only at the mask's True entries (one bool per weight entry)."""

    def __init__(self, base: nn.Linear, mask: torch.Tensor):
        super().__init__()
        self.base = base
        if mask.shape != base.weight.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(base.weight.shape)}")
        self.register_buffer("grad_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base.weight
        if not w.requires_grad:
            return self.base(x)
        return MaskedWeightGrad.apply(x, w, self.base.bias, self.grad_mask)

    def merged(self) -> nn.Linear:
        return self.base


def random_mask(shape: tuple[int, ...], kept: int, generator: torch.Generator, device) -> torch.Tensor:
    """A bool mask with exactly ``kept`` True entries at uniformly random positions."""
    numel = 1
    for s in shape:
        numel *= s
    mask = torch.zeros(numel, dtype=torch.bool, device=device)
    if kept > 0:
        positions = torch.randperm(numel, generator=generator)[:kept]
        mask[positions.to(device)] = True
    return mask.view(shape)


@register_method("sparse_masked", SparseMaskedOptions)
class SparseMasked(Method):
    """Whole weight matrices trainable with masked gradients (the GPS-style memory baseline)."""

    def inject(self, model: nn.Module) -> None:
        o = self.options
        table = read_sparsity_file(o.sparsity_file) if o.sparsity_file else None
        generator = torch.Generator().manual_seed(int(o.seed))
        self.density: dict[str, float] = {}
        for path, group in group_by_path(find_targets(model, tuple(o.targets))).items():
            base = model.get_submodule(path)
            device = base.weight.device
            d_in = base.weight.shape[1]
            mask = torch.zeros(base.weight.shape, dtype=torch.bool, device=device)
            for t in group:
                rows = t.rows.stop - t.rows.start
                s = o.sparsity_for(t.block, t.name, table)
                kept = kept_entries(rows * d_in, s)
                mask[t.rows] = random_mask((rows, d_in), kept, generator, device)
                self.density[f"blocks.{t.block}.{t.name}"] = kept / (rows * d_in)
            replace_module(model, path, MaskedWeightLinear(base, mask))

    def masked_modules(self, model: nn.Module) -> Iterator[MaskedWeightLinear]:
        return (m for m in model.modules() if isinstance(m, MaskedWeightLinear))

    def trainable_set(self, model: nn.Module) -> Iterator[nn.Parameter]:
        for m in self.masked_modules(model):
            yield m.base.weight
        yield from head_parameters(model)
        cls_token = getattr(model, "cls_token", None)
        if self.options.train_cls_token and isinstance(cls_token, nn.Parameter):
            yield cls_token

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """The masked matrices get no weight decay (their untouched entries must stay W0); the rest as usual."""
        masked = {id(m.base.weight) for m in self.masked_modules(model)}
        groups = super().param_groups(model, weight_decay)
        out = []
        for g in groups:
            keep = [p for p in g["params"] if id(p) not in masked]
            if keep:
                out.append({**g, "params": keep})
        matrices = [p for _, p in self.trainable_parameters(model) if id(p) in masked]
        if matrices:
            out.append({"params": matrices, "weight_decay": 0.0})
        return out

    def summary(self, model: nn.Module) -> dict[str, Any]:
        tuned = sum(int(m.grad_mask.sum()) for m in self.masked_modules(model))
        entries = sum(m.grad_mask.numel() for m in self.masked_modules(model))
        return {"tuned_entries": tuned, "masked_matrix_entries": entries,
                "density": tuned / entries if entries else 0.0,
                "note": "full-size gradients and AdamW moments for every masked matrix (memory baseline)"}

    def write_artifacts(self, model: nn.Module, out_dir: Path) -> list[Path]:
        """Keep the per-matrix sparsity file beside the run: the masks are drawn from it, so ``eval`` of a copied
        run needs it to rebuild them."""
        if not self.options.sparsity_file:
            return []
        path = Path(out_dir) / SparseMaskedOptions.run_files["sparsity_file"]
        text = Path(self.options.sparsity_file).read_bytes()
        if not path.is_file() or path.read_bytes() != text:
            path.write_bytes(text)
        return [path]
