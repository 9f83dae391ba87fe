"""The Method contract (design.md "The contracts") and the pieces every method shares.

A method injects small modules into a plain timm model and freezes everything else. It knows nothing about ranks:
engines wrap the model afterwards. Adapted layers stay ``nn.Module``s owning their parameters, so any engine can
shard them, and each one that can be folded into the backbone implements :meth:`AdaptedModule.merged`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn


class MergeError(RuntimeError):
    """The method's modules cannot be folded into a plain timm model (e.g. a non-linear bottleneck)."""


@dataclass
class TrainPlan:
    """What the trainer tells methods with schedules (SNELLA's budget, SPT's warm-up) before the first step."""

    total_steps: int
    steps_per_epoch: int
    epochs: int


def add_to_rows(out: torch.Tensor, deltas: list[tuple[slice, torch.Tensor]]) -> torch.Tensor:
    """``out`` with each ``delta`` added to its rows of the last dimension (q/k/v slices of the fused qkv), out of
    place: one ``torch.cat`` of the untouched gaps and the updated slices, so no zero-padded full-width delta is
    built. Out of place because views of ``out`` may be saved by autograd (SPT's sequential adapters read them) and
    because in-place slice updates of a module's output segfault torch 2.14's MemTracker under fake tensors (the
    memory estimator's trace); it costs nothing for backward, since neither add nor cat saves tensors."""
    width = out.shape[-1]
    if len(deltas) == 1 and deltas[0][0].start == 0 and deltas[0][0].stop == width:
        return out + deltas[0][1].to(out.dtype)
    pieces, cursor = [], 0
    for rows, delta in sorted(deltas, key=lambda item: item[0].start):
        if rows.start < cursor:
            raise ValueError(f"row slices overlap at {rows.start}")
        if rows.start > cursor:
            pieces.append(out[..., cursor:rows.start])
        pieces.append(out[..., rows] + delta.to(out.dtype))
        cursor = rows.stop
    if cursor < width:
        pieces.append(out[..., cursor:])
    return torch.cat(pieces, dim=-1)


class _FrozenLinearAccumulator(torch.autograd.Function):
    """``x·W0ᵀ`` for reduced-precision ``x`` and ``W0``, returned as the GEMM's fp32 accumulator instead of
    rounded to the compute dtype. Saves only the (frozen) weight: no weight gradient is formed."""

    @staticmethod
    def forward(ctx, x, weight):
        flat = x.reshape(-1, x.shape[-1])
        if x.device.type == "cuda":
            y = torch.mm(flat, weight.t(), out_dtype=torch.float32)  # the bf16 GEMM's own fp32 accumulator
        else:
            # bf16 products are exact in fp32, so an fp32 GEMM on the upcast operands is that accumulator
            y = torch.mm(flat.float(), weight.t().float())
        ctx.save_for_backward(weight)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        (weight,) = ctx.saved_tensors
        return grad_y.to(weight.dtype) @ weight, None


