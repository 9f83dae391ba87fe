"""SNELLA (arXiv'25): SNELL with the MixK kernel and a bi-level sparsity allocator (spec snell_snella.md §2.2, §4).

* **Kernel.** ``K' = K + α·softmax_j(K/γ) + β`` per matrix, α, γ, β learnable scalars initialised to 1, 1, 0 (§2.2);
  the magnitude-scaled sparsification of §3.1 applies even at s = 0 (SNELLA has no plain-kernel switch).
* **Statistics, every optimizer step** (§4.2, hook ``on_step_end``: after ``optimizer.step()``, before
  ``zero_grad``): ``I = |θ·∇θ|`` elementwise over A and B (NaN → 0), sensitivity ``Ī ← β1·Ī + (1−β1)·I`` and
  uncertainty ``Ū ← β2·Ū + (1−β2)·|I − Ī|`` with the updated Ī. α, γ, β are not scored. Under DDP the gradients are
  already all-reduced, so every rank holds the same statistics.
* **Budget, once per epoch** (§4.3, hook ``on_epoch_start``, before the epoch's first forward): the kept-entry
  budget decays cubically from ``Σ(1 − s_init)·N_m`` to ``Σ(1 − ρ)·N_m``.
* **Inter-layer competition** (§4.4): score ``S_m = mean(Ī_A·Ū_A) + mean(Ī_B·Ū_B)``; the budget is split in
  proportion to the scores, capped at N_m per matrix (water-filling: capped matrices' excess goes to the others in
  proportion), and rounded to integers by largest remainder so the counts sum to the budget exactly (§7.3 F, which
  replaces the official float while-loop). ``s_m = 1 − v_m/N_m``. All-zero scores fall back to uniform (§7.4).
* **Intra-layer competition** (§4.5): the threshold of §3.1 at s_m picks the survivors inside each matrix.

The allocation is a deterministic function of the statistics; when a process group is up, rank 0's vector is
also broadcast (§7.3 F), so ranks can never disagree on which entries train. ``dense: true`` is SNELLA's
``tuning_model=mixk``: dense MixK, no sparsification, no allocator (§2.2, the Cars/Caltech101/SVHN scripts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from peft_dist.config import ConfigError, check_range
from peft_dist.methods.base import TrainPlan
from peft_dist.methods.registry import register_method
from peft_dist.methods.snell import KernelAdapterMethod, KernelAdapterOptions, plot_heatmaps, write_csv


@dataclass
class SnellaOptions(KernelAdapterOptions):
    rank: int = 32
    kernel: Literal["mixk", "piecewise"] = "mixk"
    """``mixk`` (SNELLA, §2.2) or ``piecewise`` (SNELL's kernel under the allocator, an ablation)."""
    init_sparsity: float = 0.0
    """s_init: every matrix's sparsity until the first allocation (0.01 in the VTAB scripts, 0 in FGVC; §4.1)."""
    target_ratio: float = 0.5
    """ρ: the size-weighted mean zeroed fraction the budget reaches at the end of the schedule (§4.1)."""
    init_warmup: int = 0
    """t_i, epochs at the initial budget without reallocation (§4.3; every script passes 0)."""
    final_warmup: int = 0
    """t_f, final epochs at the target budget, reallocating every epoch (§4.3; every script passes 0)."""
    mask_interval: int = 1
    """Reallocate every this many epochs during the cubic decay (§4.3; every script passes 1)."""
    beta1: float = 0.85
    """EMA factor of the sensitivity Ī (§4.2)."""
    beta2: float = 0.85
    """EMA factor of the uncertainty Ū (§4.2)."""
    dense: bool = False
    """True: dense MixK without sparsification or allocator (``tuning_model=mixk``, §2.2)."""

    def validate(self) -> None:
        self.validate_common()
        check_range("method.init_sparsity", self.init_sparsity, low=0.0, high=1.0)
        check_range("method.target_ratio", self.target_ratio, low=0.0, high=1.0)
        check_range("method.init_warmup", self.init_warmup, low=0)
        check_range("method.final_warmup", self.final_warmup, low=0)
        check_range("method.mask_interval", self.mask_interval, low=1)
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            check_range(f"method.{key}", value, low=0.0)
            if value >= 1.0:
                raise ConfigError(f"method.{key}: got {value!r}; allowed: >= 0.0 and < 1.0")
        if self.dense and self.kernel != "mixk":
            raise ConfigError(f"method.dense: true is dense MixK; allowed only with method.kernel=mixk "
                              f"(got {self.kernel!r})")


# ============================================================================================== allocator pieces
def budget_schedule(epoch: int, total_epochs: int, budget_init: float, budget_target: float, init_warmup: int = 0,
                    final_warmup: int = 0, mask_interval: int = 1) -> tuple[int, bool]:
    """(kept-entry budget V, reallocate?) at the start of ``epoch`` (§4.3, ``schedule_threshold``)."""
    if epoch <= init_warmup:
        return math.floor(budget_init), False
    if epoch > total_epochs - final_warmup:
        return math.floor(budget_target), True
    span = total_epochs - final_warmup - init_warmup
    if span <= 0:
        return math.floor(budget_target), True
    remaining = 1.0 - (epoch - init_warmup) / span
    budget = math.floor(budget_target + (budget_init - budget_target) * remaining ** 3)
    return budget, epoch % mask_interval == 0


def proportional_allocation(budget: int, scores: list[float], caps: list[int]) -> list[int]:
    """Integer counts v_m ≤ caps_m with Σv = min(budget, Σcaps), proportional to ``scores`` among the uncapped
    matrices (water-filling), rounded by largest remainder (ties: lower index first). Non-finite or negative scores
    count as 0; if no score is positive, the split is uniform (the official code's intent, §7.4)."""
    m = len(caps)
    if len(scores) != m:
        raise ValueError(f"{len(scores)} scores for {m} matrices")
    total = sum(caps)
    budget = max(0, min(int(budget), total))
    if budget == total:
        return list(caps)
    weights = [s if math.isfinite(s) and s > 0 else 0.0 for s in scores]
    if not any(w > 0 for w in weights):
        weights = [1.0] * m
    capped = [False] * m
    ideal = [0.0] * m
    while True:
        free = [i for i in range(m) if not capped[i]]
        remaining = budget - sum(caps[i] for i in range(m) if capped[i])
        weight_sum = sum(weights[i] for i in free)
        if weight_sum <= 0:  # only zero-score matrices left: fill them by size
            weight_sum = float(sum(caps[i] for i in free))
            share = {i: caps[i] for i in free}
        else:
            share = {i: weights[i] for i in free}
        newly = [i for i in free if remaining * share[i] / weight_sum >= caps[i]]
        for i in free:
            ideal[i] = remaining * share[i] / weight_sum
        if not newly:
            break
        for i in newly:
            capped[i] = True
    counts = [caps[i] if capped[i] else min(caps[i], math.floor(ideal[i])) for i in range(m)]
    leftover = budget - sum(counts)
    order = sorted((i for i in range(m) if not capped[i]), key=lambda i: (-(ideal[i] - math.floor(ideal[i])), i))
    while leftover > 0:  # at most one round in exact arithmetic; the loop guards float round-off
        progressed = False
        for i in order:
            if leftover == 0:
                break
            if counts[i] < caps[i]:
                counts[i] += 1
                leftover -= 1
                progressed = True
        if not progressed:
            break
    for i in reversed(order):  # float round-off the other way: take back from the smallest remainders
        if leftover >= 0:
            break
        if counts[i] > 0:
            counts[i] -= 1
            leftover += 1
    return counts


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (sharded adapters), the tensor itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(t, src=0)
    return t


# ============================================================================================== the method
@register_method("snella", SnellaOptions)
class Snella(KernelAdapterMethod):
    """SNELLA: MixK kernel + epoch-wise bi-level sparsity allocation (hooks: on_train_start, on_epoch_start,
    on_step_end; state_dict for resume; summary/write_artifacts for the allocation table and heat map)."""

    plain_at_zero = False
    artifact_prefix = "snella"

    def __init__(self, options: SnellaOptions):
        super().__init__(options)
        self.kernel_kind = options.kernel
        self.total_epochs: int | None = None
        self.steps = 0
        self.sensitivity: dict[str, torch.Tensor] = {}
        self.uncertainty: dict[str, torch.Tensor] = {}
        self.scores: dict[str, float] = {}
        self.budget: int | None = None
        self.history: list[dict[str, Any]] = []

    def kernel_config(self):
        cfg = super().kernel_config()
        if self.options.dense:
            return replace(cfg, threshold="none")
        return cfg

    def initial_sparsity(self, block: int, kind: str) -> float:
        return 0.0 if self.options.dense else self.options.init_sparsity

    # ------------------------------------------------------------------ budget
    def budgets(self, model: nn.Module | None = None) -> tuple[float, float]:
        """(V_init, V_target) in kept entries over all adapted matrices (§4.1)."""
        sizes = [r.entries for r in self.matrices(model)]
        o = self.options
        return sum((1 - o.init_sparsity) * n for n in sizes), sum((1 - o.target_ratio) * n for n in sizes)

    def schedule(self, epoch: int, model: nn.Module | None = None) -> tuple[int, bool]:
        if self.total_epochs is None:
            raise RuntimeError("snella: on_train_start(model, TrainPlan) must run before on_epoch_start: the budget "
                               "schedule needs the number of epochs")
        o = self.options
        v_init, v_target = self.budgets(model)
        return budget_schedule(epoch, self.total_epochs, v_init, v_target, o.init_warmup, o.final_warmup,
                               o.mask_interval)

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, model: nn.Module, plan: TrainPlan) -> None:
        self.total_epochs = int(plan.epochs)

    @torch.no_grad()
    def on_step_end(self, model: nn.Module, step: int) -> None:
        """EMA sensitivity/uncertainty of |θ·∇θ| over every A and B (§4.2); θ is already the post-step value."""
        if self.options.dense:
            return
        b1, b2 = self.options.beta1, self.options.beta2
        for ref in self.matrices(model):
            for which in ("A", "B"):
                param = getattr(ref.factors, which)
                grad = param.grad
                if grad is None:
                    continue
                key = f"{ref.name}.{which}"
                importance = (_full(param.detach()) * _full(grad)).abs_().nan_to_num_(nan=0.0)
                if key not in self.sensitivity:
                    self.sensitivity[key] = torch.zeros_like(importance)
                    self.uncertainty[key] = torch.zeros_like(importance)
                sens = self.sensitivity[key].mul_(b1).add_(importance, alpha=1 - b1)
                self.uncertainty[key].mul_(b2).add_((importance - sens).abs_(), alpha=1 - b2)
        self.steps += 1

    def matrix_scores(self, model: nn.Module | None = None) -> dict[str, float]:
        """S_m = mean(Ī_A·Ū_A) + mean(Ī_B·Ū_B) (size-free, §4.4); 0 for a matrix without statistics yet."""
        out = {}
        for ref in self.matrices(model):
            score = 0.0
            for which in ("A", "B"):
                key = f"{ref.name}.{which}"
                if key in self.sensitivity:
                    score += float((self.sensitivity[key].double() * self.uncertainty[key].double()).mean())
            out[ref.name] = score
        return out

    @torch.no_grad()
    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Write the epoch's allocation into every matrix before its first forward (§4.3, §4.4)."""
        if self.options.dense:
            return
        refs = self.matrices(model)
        budget, reallocate = self.schedule(epoch, model)
        self.scores = self.matrix_scores(model)
        if reallocate:
            caps = [r.entries for r in refs]
            counts = proportional_allocation(budget, [self.scores[r.name] for r in refs], caps)
            sparsity = torch.tensor([1.0 - v / n for v, n in zip(counts, caps)], dtype=torch.float64)
            sparsity = _broadcast_from_rank0(sparsity.to(refs[0].factors.sparsity.device)).clamp_(0.0, 1.0)
            for ref, s in zip(refs, sparsity.tolist()):
                ref.factors.set_sparsity(s)
        self.budget = budget
        self.history.append({"epoch": epoch, "budget": budget, "reallocated": reallocate,
                             "sparsity": [r.factors.sparsity_value() for r in refs],
                             "score": [self.scores[r.name] for r in refs]})

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        refs = self.matrices()
        state: dict[str, Any] = {
            "steps": self.steps,
            "total_epochs": -1 if self.total_epochs is None else self.total_epochs,
            "budget": -1 if self.budget is None else self.budget,
            "matrix_names": ",".join(r.name for r in refs),
            "sparsity": torch.tensor([r.factors.sparsity_value() for r in refs], dtype=torch.float64),
            "history_epoch": torch.tensor([h["epoch"] for h in self.history], dtype=torch.int64),
            "history_budget": torch.tensor([h["budget"] for h in self.history], dtype=torch.int64),
            "history_reallocated": torch.tensor([h["reallocated"] for h in self.history], dtype=torch.bool),
            "history_sparsity": torch.tensor([h["sparsity"] for h in self.history], dtype=torch.float64)
            .reshape(len(self.history), len(refs)),
            "history_score": torch.tensor([h["score"] for h in self.history], dtype=torch.float64)
            .reshape(len(self.history), len(refs)),
        }
        for key in self.sensitivity:
            state[f"sensitivity.{key}"] = self.sensitivity[key].detach().cpu()
            state[f"uncertainty.{key}"] = self.uncertainty[key].detach().cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the statistics, the history and the current allocation (written into the model this method was
        applied to, so a run resumed mid-epoch trains at the same s_m)."""
        refs = self.matrices()
        names = ",".join(r.name for r in refs)
        if state.get("matrix_names") != names:
            raise ValueError(f"snella state is for matrices [{str(state.get('matrix_names'))[:80]}...], the model has "
                             f"[{names[:80]}...]")
        self.steps = int(state["steps"])
        self.total_epochs = None if int(state["total_epochs"]) < 0 else int(state["total_epochs"])
        self.budget = None if int(state["budget"]) < 0 else int(state["budget"])
        for ref, s in zip(refs, state["sparsity"].tolist()):
            ref.factors.set_sparsity(s)
        self.sensitivity, self.uncertainty = {}, {}
        for key, value in state.items():
            for prefix, target in (("sensitivity.", self.sensitivity), ("uncertainty.", self.uncertainty)):
                if key.startswith(prefix):
                    name = key[len(prefix):]
                    ref = next(r for r in refs if name.startswith(r.name + "."))
                    target[name] = value.to(ref.factors.A.device, torch.float32).clone()
        self.history = [{"epoch": int(e), "budget": int(b), "reallocated": bool(r), "sparsity": s, "score": c}
                        for e, b, r, s, c in zip(state["history_epoch"].tolist(), state["history_budget"].tolist(),
                                                 state["history_reallocated"].tolist(),
                                                 state["history_sparsity"].tolist(),
                                                 state["history_score"].tolist())]
        self.scores = {r.name: (self.history[-1]["score"][i] if self.history else 0.0) for i, r in enumerate(refs)}

    # ------------------------------------------------------------------ reporting
    def allocation_rows(self, model: nn.Module) -> list[dict[str, Any]]:
        rows = super().allocation_rows(model)
        for row in rows:
            row["score"] = self.scores.get(row["matrix"], 0.0)
        return rows

    def summary(self, model: nn.Module) -> dict[str, Any]:
        out = super().summary(model)
        out["budget"] = self.budget
        out["dense"] = self.options.dense
        out["allocations"] = sum(1 for h in self.history if h["reallocated"])
        for name, entry in out["matrices"].items():
            entry["score"] = self.scores.get(name, 0.0)
        return out

    def write_artifacts(self, model: nn.Module, out_dir: Path) -> list[Path]:
        """``snella_allocation.csv`` (current s_m, kept counts, scores), ``snella_allocation_history.csv`` (every
        epoch so far) and ``snella_allocation.png`` (layer × matrix heat maps of s_m and score)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = self.allocation_rows(model)
        table = out_dir / "snella_allocation.csv"
        write_csv(table, rows)
        names = [r["matrix"] for r in rows]
        history = out_dir / "snella_allocation_history.csv"
        write_csv(history, [{"epoch": h["epoch"], "budget": h["budget"], "reallocated": h["reallocated"],
                             "matrix": name, "sparsity": s, "score": c}
                            for h in self.history for name, s, c in zip(names, h["sparsity"], h["score"])])
        image = out_dir / "snella_allocation.png"
        epoch = self.history[-1]["epoch"] if self.history else 0
        plot_heatmaps(rows, image, [("sparsity", "sparsity s_m"), ("score", "score S_m")],
                      title=f"snella allocation, epoch {epoch}, budget {self.budget}")
        return [table, history, image]


__all__ = ["Snella", "SnellaOptions", "budget_schedule", "proportional_allocation"]
