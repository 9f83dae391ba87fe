"""SPT stage 2 (He et al., ICCV 2023): train the allocation written by ``peft-dist sensitivity``
(spec ``spt_arc_hta.md`` §1.4-1.7).

``spt_lora`` and ``spt_adapter`` read one budget of an allocation file and build, per timm Linear:

* **structured modules** at the chosen (block, op) positions (§1.4): a parallel LoRA branch ``Drop(X)·Aᵀ·Bᵀ`` (no
  α/r scale) or a sequential bottleneck ``Y + DropPath(U·GELU(Dn·Drop(Y) + a) + e)`` on the op's output (parallel,
  on the input, for ``proj``); each with its own DropPath. q/k/v are row thirds of the fused qkv (§1.7); their LoRA
  branches share one input-dropout mask, and ``proj`` gets no input dropout, as officially;
* **unstructured entries** of the weight as a 1-D δ trained through
  :func:`peft_dist.methods.functional.sparse_delta.sparse_delta_linear` (§1.5: dense-GEMM-then-gather backward,
  only ``x`` saved);
* **vectors** (Linear biases and LayerNorm γ/β) as deltas at their selected positions, or at every position when the
  vector is tuned whole. So the backbone stays frozen and every trainable tensor lives in an injected module, which
  keeps checkpoints adapter-only and lets engines store frozen weights in bf16 while deltas stay fp32.

Choice on LayerNorm entries (§1.5, §5.4 item 13): unstructured LayerNorm entries **are trained** by default (the
official code counts them but never trains them), so the trainable count without the head equals the allocation's
total exactly; ``train_norm_entries: false`` is the official behaviour (counted in the budget, left frozen).

SPT-Adapter must use adapter-derived allocation files (§1.6, the official script points at LoRA files): the method
refuses a file whose ``structured_type`` differs. SPT-LoRA merges exactly; SPT-Adapter cannot (GELU) and reports the
extra inference FLOPs of its bottlenecks instead (§5.2 item 7).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from peft_dist.config import ConfigError, check_range
from peft_dist.methods.base import (AdaptedModule, MergeError, Method, adapter_parameters, add_to_rows,
                                    frozen_linear, head_parameters)
from peft_dist.methods.functional.sparse_delta import check_index, compact_index_dtype, sparse_delta_accumulated
from peft_dist.methods.lora import merged_linear
from peft_dist.methods.registry import register_method
from peft_dist.methods.spt_sensitivity import (OPS, AllocationError, allocation_json, backbone_fingerprint,
                                               check_allocation_metadata, expand_allocation_path, model_candidates,
                                               read_allocation, select_budget)
from peft_dist.models.targets import replace_module

_QKV_OP = re.compile(r"^(blocks\.\d+\.attn)\.(q|k|v)\.(weight|bias)$")
_OP_MODULE = {"q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1",
              "fc2": "mlp.fc2"}


# ============================================================================================ modules
class SPTBottleneck(nn.Module):
    """Ad(u) = U·GELU(Dn·u + a) + e with Dn the nn.Linear default init and U, e zero (spec §1.4)."""

    def __init__(self, dim: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(dim, rank, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, dim, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(u)))


class DeltaValues(nn.Module):
    """The trainable values δ of one sparse delta, fp32 whatever the frozen storage dtype (spec §5.2 item 6).

    A module of its own whose ``forward`` hands δ out: under FSDP2's bf16 policy δ is gathered in fp32
    (:meth:`_SPT.full_precision_parameters`), and on torch < 2.15 that takes an FSDP2 group holding only δ
    (``engines.fsdp2.shard_full_precision_owners``), gathered by the hooks around this call."""

    def __init__(self, count: int, like: torch.Tensor):
        super().__init__()
        dtype = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
        self.values = nn.Parameter(torch.zeros(count, device=like.device, dtype=dtype))

    def forward(self) -> torch.Tensor:
        return self.values


def _index_buffer(module: nn.Module, name: str, positions: list[int], numel: int, device) -> None:
    index = torch.tensor(sorted(positions), dtype=compact_index_dtype(numel), device="cpu")
    check_index(index, numel, name)
    # Non-persistent: the allocation file is the source of truth, and engines must replicate, never shard, it.
    module.register_buffer(name, index.to(device), persistent=False)


class SPTLinear(AdaptedModule):
    """A frozen Linear with SPT's structured modules on row slices, a sparse weight delta and a bias delta.

    ``lora`` / ``adapters``: {slice name: rows}; ``weight_positions`` / ``bias_positions``: flat positions of the
    fused weight/bias that train. ``input_dropout`` is False for ``proj`` (spec §1.4).
    """

    def __init__(self, base: nn.Linear, *, rank: int, lora: dict[str, slice] | None = None,
                 adapters: dict[str, slice] | None = None, parallel_adapter: bool = False,
                 weight_positions: list[int] | None = None, bias_positions: list[int] | None = None,
                 dropout: float = 0.1, drop_path: float = 0.1, input_dropout: bool = True):
        super().__init__()
        self.base = base
        self.lora_slices = dict(lora or {})
        self.adapter_slices = dict(adapters or {})
        self.parallel_adapter = parallel_adapter
        w = base.weight
        factory = {"device": w.device, "dtype": w.dtype if w.dtype == torch.float64 else torch.float32}
        self.dropout = nn.Dropout(dropout) if dropout > 0 and input_dropout else nn.Identity()
        self.drop_path = nn.ModuleDict({n: DropPath(drop_path) if drop_path > 0 else nn.Identity()
                                        for n in [*self.lora_slices, *self.adapter_slices]})
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, rows in self.lora_slices.items():
            a = torch.empty(rank, base.in_features, **factory)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # the nn.Linear default, as officially (spec §1.4)
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(rows.stop - rows.start, rank, **factory))
        self.adapters = nn.ModuleDict({
            name: SPTBottleneck(base.in_features if parallel_adapter else rows.stop - rows.start, rank, **factory)
            for name, rows in self.adapter_slices.items()})
        self.weight_delta = self.bias_delta = None
        if weight_positions:
            self.weight_delta = DeltaValues(len(weight_positions), w)
            _index_buffer(self, "weight_index", weight_positions, w.numel(), w.device)
        if bias_positions:
            if base.bias is None:
                raise AllocationError("the allocation tunes a bias the Linear does not have")
            self.bias_delta = DeltaValues(len(bias_positions), base.bias)
            _index_buffer(self, "bias_index", bias_positions, base.bias.numel(), w.device)

    def effective_bias(self) -> torch.Tensor | None:
        bias = self.base.bias
        if self.bias_delta is None:
            return bias
        delta = self.bias_delta()
        dtype = torch.promote_types(bias.dtype, delta.dtype)
        return bias.to(dtype).index_add(0, self.bias_index, delta.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.effective_bias()
        # y stays the fp32 accumulator under bf16 until every branch is added (see frozen_linear), then is rounded
        if self.weight_delta is not None:
            y, dtype = sparse_delta_accumulated(x, self.base.weight, self.weight_delta(), self.weight_index, bias)
        else:
            y, dtype = frozen_linear(self.base, x, bias)
        if self.lora_slices:
            xd = self.dropout(x)  # one mask shared by the q/k/v branches (official L337)
            y = add_to_rows(y, [(rows, self.drop_path[name](F.linear(F.linear(xd, self.lora_A[name]),
                                                                      self.lora_B[name])))
                                for name, rows in self.lora_slices.items()])
        if self.adapter_slices:
            updates = []
            for name, rows in self.adapter_slices.items():
                source = x if self.parallel_adapter else self.dropout(y[..., rows].to(dtype))
                updates.append((rows, self.drop_path[name](self.adapters[name](source))))
            y = add_to_rows(y, updates)
        return y.to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scatter(δ) + Σ_slices B·A, in fp32 (or fp64 for fp64 modules)."""
        w = self.base.weight
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        dw = torch.zeros(w.shape, dtype=dtype, device=w.device)
        if self.weight_delta is not None:
            dw.view(-1).index_add_(0, self.weight_index.long(), self.weight_delta().to(dtype))
        for name, rows in self.lora_slices.items():
            dw[rows] += self.lora_B[name].to(dtype) @ self.lora_A[name].to(dtype)
        return dw

    def delta_bias(self) -> torch.Tensor | None:
        if self.bias_delta is None:
            return None
        b = self.base.bias
        delta = self.bias_delta()
        return torch.zeros(b.shape, dtype=delta.dtype, device=b.device).index_add_(0, self.bias_index.long(), delta)

    def merged(self) -> nn.Linear:
        if self.adapter_slices:
            raise MergeError("SPT-Adapter bottlenecks are non-linear (GELU) and cannot be folded into the backbone "
                             "(spec §5.2 item 7); export the unmerged model instead")
        return merged_linear(self.base, self.delta_weight(), self.delta_bias())

    def adapter_flops_per_token(self) -> int:
        """Extra multiply-add FLOPs per token of the unmergeable bottlenecks (2 per multiply-add)."""
        flops = 0
        for name, rows in self.adapter_slices.items():
            d = self.base.in_features if self.parallel_adapter else rows.stop - rows.start
            r = self.adapters[name].down.out_features
            flops += 2 * d * r * 2
        return flops


