"""SNELL (NeurIPS'24): kernelized LoRA deltas sparsified by magnitude competition (spec snell_snella.md).

Placement (§1.1, §1.3). One delta per q, k, v, proj, fc1 and fc2 of every block. timm fuses q/k/v into ``attn.qkv``,
so that Linear carries three **independent** kernels (own A, B, s and threshold) over its row thirds [q; k; v];
proj, fc1 and fc2 carry one each. Trainable: the factors, the head and ``cls_token`` (§1.1 "Freezing").

Kernel and sparsity (§2.1, §3.1): see :mod:`peft_dist.methods.functional.kernelized`. A and B are both
kaiming-uniform (a = √5, fan-in n·q), so ΔW ≠ 0 at step 0 (§2.3).

Modes:

* ``faithful`` (default): the official parallel branch, ``y = x·W0ᵀ + b + DropPath(Dropout(x)·ΔWᵀ)`` with the
  adapter Dropout(0.1) on the input (one sample shared by q/k/v, separate draws for fc1 and fc2, none for proj) and
  an independent per-sample DropPath(0.1) per matrix (§1.1, §1.3, §7.1.4);
* ``merged``: one GEMM on ``W0 + ΔW`` through the fused Function (§7.3 A); exact only without the adapter Dropout
  and DropPath, so those must be 0 (they default to 0 in this mode). Under bf16 compute W0 + ΔW is never rounded
  to bf16 as one matrix (that would drop ΔW entries below half an ulp of W0): ``merged_gemm`` picks two bf16 GEMMs
  or one fp32 GEMM.

``implementation: reference`` swaps the fused Function for the official-style path (autograd through ``cdist`` and
``torch.quantile``, a second GEMM, per-adapter non-reentrant checkpointing; §3.3) for parity runs and benchmarks.

Export (§7.3 E): :meth:`SnellLinear.merged` folds the sparse delta into W0 exactly; :func:`export_sparse_delta`
writes it as values + flat indices for multi-task storage and :func:`apply_sparse_delta` folds such an export into a
plain timm model (``scale=-1`` removes it again).
"""
from __future__ import annotations

import csv
import math
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from peft_dist.config import ConfigError, check_range
from peft_dist.methods.base import (AdaptedModule, Method, adapter_parameters, add_to_rows, frozen_linear,
                                    head_parameters)
from peft_dist.methods.functional.kernelized import (
    KernelConfig,
    SliceSpec,
    kernelized_delta_weight,
    kernelized_linear,
    reference_delta_weight,
    threshold_rank,
)
from peft_dist.methods.lora import merged_linear
from peft_dist.methods.registry import register_method
from peft_dist.methods.sparsity_option import MATRIX_KEY, check_sparsity_option, lookup_sparsity
from peft_dist.models.targets import TARGET_NAMES, check_targets, find_targets, group_by_path, replace_module

DROPOUT_TARGETS = ("q", "k", "v", "fc1", "fc2")
"""Matrices whose adapter input goes through the adapter Dropout; proj reads the attention output as is (§1.1)."""
FAITHFUL_DROPOUT = 0.1
FAITHFUL_DROP_PATH = 0.1