def compute_dtype(base: nn.Linear, x: torch.Tensor) -> torch.dtype:
    """The dtype ``base(x)`` computes in: autocast's, else the promotion of input and weight (FSDP2's policy)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(x.dtype, base.weight.dtype)


def frozen_linear(base: nn.Linear, x: torch.Tensor, bias: torch.Tensor | None | str = "base"
                  ) -> tuple[torch.Tensor, torch.dtype]:
    """``base(x)`` for a parallel branch to add its delta to, and the dtype the sum is to be returned in.

    Under bf16/fp16 compute ``base(x)`` is rounded to bf16, and a delta below half its ulp added afterwards rounds
    back to it on every row (a LoRA delta of |ΔW| ~ 1e-5 on ViT weights is lost entirely). Here the frozen output
    stays fp32 (on CUDA the bf16 GEMM's own accumulator, on CPU an exact fp32 emulation of it), so that the caller
    adds the delta and rounds once: ``(y + delta).to(dtype)``. fp32/fp64 compute, or a trainable base, is plain
    ``base(x)``. ``bias`` replaces the base's bias (SPT's bias delta), added in fp32."""
    weight = base.weight
    own_bias = isinstance(bias, str)
    bias = base.bias if own_bias else bias
    device = x.device.type
    compute = compute_dtype(base, x)
    trainable = weight.requires_grad or (base.bias is not None and base.bias.requires_grad)
    if compute in (torch.float32, torch.float64) or trainable:
        y = base(x) if own_bias else F.linear(x, weight, None if bias is None else bias.to(weight.dtype))
        return y, y.dtype
    with torch.autocast(device, enabled=False):
        y = _FrozenLinearAccumulator.apply(x.to(compute), weight.to(compute))
        # outside the Function: a bias delta (SPT) gets its gradient from autograd
        return (y if bias is None else y + bias.float()), compute


class AdaptedModule(nn.Module):
    """Base of every module a method injects. ``merged()`` returns the plain module it folds into, or raises."""

    def merged(self) -> nn.Module:
        raise MergeError(f"{type(self).__name__} cannot be merged into the backbone")


class Method:
    """Base class: subclasses set ``name``/``options_cls`` and implement :meth:`inject`.

    Lifecycle: ``apply(model)`` → trainer calls ``on_train_start(model, plan)``, ``on_epoch_start(model, epoch)``
    before each epoch's first forward, ``on_step_end(model, step)`` after each optimizer step *before* gradients are
    cleared (so allocators can read them), and ``merge(model)`` for export.
    """

    name: str = ""
    options_cls: type = object

    def __init__(self, options: Any):
        self.options = options

    # ------------------------------------------------------------------ injection and freezing
    def apply(self, model: nn.Module) -> None:
        """Freeze the whole model, inject this method's modules, then unfreeze exactly its trainable set."""
        for p in model.parameters():
            p.requires_grad_(False)
        self.inject(model)
        for p in self.trainable_set(model):
            p.requires_grad_(True)
        model.peft_method = self  # so merge()/trainable_state_dict() can find it without a second handle

    def inject(self, model: nn.Module) -> None:
        """Add the method's modules (they may be created with requires_grad=True; apply() re-freezes first)."""

    def trainable_set(self, model: nn.Module) -> Iterator[nn.Parameter]:
        """Parameters this method trains: by default every parameter of an injected module, plus the head."""
        yield from adapter_parameters(model)
        yield from head_parameters(model)

    def full_precision_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters whose math must stay fp32 under a bf16 engine policy (FSDP2 then gathers them in their own
        dtype instead of casting them); none by default."""
        return []

    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in model.named_parameters():
            if p.requires_grad:
                yield name, p

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """AdamW groups: no decay on 1-D tensors, biases and the model's ``no_weight_decay()`` names."""
        skip = set(getattr(model, "no_weight_decay", lambda: set())())
        decay, no_decay = [], []
        for name, p in self.trainable_parameters(model):
            if p.ndim <= 1 or name.endswith(".bias") or name in skip:
                no_decay.append(p)
            else:
                decay.append(p)
        groups = []
        if decay:
            groups.append({"params": decay, "weight_decay": weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    # ------------------------------------------------------------------ schedules (no-ops by default)
    def on_train_start(self, model: nn.Module, plan: TrainPlan) -> None:
        pass

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        pass

    def on_step_end(self, model: nn.Module, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """Method state that must survive a resume (allocator statistics); tensors or plain values."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def summary(self, model: nn.Module) -> dict[str, Any]:
        """Extra figures for ``summary.json`` (e.g. realised sparsity per matrix); JSON-serialisable."""
        return {}

    def write_artifacts(self, model: nn.Module, out_dir: Path) -> list[Path]:
        """Write method-specific files (allocation tables, heat maps) into ``out_dir``; rank 0 only. The trainer
        calls it after each epoch's allocation and at the end; the tracker logs the returned files."""
        return []

    # ------------------------------------------------------------------ export
    def merge(self, model: nn.Module) -> nn.Module:
        """Fold every adapted module into the backbone in place; the result holds no peft-dist module."""
        with torch.no_grad():
            for path, module in list(model.named_modules()):
                if isinstance(module, AdaptedModule) and path and not _inside_adapted(model, path):
                    _replace(model, path, module.merged())
        leftovers = [n for n, m in model.named_modules() if isinstance(m, AdaptedModule)]
        if leftovers:
            raise MergeError(f"method {self.name!r}: {leftovers[0]} could not be merged")
        if hasattr(model, "peft_method"):
            del model.peft_method
        for p in model.parameters():
            p.requires_grad_(False)
        return model


# ---------------------------------------------------------------------- helpers shared by methods
def adapter_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters owned by injected modules, excluding the frozen layers they wrap (their ``base``)."""
    adapted = [m for m in model.modules() if isinstance(m, AdaptedModule)]
    frozen = {id(p) for m in adapted if isinstance(getattr(m, "base", None), nn.Module) for p in m.base.parameters()}
    seen: set[int] = set()
    for m in adapted:
        for p in m.parameters():
            if id(p) not in frozen and id(p) not in seen:
                seen.add(id(p))
                yield p


def adapter_buffer_names(model: nn.Module) -> list[str]:
    """Persistent buffers of the injected modules (SNELLA's learned per-matrix sparsity, SPT's entry indices): with
    the trainable parameters they are what an adapter file must hold to rebuild the trained model."""
    names = set()
    for path, module in model.named_modules():
        if isinstance(module, AdaptedModule):
            persistent = module.state_dict(keep_vars=True).keys()  # non-persistent buffers are not in it
            names |= {f"{path}.{n}" if path else n for n, _ in module.named_buffers() if n in persistent}
    return sorted(names)


def adapter_state_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.state_dict()``) of the adapter state: trainable parameters + the injected buffers."""
    return {n for n, p in model.named_parameters() if p.requires_grad} | set(adapter_buffer_names(model))


def head_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    if isinstance(head, nn.Module):
        yield from head.parameters()


def head_parameter_names(model: nn.Module) -> set[str]:
    ids = {id(p) for p in head_parameters(model)}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def count_trainable(model: nn.Module) -> dict[str, int]:
    """Exact trainable element counts, with and without the classification head."""
    head = head_parameter_names(model)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    without = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in head)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable_params": total, "trainable_params_without_head": without, "frozen_params": frozen}


def options_to_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options or {})


def _inside_adapted(model: nn.Module, path: str) -> bool:
    parts = path.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), AdaptedModule):
            return True
    return False


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)