class SPTLayerNorm(AdaptedModule):
    """A frozen LayerNorm whose γ/β train at selected positions (all positions when tuned whole)."""

    def __init__(self, base: nn.LayerNorm, weight_positions: list[int] | None = None,
                 bias_positions: list[int] | None = None):
        super().__init__()
        self.base = base
        self.weight_delta = self.bias_delta = None
        for which, positions in (("weight", weight_positions), ("bias", bias_positions)):
            if not positions:
                continue
            ref = getattr(base, which)
            if ref is None:
                raise AllocationError(f"the allocation tunes a LayerNorm {which} the model does not have")
            setattr(self, f"{which}_delta", DeltaValues(len(positions), ref))
            _index_buffer(self, f"{which}_index", positions, ref.numel(), ref.device)

    def _effective(self, which: str) -> torch.Tensor | None:
        ref = getattr(self.base, which)
        owner = getattr(self, f"{which}_delta")
        if owner is None:
            return ref
        delta = owner()
        dtype = torch.promote_types(ref.dtype, delta.dtype)
        return ref.to(dtype).index_add(0, getattr(self, f"{which}_index"), delta.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._effective("weight"), self._effective("bias")
        dtype = x.dtype
        return F.layer_norm(x, self.base.normalized_shape, None if w is None else w.to(dtype),
                            None if b is None else b.to(dtype), self.base.eps)

    def merged(self) -> nn.LayerNorm:
        ref = self.base.weight if self.base.weight is not None else self.base.bias
        out = nn.LayerNorm(self.base.normalized_shape, eps=self.base.eps,
                           elementwise_affine=self.base.weight is not None, bias=self.base.bias is not None,
                           device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for which in ("weight", "bias"):
                value = self._effective(which)
                if value is not None:
                    getattr(out, which).copy_(value.to(ref.dtype))
        out.requires_grad_(False)
        return out


def delta_values(model: nn.Module) -> list[nn.Parameter]:
    """Every sparse delta's δ: SPT's full-precision parameters. Gathered in bf16, each step's δ would reach the fused
    GEMM rounded to a relative 2⁻⁹ (and its update rounded with it); in fp32 it arrives exact, and the GEMM keeps it
    apart from W0's rounding (``functional.sparse_delta``)."""
    return [m.values for m in model.modules() if isinstance(m, DeltaValues)]


# ============================================================================================ options
@dataclass
class SPTOptions:
    allocation: str = ""
    """Allocation JSON written by ``peft-dist sensitivity`` (spt_adapter needs an adapter-derived file, §1.6); may
    name ``{task}`` and ``{budget}`` (one file per task and budget, as the official code keeps them)."""
    budget: float = 0.4
    """Which budget of the file to train, in millions of parameters (head excluded, spec §1.3)."""
    task: str = ""
    """The task this run trains (``vtab/cifar``, as the shards' ``_info.json`` names it): fills ``{task}`` in
    ``allocation`` and must be the task the file was computed on (checked with the head size and the backbone's
    weights when the method is applied)."""
    dropout: float = 0.1
    """Input dropout of the structured modules (spec §1.4; official default 0.1)."""
    drop_path: float = 0.1
    """Per-module DropPath on the structured modules' output (spec §1.4; official default 0.1)."""
    train_cls_token: bool = True
    """The cls token is always tuned officially and counted in the allocation's total (spec §1.3, §1.6)."""
    train_norm_entries: bool = True
    """Train the LayerNorm entries the allocation picked one by one (ours); false: the official code's behaviour,
    which counts them in the budget but never trains them (``replace_linear`` touches only Linears, spec §1.5)."""

    structured_type: ClassVar[str] = "lora"
    run_files: ClassVar[dict[str, str]] = {"allocation": "spt_allocation.json"}
    """Options naming files, and the copy a run keeps of each (``eval``/``export`` of a copied run use the copy)."""

    def validate(self) -> None:
        check_range("method.dropout", self.dropout, low=0.0, high=1.0)
        check_range("method.drop_path", self.drop_path, low=0.0, high=1.0)
        if not self.allocation:
            raise ConfigError("method.allocation: required; write one with `peft-dist sensitivity --config F "
                              f"--out FILE{' --structured-type adapter' if self.structured_type == 'adapter' else ''}`")
        doc = read_allocation(self.allocation_path, key="method.allocation")
        if doc["structured_type"] != self.structured_type:
            raise AllocationError(
                f"method.allocation: {self.allocation_path} was computed for {doc['structured_type']!r} modules; "
                f"{'spt_' + self.structured_type} needs a {self.structured_type!r}-derived file (the thresholds and "
                "costs differ; spec §1.6)")
        select_budget(doc, self.budget)

    @property
    def allocation_path(self) -> str:
        """``allocation`` with ``{task}`` and ``{budget}`` filled in."""
        return expand_allocation_path(self.allocation, self.task, self.budget)


@dataclass
class SPTAdapterOptions(SPTOptions):
    structured_type: ClassVar[str] = "adapter"


# ============================================================================================ the method
def _locate(key: str) -> tuple[str, str, int]:
    """(module path, 'weight'|'bias', row-third index or -1) of an official candidate key."""
    m = _QKV_OP.match(key)
    if m:
        return f"{m.group(1)}.qkv", m.group(3), ("q", "k", "v").index(m.group(2))
    path, _, which = key.rpartition(".")
    return path, which, -1


class _SPT(Method):
    """Shared by ``spt_lora`` and ``spt_adapter``; the options class fixes the structured type."""

    def _document(self) -> tuple[dict[str, Any], dict[str, Any]]:
        doc = read_allocation(self.options.allocation_path, key="method.allocation")
        return doc, select_budget(doc, self.options.budget)

    def inject(self, model: nn.Module) -> None:
        o = self.options
        doc, entry = self._document()
        self._check_fits(model, doc)
        # the file must come from this task, head size and backbone (spec spt_arc_hta §1.1: one per task/budget)
        check_allocation_metadata(doc, o.allocation_path, {
            "task": o.task or None, "num_classes": getattr(model, "num_classes", None),
            "backbone_sha256": backbone_fingerprint(model)})
        structured_type, rank = doc["structured_type"], int(doc["rank"])
        plan: dict[str, dict[str, Any]] = {}

        def slot(path: str) -> dict[str, Any]:
            return plan.setdefault(path, {"weight": [], "bias": [], "structured": {}})

        for block, row in enumerate(entry["tuned_matrices"]):
            for i, op in enumerate(OPS):
                if row[i]:
                    path = f"blocks.{block}.{_OP_MODULE[op]}"
                    slot(path)["structured"][op] = self._rows(model.get_submodule(path), op)
        vectors = {key: None for key in entry["tuned_vectors"]}
        for key, positions in [*entry["unstructured"].items(), *vectors.items()]:
            path, which, third = _locate(key)
            module = model.get_submodule(path)
            if positions is not None and isinstance(module, nn.LayerNorm) and not o.train_norm_entries:
                continue  # counted in the budget, not trained (official)
            ref = getattr(module, which)
            if third < 0:
                offset, length = 0, ref.shape[0]
            else:
                length = ref.shape[0] // 3
                offset = third * length
            if which == "weight" and ref.ndim == 2:
                offset *= ref.shape[1]
                length *= ref.shape[1]
            local = range(length) if positions is None else positions
            slot(path)[which].extend(offset + int(p) for p in local)

        for path, spec in plan.items():
            module = model.get_submodule(path)
            if isinstance(module, nn.Linear):
                op_rows = spec["structured"]
                kwargs = dict(rank=rank, weight_positions=spec["weight"], bias_positions=spec["bias"],
                              dropout=o.dropout, drop_path=o.drop_path, input_dropout=not path.endswith("attn.proj"))
                if structured_type == "lora":
                    new = SPTLinear(module, lora=op_rows, **kwargs)
                else:
                    new = SPTLinear(module, adapters=op_rows, parallel_adapter=path.endswith("attn.proj"), **kwargs)
            elif isinstance(module, nn.LayerNorm):
                new = SPTLayerNorm(module, spec["weight"], spec["bias"])
            else:
                raise AllocationError(f"method.allocation: {o.allocation_path} tunes {path} ({type(module).__name__}); "
                                      "SPT supports Linear and LayerNorm tensors of plain timm ViTs")
            replace_module(model, path, new)

    @staticmethod
    def _rows(linear: nn.Linear, op: str) -> slice:
        if op in ("q", "k", "v"):
            third = linear.out_features // 3
            j = ("q", "k", "v").index(op)
            return slice(j * third, (j + 1) * third)
        return slice(0, linear.out_features)

    def _check_fits(self, model: nn.Module, doc: dict[str, Any]) -> None:
        mine = {c.key: list(c.shape) for c in model_candidates(model)}
        theirs = {k: list(s) for k, s in doc["tensors"]}
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                raise AllocationError(
                    f"method.allocation: {self.options.allocation_path} does not fit this model: {key} is "
                    f"{theirs.get(key, 'absent')} in the file and {mine.get(key, 'absent')} in the model "
                    "(was it computed for another backbone?)")

    def trainable_set(self, model: nn.Module) -> Iterator[nn.Parameter]:
        yield from adapter_parameters(model)
        yield from head_parameters(model)
        cls_token = getattr(model, "cls_token", None)
        if self.options.train_cls_token and isinstance(cls_token, nn.Parameter):
            yield cls_token

    def full_precision_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return delta_values(model)

    def summary(self, model: nn.Module) -> dict[str, Any]:
        doc, entry = self._document()
        modules = [m for m in model.modules() if isinstance(m, SPTLinear)]
        norm_entries = sum(len(v) for k, v in entry["unstructured"].items() if "norm" in k)
        out = {
            "allocation_file": self.options.allocation_path,
            "structured_type": doc["structured_type"],
            "budget_m": entry["budget_m"], "tau": entry["tau"], "allocation_total": entry["total"],
            "structured_total": entry["structured_total"], "vector_total": entry["vector_total"],
            "unstructured_total": entry["unstructured_total"], "per_op": dict(zip(OPS, entry["per_op"])),
            "structured_modules": sum(entry["per_op"]),
            "unstructured_norm_entries_trained": norm_entries if self.options.train_norm_entries else 0,
            "unstructured_norm_entries_counted_not_trained": 0 if self.options.train_norm_entries else norm_entries,
        }
        if doc["structured_type"] == "adapter":
            out["adapter_inference_flops_per_token"] = sum(m.adapter_flops_per_token() for m in modules)
        return out

    def write_artifacts(self, model: nn.Module, out_dir: Path) -> list[Path]:
        """Keep the allocation beside the run (spec §5.1 item 5: every re-run must use the identical allocation)."""
        doc, _ = self._document()
        path = Path(out_dir) / "spt_allocation.json"
        text = allocation_json(doc)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        return [path]


@register_method("spt_lora", SPTOptions)
class SPTLoRA(_SPT):
    """SPT-LoRA: parallel rank-r branches at structured positions + sparse deltas; merges exactly."""


@register_method("spt_adapter", SPTAdapterOptions)
class SPTAdapter(_SPT):
    """SPT-Adapter: sequential bottlenecks at structured positions + sparse deltas; cannot merge."""