# ============================================================================================== options
@dataclass
class KernelAdapterOptions:
    """Options shared by ``snell`` and ``snella`` (the YAML ``method:`` keys)."""

    rank: int = 8
    """r of SNELL-r: A and B hold H = 2 pieces of r/2 columns each, so r must be even (§2.1)."""
    threshold: Literal["code", "paper"] = "code"
    """``code``: detached-magnitude product |K|·1[|K| > τ] (the official code); ``paper``: Eq. 5's
    max(|K| − τ, 0) (§3.1)."""
    mode: Literal["faithful", "merged"] = "faithful"
    """``faithful``: parallel branch with the adapter Dropout/DropPath; ``merged``: one GEMM on W0 + ΔW (§7.3 A)."""
    adapter_dropout: float | None = None
    """Dropout on the adapter input; default 0.1 in faithful mode (§1.1), 0 in merged mode (must stay 0 there)."""
    adapter_drop_path: float | None = None
    """Per-sample DropPath on each adapter output; default 0.1 in faithful mode, 0 in merged mode."""
    targets: list[str] = field(default_factory=lambda: list(TARGET_NAMES))
    """Matrices to adapt; the method adapts all six (§1.1); subsets exist for ablations."""
    implementation: Literal["fused", "reference"] = "fused"
    """``fused``: the custom Function (§7.3 A); ``reference``: the official-style autograd path (§3.3)."""
    chunk_entries: int = 1 << 20
    """Entries per transient row-block buffer of the fused kernel (bounds the extra memory, §7.3 A)."""
    merged_gemm: Literal["auto", "split", "fp32"] = "auto"
    """``merged`` mode under bf16 compute: ``split`` (one bf16 GEMM on [x, x] and [W0, ΔW], both products summed
    before the output is rounded) or ``fp32`` (one fp32 GEMM on W0 + ΔW); ``auto``: split on CUDA, fp32 on CPU.
    Either keeps ΔW to its own precision instead of rounding it against W0 (``kernelized.merged_gemm_for``)."""

    def validate_common(self) -> None:
        check_range("method.rank", self.rank, low=2)
        if self.rank % 2:
            raise ConfigError(f"method.rank: got {self.rank}; allowed: an even number >= 2 (two kernel pieces of "
                              f"rank/2 columns each, spec §2.1)")
        check_range("method.chunk_entries", self.chunk_entries, low=1)
        check_targets(self.targets)
        for key in ("adapter_dropout", "adapter_drop_path"):
            value = getattr(self, key)
            if value is None:
                continue
            check_range(f"method.{key}", value, low=0.0)
            if value >= 1.0:
                raise ConfigError(f"method.{key}: got {value!r}; allowed: >= 0.0 and < 1.0")
            if self.mode == "merged" and value > 0:
                raise ConfigError(f"method.{key}: got {value!r}; allowed: 0 or unset with method.mode=merged (the "
                                  f"merged GEMM applies W0 + ΔW to the un-dropped input, spec §7.3 A); use "
                                  f"method.mode=faithful for the adapter regularisers")
        if self.implementation == "reference" and self.mode == "merged":
            raise ConfigError("method.implementation: 'reference' is the official parallel-branch path; allowed "
                              "with method.mode=faithful only")

    def regularisers(self) -> tuple[float, float]:
        """(adapter dropout, adapter drop-path) after the mode's defaults."""
        faithful = self.mode == "faithful"
        dropout = self.adapter_dropout if self.adapter_dropout is not None else (FAITHFUL_DROPOUT if faithful else 0.0)
        drop_path = self.adapter_drop_path if self.adapter_drop_path is not None else \
            (FAITHFUL_DROP_PATH if faithful else 0.0)
        return dropout, drop_path


@dataclass
class SnellOptions(KernelAdapterOptions):
    sparsity: float | dict[str, float] = 0.9
    """Zeroed fraction s per matrix (§3.1): one value, or a map with keys ``default``, a matrix kind (``q``, ``fc1``,
    ...) or one matrix (``blocks.3.fc1``); the most specific key wins. s = 0 selects the plain kernel."""
    kernel: Literal["piecewise", "linear"] = "piecewise"
    """``piecewise``: the ±0.1 distance kernel (§2.1); ``linear``: the plain LoRA merge of the same factors."""

    def validate(self) -> None:
        self.validate_common()
        check_sparsity_option(self.sparsity)

    def sparsity_for(self, block: int, kind: str) -> float:
        s = lookup_sparsity(self.sparsity, block, kind)
        return 0.0 if s is None else s  # a map without ``default`` leaves the other matrices dense (s = 0)


# ============================================================================================== modules
class KernelFactors(nn.Module):
    """One kernelized matrix: A (2, d_in, r/2), B (2, d_out, r/2) (+ MixK's α, γ, β) and its sparsity s, a 0-dim
    float64 buffer so that the allocator can change it without touching the graph (§7.1.3)."""

    def __init__(self, in_features: int, out_features: int, rank: int, kind: str, sparsity: float,
                 matrix_name: str, device=None, dtype=None):
        super().__init__()
        pieces, width = 2, rank // 2
        factory = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(pieces, in_features, width, **factory))
        self.B = nn.Parameter(torch.empty(pieces, out_features, width, **factory))
        # kaiming-uniform on the 3-D tensors: fan-in n·q, bound 1/sqrt(n·q); B is not zeroed (§2.3)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        self.kind = kind
        if kind == "mixk":  # scalars initialised to 1, 1, 0 (§2.2); shape (1,): FSDP2 cannot shard 0-dim parameters
            self.alpha = nn.Parameter(torch.ones(1, **factory))
            self.gamma = nn.Parameter(torch.ones(1, **factory))
            self.beta = nn.Parameter(torch.zeros(1, **factory))
        self.register_buffer("sparsity", torch.tensor(float(sparsity), dtype=torch.float64, device=device))
        self._value = float(sparsity)  # survives to_empty(); the buffer is what state_dict() carries
        self.matrix_name = matrix_name
        self.in_features, self.out_features = in_features, out_features
        self._cached: tuple[int, int, float] | None = None

    def tensors(self) -> list[torch.Tensor]:
        if self.kind == "mixk":
            return [self.A, self.B, self.alpha, self.gamma, self.beta]
        return [self.A, self.B]

    def forward(self) -> list[torch.Tensor]:
        """The factors, read through a call so that module hooks see the read: FSDP2 gathers them here when they
        form their own fp32 group (``engines.fsdp2.shard_full_precision_owners``)."""
        return self.tensors()

    def sparsity_value(self) -> float:
        """s as a Python float, read from the buffer only when the buffer changed (no device sync per forward)."""
        key = (id(self.sparsity), self.sparsity._version)
        if self._cached is None or self._cached[:2] != key:
            self._cached = (*key, float(self.sparsity))
        return self._cached[2]

    @torch.no_grad()
    def set_sparsity(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{self.matrix_name}: sparsity must lie in [0, 1], got {value}")
        self.sparsity.fill_(float(value))
        self._value = float(value)

    def _apply(self, fn, recurse=True):
        # s must stay exact in float64 (its keep count is ⌊(1−s)N⌋): a model-wide .to(bf16)/.half() moves it but
        # keeps the dtype, and to_empty() (meta → device) keeps the value instead of leaving it uninitialised
        if self.sparsity.device.type != "meta":
            self._value = float(self.sparsity)
        result = super()._apply(fn, recurse)
        self.sparsity = torch.tensor(self._value, dtype=torch.float64, device=self.sparsity.device)
        return result

    def extra_repr(self) -> str:
        shape = getattr(self.A, "ds_shape", self.A.shape)  # a ZeRO-3 partition's own shape is its flat slice
        return (f"{self.matrix_name}: d_in={self.in_features}, d_out={self.out_features}, "
                f"rank={shape[0] * shape[2]}, kernel={self.kind}")


class SnellLinear(AdaptedModule):
    """A frozen Linear plus one kernelized sparse delta per row slice (three for the fused qkv)."""

    def __init__(self, base: nn.Linear, slices: dict[str, slice], kernels: dict[str, KernelFactors],
                 cfg: KernelConfig, mode: str = "faithful", dropout: float = 0.0, drop_path: float = 0.0,
                 implementation: str = "fused"):
        super().__init__()
        self.base = base
        self.rows = {name: (rows.start, rows.stop) for name, rows in slices.items()}
        self.kernels = nn.ModuleDict(kernels)
        self.cfg = cfg
        self.mode = mode
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.drop_path = drop_path
        self.implementation = implementation

    # ------------------------------------------------------------------ pieces
    def slice_specs(self) -> tuple[SliceSpec, ...]:
        return tuple(SliceSpec(*self.rows[name], k.sparsity_value()) for name, k in self.kernels.items())

    def factor_tensors(self) -> list[torch.Tensor]:
        return [t for k in self.kernels.values() for t in k()]

    def delta_weight(self) -> torch.Tensor:
        """ΔW (d_out × d_in, fp32), exactly what the forward adds to W0."""
        return kernelized_delta_weight(self.slice_specs(), self.factor_tensors(), self.cfg, self.base.out_features,
                                       self.base.in_features)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.implementation == "reference":
            return self._reference_forward(x)
        if self.mode == "merged":
            return kernelized_linear(x, self.base.weight, self.base.bias, self.slice_specs(), self.factor_tensors(),
                                     self.cfg)
        y, dtype = frozen_linear(self.base, x)
        delta = kernelized_linear(self.dropout(x), None, None, self.slice_specs(), self.factor_tensors(), self.cfg,
                                  out_features=self.base.out_features)
        if self.training and self.drop_path > 0:
            delta = delta * self._drop_path_scale(delta)
        return (y + delta).to(dtype)

    def _drop_path_scale(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-sample keep/(1−p) factors, drawn independently for every matrix (three masks for q/k/v, §1.3)."""
        keep = 1.0 - self.drop_path
        batch, width = delta.shape[0], delta.shape[-1]
        scale = delta.new_ones((batch, width))
        for start, stop in self.rows.values():
            scale[:, start:stop] = delta.new_empty((batch, 1)).bernoulli_(keep).div_(keep)
        return scale.view(batch, *([1] * (delta.ndim - 2)), width)

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        xd = self.dropout(x)
        deltas = []
        for (name, kernel), spec in zip(self.kernels.items(), self.slice_specs()):
            delta = checkpoint(_official_delta, xd, spec.sparsity, self.cfg, *kernel(), use_reentrant=False)
            if self.training and self.drop_path > 0:
                keep = 1.0 - self.drop_path
                mask = delta.new_empty((delta.shape[0],) + (1,) * (delta.ndim - 1)).bernoulli_(keep).div_(keep)
                delta = delta * mask
            deltas.append((slice(*self.rows[name]), delta))
        return add_to_rows(self.base(x), deltas)

    def merged(self) -> nn.Linear:
        return merged_linear(self.base, self.delta_weight())

    def extra_repr(self) -> str:
        return f"mode={self.mode}, implementation={self.implementation}, drop_path={self.drop_path}"


def _official_delta(x, sparsity, cfg, *tensors):
    """X·𝒦ˢ as the official adapter computes it (cdist, quantile, second GEMM); run under checkpointing."""
    dW = reference_delta_weight(tensors[0], tensors[1], sparsity, cfg.kind, cfg.threshold, cfg.plain_at_zero,
                                *tensors[2:])
    return x @ dW.t().to(x.dtype)


# ============================================================================================== the method
@dataclass
class MatrixRef:
    """One adapted matrix as the method sees it: its name (``blocks.<i>.<kind>``), the module and the rows."""

    name: str
    block: int
    kind: str
    factors: KernelFactors
    linear: SnellLinear
    path: str

    @property
    def entries(self) -> int:
        return self.factors.in_features * self.factors.out_features


class KernelAdapterMethod(Method, ABC):
    """What SNELL and SNELLA share: injection, trainable set, summaries, artifacts and sparse-delta export."""

    kernel_kind = "piecewise"
    plain_at_zero = True
    artifact_prefix = "snell"

    def kernel_config(self) -> KernelConfig:
        return KernelConfig(kind=self.kernel_kind, threshold=self.options.threshold,
                            plain_at_zero=self.plain_at_zero, chunk_entries=self.options.chunk_entries,
                            merged_gemm=self.options.merged_gemm)

    @abstractmethod
    def initial_sparsity(self, block: int, kind: str) -> float:
        """s of matrix ``blocks.{block}.{kind}`` at injection: SNELL's configured value, SNELLA's s_init."""

    def inject(self, model: nn.Module) -> None:
        o = self.options
        cfg = self.kernel_config()
        dropout, drop_path = o.regularisers()
        targets = find_targets(model, tuple(o.targets))
        self._check_matrix_keys(len({t.block for t in targets}))
        for path, group in group_by_path(targets).items():
            base = model.get_submodule(path)
            weight = base.weight
            dtype = torch.promote_types(weight.dtype, torch.float32)  # adapters stay fp32 on bf16 backbones (§7.2)
            kernels = {t.name: KernelFactors(weight.shape[1], t.rows.stop - t.rows.start, o.rank, self.kernel_kind,
                                             self.initial_sparsity(t.block, t.name), f"blocks.{t.block}.{t.name}",
                                             device=weight.device, dtype=dtype)
                       for t in group}
            p = dropout if any(t.name in DROPOUT_TARGETS for t in group) else 0.0
            replace_module(model, path, SnellLinear(base, {t.name: t.rows for t in group}, kernels, cfg, o.mode, p,
                                                    drop_path, o.implementation))
        self._model_ref = weakref.ref(model)

    def _check_matrix_keys(self, blocks: int) -> None:
        pass

    def trainable_set(self, model: nn.Module) -> Iterator[nn.Parameter]:
        """Factors (+ α, γ, β), head and cls_token; LayerNorms, biases, pos/patch embeddings stay frozen (§1.1)."""
        yield from adapter_parameters(model)
        yield from head_parameters(model)
        cls_token = getattr(model, "cls_token", None)
        if isinstance(cls_token, nn.Parameter):
            yield cls_token

    def full_precision_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The kernel factors (and MixK's α, γ, β): the kernel is built in fp32 (spec §7.2), so under FSDP2's bf16
        policy they are gathered in fp32 rather than rounded to bf16 first."""
        return [t for ref in self.matrices(model) for t in ref.factors.tensors()]

    # ------------------------------------------------------------------ matrices
    def matrices(self, model: nn.Module | None = None) -> list[MatrixRef]:
        """Every kernelized matrix of ``model`` (default: the model this method was applied to), in block order."""
        if model is None:
            model = self._model_ref() if getattr(self, "_model_ref", None) is not None else None
            if model is None:
                raise RuntimeError(f"method {self.name!r}: apply() it to a model first")
        out = []
        for path, module in model.named_modules():
            if isinstance(module, SnellLinear):
                for kind, factors in module.kernels.items():
                    block = int(factors.matrix_name.split(".")[1])
                    out.append(MatrixRef(factors.matrix_name, block, kind, factors, module, path))
        return out

    @torch.no_grad()
    def realised_sparsity(self, model: nn.Module) -> dict[str, float]:
        """Zeroed fraction of every ΔW as the forward builds it now (one transient kernel build per Linear)."""
        out = {}
        done: set[int] = set()
        for ref in self.matrices(model):
            if id(ref.linear) in done:
                continue
            done.add(id(ref.linear))
            dW = ref.linear.delta_weight()
            for kind, (start, stop) in ref.linear.rows.items():
                block = dW[start:stop]
                out[ref.linear.kernels[kind].matrix_name] = 1.0 - int(torch.count_nonzero(block)) / block.numel()
        return out

    def kept_count(self, ref: MatrixRef) -> int:
        """Survivors implied by s and the threshold rule (exact for distinct magnitudes; SNELL's s = 0 keeps all)."""
        n = ref.entries
        rank = threshold_rank(n, ref.factors.sparsity_value(), self.kernel_config().threshold, self.plain_at_zero)
        return n if rank is None else n - rank

    def summary(self, model: nn.Module) -> dict[str, Any]:
        realised = self.realised_sparsity(model)
        refs = self.matrices(model)
        total = sum(r.entries for r in refs)
        zeros = sum(realised[r.name] * r.entries for r in refs)
        return {
            "kernel": self.kernel_kind,
            "threshold": self.kernel_config().threshold,
            "mode": self.options.mode,
            "mean_sparsity": zeros / max(total, 1),
            "matrices": {r.name: {"sparsity": realised[r.name], "target_sparsity": r.factors.sparsity_value(),
                                  "entries": r.entries, "d_out": r.factors.out_features,
                                  "d_in": r.factors.in_features} for r in refs},
        }

    # ------------------------------------------------------------------ artifacts
    def allocation_rows(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"matrix": r.name, "block": r.block, "kind": r.kind, "d_out": r.factors.out_features,
                 "d_in": r.factors.in_features, "entries": r.entries, "sparsity": r.factors.sparsity_value(),
                 "kept": self.kept_count(r)} for r in self.matrices(model)]

    def write_artifacts(self, model: nn.Module, out_dir: Path) -> list[Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = self.allocation_rows(model)
        table = out_dir / f"{self.artifact_prefix}_sparsity.csv"
        write_csv(table, rows)
        image = out_dir / f"{self.artifact_prefix}_sparsity.png"
        plot_heatmaps(rows, image, [("sparsity", "sparsity s_m")], title=f"{self.name}: sparsity per matrix")
        return [table, image]

    # ------------------------------------------------------------------ export
    def sparsity_buffers(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The per-matrix s buffers keyed as in ``model.state_dict()``: an adapter file needs them to rebuild the
        allocated model (SNELLA), since they are buffers, not trainable parameters."""
        return {name: b.detach().clone() for name, b in model.named_buffers() if name.endswith(".sparsity")
                and isinstance(model.get_submodule(name.rsplit(".", 1)[0]), KernelFactors)}


@register_method("snell", SnellOptions)
class Snell(KernelAdapterMethod):
    """SNELL-r: fixed per-matrix sparsity (§3), piecewise (or linear) kernel."""

    artifact_prefix = "snell"

    def __init__(self, options: SnellOptions):
        super().__init__(options)
        self.kernel_kind = options.kernel

    def initial_sparsity(self, block: int, kind: str) -> float:
        return self.options.sparsity_for(block, kind)

    def _check_matrix_keys(self, blocks: int) -> None:
        if not isinstance(self.options.sparsity, dict):
            return
        for key in self.options.sparsity:
            m = MATRIX_KEY.match(key)
            if m and int(m.group(1)) >= blocks:
                raise ConfigError(f"method.sparsity.{key}: block {m.group(1)} does not exist; the model has blocks "
                                  f"0..{blocks - 1}")
            if m and m.group(2) not in self.options.targets:
                raise ConfigError(f"method.sparsity.{key}: {m.group(2)} is not adapted; method.targets is "
                                  f"{self.options.targets}")


# ============================================================================================== sparse-delta export
@torch.no_grad()
def export_sparse_delta(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapted Linear's ΔW as ``{path}.weight.delta_indices`` (flat positions into the Linear's weight,
    int32 when they fit), ``{path}.weight.delta_values`` (fp32) and ``{path}.weight.delta_shape``: the multi-task
    storage format of §7.3 E (density 1 − s instead of a dense copy). safetensors-compatible."""
    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if not isinstance(module, SnellLinear):
            continue
        flat = module.delta_weight().reshape(-1)
        index = torch.nonzero(flat).reshape(-1)
        index_dtype = torch.int32 if flat.numel() < 2 ** 31 else torch.int64
        out[f"{path}.weight.delta_indices"] = index.to(index_dtype).cpu()
        out[f"{path}.weight.delta_values"] = flat[index].float().cpu()
        out[f"{path}.weight.delta_shape"] = torch.tensor(list(module.base.weight.shape), dtype=torch.int64)
    if not out:
        raise ValueError("export_sparse_delta: the model has no SNELL/SNELLA layers")
    return out


@torch.no_grad()
def apply_sparse_delta(model: nn.Module, tensors: dict[str, torch.Tensor], scale: float = 1.0) -> nn.Module:
    """Fold an :func:`export_sparse_delta` result into a plain timm model in place: ``W ← W + scale·ΔW`` in fp32
    (``scale=-1`` takes a task's delta out again). Raises ``KeyError``/``ValueError`` naming the bad entry."""
    paths = sorted({k[:-len(".weight.delta_values")] for k in tensors if k.endswith(".weight.delta_values")})
    if not paths:
        raise ValueError("apply_sparse_delta: no '<path>.weight.delta_values' entries in the given tensors")
    for path in paths:
        for suffix in ("delta_indices", "delta_shape"):
            if f"{path}.weight.{suffix}" not in tensors:
                raise KeyError(f"apply_sparse_delta: {path}.weight.{suffix} is missing")
        try:
            linear = model.get_submodule(path)
        except AttributeError:
            raise KeyError(f"apply_sparse_delta: the model has no module {path!r}") from None
        weight = getattr(linear, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"apply_sparse_delta: {path} has no weight (got {type(linear).__name__})")
        shape = tuple(int(v) for v in tensors[f"{path}.weight.delta_shape"])
        if tuple(weight.shape) != shape:
            raise ValueError(f"apply_sparse_delta: {path}.weight has shape {tuple(weight.shape)}, the delta was "
                             f"exported for {shape}")
        index = tensors[f"{path}.weight.delta_indices"].to(weight.device, torch.int64)
        values = tensors[f"{path}.weight.delta_values"].to(weight.device, torch.float32)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= weight.numel()):
            raise ValueError(f"apply_sparse_delta: {path}.weight.delta_indices out of range for {shape}")
        merged = weight.float().reshape(-1)
        merged.index_add_(0, index, values, alpha=scale)
        weight.copy_(merged.view(shape).to(weight.dtype))
    return model


# ============================================================================================== tables and plots
def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["matrix"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def plot_heatmaps(rows: list[dict[str, Any]], path: Path, panels: list[tuple[str, str]], title: str) -> None:
    """Layer × matrix heat maps (one panel per (column, label)), Agg canvas only: no pyplot global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    blocks = sorted({r["block"] for r in rows})
    kinds = [k for k in TARGET_NAMES if any(r["kind"] == k for r in rows)]
    fig = Figure(figsize=(3.2 * len(panels) + 0.6, 0.32 * len(blocks) + 1.6))
    FigureCanvasAgg(fig)
    for i, (column, label) in enumerate(panels):
        grid = torch.full((len(blocks), len(kinds)), float("nan"), dtype=torch.float64)
        for r in rows:
            grid[blocks.index(r["block"]), kinds.index(r["kind"])] = float(r[column])
        ax = fig.add_subplot(1, len(panels), i + 1)
        image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
        ax.set_xlabel("matrix")
        ax.set_ylabel("block")
        ax.set_title(label, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.05)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
