"""SPT stage 1: the sensitivity pass, the budget sweep and the allocation file (spec ``spt_arc_hta.md`` §1.2-1.3).

``peft-dist sensitivity --config F [overrides] --out alloc.json`` builds the backbone exactly as training would
(same seed, hence the same random head), accumulates squared mini-batch gradients over a fixed number of batches,
ranks every candidate entry globally with one sort, sweeps the candidate count τ, picks the τ whose total is
closest to each budget, and writes one JSON file that ``spt_lora``/``spt_adapter`` read.

Candidate naming follows the official code (spec §1.7): the fused ``attn.qkv`` is scored as three matrices
``blocks.{i}.attn.{q,k,v}.weight`` and three vectors ``blocks.{i}.attn.{q,k,v}.bias``; every other key is the
timm parameter name. Flat indices in the file are row-major positions inside each such (sliced) tensor.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from peft_dist.config import ConfigError

OPS = ("q", "k", "v", "proj", "fc1", "fc2")
"""Op order of the per-op table and of ``tuned_matrices`` (spec §1.3)."""
EXCLUDED_SUBSTRINGS = ("head", "cls_token", "patch_embed", "pos_embed")
"""Parameters never scored (spec §1.2; official ``engine.py`` L166)."""
STRUCTURED_TYPES = ("lora", "adapter")
SCORES = ("grad_sq", "fisher", "taylor")
ALLOCATION_FORMAT = "peft-dist/spt-allocation"
ALLOCATION_VERSION = 1
DEFAULT_BUDGETS_M = (1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05)
"""Target totals in millions of parameters (spec §1.3)."""
DEFAULT_TAU_STEP = 20_000
DEFAULT_TAU_COUNT = 79
"""τ ∈ {0.02, 0.04, …, 1.58}·10⁶ (spec §1.3)."""

_QKV_KEY = re.compile(r"^(blocks\.\d+\.attn)\.qkv\.(weight|bias)$")
_MATRIX_KEY = re.compile(r"^blocks\.(\d+)\.(?:attn|mlp)\.(q|k|v|proj|fc1|fc2)\.weight$")
_QKV_ROWS = ("q", "k", "v")


class AllocationError(ConfigError):
    """An allocation file is missing, malformed or does not fit the model; the message names the file/key."""


# ============================================================================================ candidates
@dataclass(frozen=True)
class Candidate:
    """One scored tensor in the official naming: a ``matrix`` (block, op) or a ``vector``."""

    key: str
    kind: str
    shape: tuple[int, ...]
    block: int | None = None
    op: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def classify(key: str, shape: tuple[int, ...]) -> Candidate:
    """Class of an official candidate key (spec §1.2): names holding ``norm``/``bias`` are vectors, the six block
    weight matrices are matrices, anything else is an error (as in the official code)."""
    shape = tuple(int(s) for s in shape)
    if "norm" in key or "bias" in key:
        if len(shape) != 1:
            raise AllocationError(f"sensitivity candidate {key}: a vector key with shape {shape}")
        return Candidate(key, "vector", shape)
    m = _MATRIX_KEY.match(key)
    if m and len(shape) == 2:
        return Candidate(key, "matrix", shape, block=int(m.group(1)), op=m.group(2))
    raise AllocationError(f"sensitivity candidate {key} (shape {shape}) is neither a norm/bias vector nor one of the "
                          f"block matrices {', '.join(OPS)}; SPT supports plain timm ViTs (no layer scale, "
                          "register tokens or attention pooling)")


def candidate_views(model: nn.Module) -> list[tuple[Candidate, nn.Parameter, slice | None]]:
    """Every candidate of a plain timm ViT in model order: (candidate, the timm parameter, its row slice or None).

    The fused qkv weight/bias becomes three candidates over row thirds ([q; k; v], spec §1.7)."""
    from peft_dist.methods.base import AdaptedModule

    if any(isinstance(m, AdaptedModule) for m in model.modules()):
        raise AllocationError("the sensitivity pass needs a plain backbone; a PEFT method is already applied")
    views = []
    for name, param in model.named_parameters():
        if any(s in name for s in EXCLUDED_SUBSTRINGS):
            continue
        m = _QKV_KEY.match(name)
        if m:
            third = param.shape[0] // 3
            for j, op in enumerate(_QKV_ROWS):
                key = f"{m.group(1)}.{op}.{m.group(2)}"
                rows = slice(j * third, (j + 1) * third)
                views.append((classify(key, (third, *param.shape[1:])), param, rows))
        else:
            views.append((classify(name, tuple(param.shape)), param, None))
    return views


def model_candidates(model: nn.Module) -> list[Candidate]:
    return [c for c, _, _ in candidate_views(model)]


def structured_param_count(structured_type: str, d_out: int, d_in: int, rank: int) -> int:
    """P_s, the size of the structured module at a d_out×d_in position (spec §1.3, official
    ``get_structured_param_num``): LoRA r·(d_in + d_out); Adapter 2·r·d_out + r + d_out."""
    if structured_type == "lora":
        return rank * (d_in + d_out)
    if structured_type == "adapter":
        return 2 * rank * d_out + rank + d_out
    raise AllocationError(f"structured_type: got {structured_type!r}; allowed: {', '.join(STRUCTURED_TYPES)}")


# ============================================================================================ sensitivity pass
def _all_reduce_(tensor: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def compute_sensitivity(model: nn.Module, batches: Iterable, num_batches: int = 16, *, score: str = "grad_sq",
                        device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Per-entry sensitivity of every candidate (spec §1.2), keyed by official names, fp32 on the CPU.

    ``score``:
      * ``grad_sq`` (the official estimator): Σ_b g_b ⊙ g_b, g_b the gradient of batch b's *mean* cross-entropy;
      * ``fisher``: Σ_i g_i ⊙ g_i over single samples (the per-sample Fisher, spec §5.3 item 10 ablation);
      * ``taylor``: Σ_b |g_b ⊙ w| (first-order Taylor, ablation).
    The model runs in train mode (drop-path active, as officially) with every parameter requiring grad; both
    states are restored afterwards. ``batches`` yields ``(images, labels)`` or ``Batch(images, labels, skipped)``.

    Under ``torch.distributed`` each rank passes its share of every global batch (equal sizes). For ``grad_sq`` and
    ``taylor`` the gradients are averaged over ranks *before* squaring, so every rank holds exactly the score of the
    global batch-mean gradient (spec §5.3 item 10), identical on all ranks; ``fisher`` sums per-rank sums.
    """
    if score not in SCORES:
        raise ConfigError(f"score: got {score!r}; allowed: {', '.join(SCORES)}")
    if num_batches < 1:
        raise ConfigError(f"num_batches: got {num_batches}; allowed: >= 1")
    views = candidate_views(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    params = {id(p): p for _, p, _ in views}
    scores = {c.key: torch.zeros(c.shape, dtype=torch.float32, device=device) for c, _, _ in views}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    world = _world_size()
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        model.train()
        batch_iter = iter(batches)
        for b in range(num_batches):
            batch = next(batch_iter, None)
            if batch is None:
                raise ConfigError(f"sensitivity: the data yielded only {b} of num_batches={num_batches} batches")
            images, labels = batch[0].to(device), batch[1].to(device)
            if score == "fisher":
                for i in range(images.shape[0]):
                    grads = _gradients(model, params, images[i:i + 1], labels[i:i + 1])
                    _accumulate(scores, views, grads, lambda g, p: g.square())
            else:
                grads = _gradients(model, params, images, labels)
                for g in grads.values():
                    _all_reduce_(g)
                    g.div_(world)
                if score == "grad_sq":
                    _accumulate(scores, views, grads, lambda g, p: g.square())
                else:
                    _accumulate(scores, views, grads, lambda g, p: (g * p.detach().float()).abs())
        if score == "fisher":
            for s in scores.values():
                _all_reduce_(s)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return {k: v.cpu() for k, v in scores.items()}


def _gradients(model: nn.Module, params: dict[int, nn.Parameter], images: torch.Tensor,
               labels: torch.Tensor) -> dict[int, torch.Tensor]:
    """fp32 gradients of the mean cross-entropy w.r.t. the candidate parameters (by id)."""
    model.zero_grad(set_to_none=True)
    logits = model(images)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[-1]):
        raise ConfigError(f"model.num_classes: the head has {logits.shape[-1]} classes but the data holds label "
                          f"{int(labels.max()) if int(labels.min()) >= 0 else int(labels.min())}")
    loss = F.cross_entropy(logits.float(), labels)
    plist = list(params.values())
    grads = torch.autograd.grad(loss, plist, allow_unused=True)
    return {id(p): (torch.zeros_like(p, dtype=torch.float32) if g is None else g.detach().float())
            for p, g in zip(plist, grads)}


def _accumulate(scores, views, grads, term) -> None:
    for cand, param, rows in views:
        g = grads[id(param)]
        value = term(g if rows is None else g[rows], param if rows is None else param[rows])
        scores[cand.key].add_(value)


# ============================================================================================ budget sweep
def default_taus(total_entries: int, step: int = DEFAULT_TAU_STEP, count: int = DEFAULT_TAU_COUNT) -> list[int]:
    """The official τ grid step·{1..count}, cut at the number of candidate entries."""
    taus = [step * (i + 1) for i in range(count) if step * (i + 1) <= total_entries]
    if not taus:
        raise ConfigError(f"tau_step: {step} exceeds the {total_entries} candidate entries; use a smaller step")
    return taus


def build_allocation(scores: dict[str, torch.Tensor], *, structured_type: str, rank: int = 8, alpha: float = 10.0,
                     beta: float = 5.0, budgets_m: Iterable[float] = DEFAULT_BUDGETS_M,
                     taus: Iterable[int] | None = None, fixed_params: int = 0,
                     metadata: dict[str, Any] | None = None, structured_vector: bool = True) -> dict[str, Any]:
    """The allocation document for every budget (spec §1.3), from one global ranking and prefix counts (§5.4).

    For a candidate count τ, c is the number of a tensor's entries among the global top-τ scores (ties broken by
    candidate order, then position, so the result is deterministic). A matrix with c·α ≥ P_s gets a structured
    module (cost P_s), a vector with c·β ≥ n is tuned whole (cost n); otherwise the c entries are tuned
    unstructured (cost c). Total(τ) = Σ costs + ``fixed_params`` (the cls token). For each budget B (millions),
    the τ whose total is closest to B wins; ties go to the later τ. ``structured_vector=False`` drops the
    whole-vector rule (the official ``--structured_vector`` switch, set in every official script): every vector
    keeps only its c selected entries.
    """
    if structured_type not in STRUCTURED_TYPES:
        raise ConfigError(f"structured_type: got {structured_type!r}; allowed: {', '.join(STRUCTURED_TYPES)}")
    if int(rank) < 1:
        raise ConfigError(f"rank: got {rank!r}; allowed: >= 1")
    for key, value in (("alpha", alpha), ("beta", beta)):
        if not value > 0:
            raise ConfigError(f"{key}: got {value!r}; allowed: > 0")
    cands = [classify(k, tuple(v.shape)) for k, v in scores.items()]
    if not cands:
        raise ConfigError("sensitivity: no candidate tensors to allocate")
    sizes = [c.numel for c in cands]
    total_entries = sum(sizes)
    taus = sorted(set(int(t) for t in (taus if taus is not None else default_taus(total_entries))))
    if not taus or taus[0] < 1 or taus[-1] > total_entries:
        raise ConfigError(f"taus: every τ must lie in [1, {total_entries}] (the number of candidate entries); "
                          f"got {taus[:1]}…{taus[-1:]}")
    budgets_m = [float(b) for b in budgets_m]
    if not budgets_m or any(b <= 0 for b in budgets_m):
        raise ConfigError(f"budgets: expected positive sizes in millions of parameters, got {budgets_m}")

    flat = torch.cat([scores[c.key].detach().reshape(-1).to(torch.float32).cpu() for c in cands])
    if not torch.isfinite(flat).all():
        raise ConfigError("sensitivity: scores contain NaN or inf (did the loss diverge?)")
    top = top_positions(flat, taus[-1])
    ends = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
    owner = torch.searchsorted(ends, top, right=True)  # which tensor each top entry belongs to
    tau_t = torch.tensor(taus, dtype=torch.int64)
    bucket = torch.searchsorted(tau_t, torch.arange(taus[-1]), right=True)  # first τ index that selects position p
    n_t, n_tau = len(cands), len(taus)
    hist = torch.bincount(owner * (n_tau + 1) + bucket, minlength=n_t * (n_tau + 1)).view(n_t, n_tau + 1)
    counts = hist.cumsum(1)[:, :n_tau]  # counts[t, j]: entries of tensor t among the top taus[j]

    is_matrix = torch.tensor([c.kind == "matrix" for c in cands])
    numel = torch.tensor(sizes, dtype=torch.int64)
    p_s = torch.tensor([structured_param_count(structured_type, *c.shape, rank) if c.kind == "matrix" else 0
                        for c in cands], dtype=torch.int64)
    # Comparisons in float64 from integer counts: c·α ≥ P_s and c·β ≥ n exactly as the spec writes c ≥ P_s/α.
    c64 = counts.to(torch.float64)
    structured = is_matrix[:, None] & (c64 * alpha >= p_s[:, None].to(torch.float64)) & (counts > 0)
    whole = ~is_matrix[:, None] & (c64 * beta >= numel[:, None].to(torch.float64)) & (counts > 0)
    if not structured_vector:
        whole = torch.zeros_like(whole)
    cost = torch.where(structured, p_s[:, None], torch.where(whole, numel[:, None], counts))
    totals = cost.sum(0) + int(fixed_params)

    budget_docs = []
    for b in budgets_m:
        target = b * 1e6
        best = 0
        for j in range(n_tau):  # ties go to the later τ (official engine.py L277-299)
            if abs(totals[j].item() - target) <= abs(totals[best].item() - target):
                best = j
        budget_docs.append(_budget_entry(b, best, taus, cands, counts, structured, whole, cost, top, ends,
                                         int(fixed_params)))
    return {
        "format": ALLOCATION_FORMAT,
        "version": ALLOCATION_VERSION,
        "structured_type": structured_type,
        "rank": int(rank),
        "alpha": float(alpha),
        "beta": float(beta),
        "fixed_params": int(fixed_params),
        "structured_vector": bool(structured_vector),
        "ops": list(OPS),
        "num_blocks": _num_blocks(cands),
        "tensors": [[c.key, list(c.shape)] for c in cands],
        "sweep": [{"tau": t, "total": int(totals[j])} for j, t in enumerate(taus)],
        "budgets": budget_docs,
        "metadata": dict(metadata or {}),
    }


def top_positions(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Flat positions of the k largest scores, best first, ties by position: the first k of a stable descending
    sort of ``flat``. Only max(τ) positions can ever be selected, so one partial selection finds the k-th score and
    only the entries at or above it are sorted (7x faster than sorting all 85 M ViT-B scores on 2 cores)."""
    threshold = torch.topk(flat, k, sorted=False).values.min()
    survivors = (flat >= threshold).nonzero().flatten()  # ascending positions, so the stable sort breaks ties by them
    return survivors[torch.sort(flat[survivors], descending=True, stable=True).indices][:k]


def _budget_entry(budget_m, j, taus, cands, counts, structured, whole, cost, top, ends, fixed) -> dict[str, Any]:
    tau = taus[j]
    num_blocks = _num_blocks(cands)
    table = [[0] * len(OPS) for _ in range(num_blocks)]
    tuned_vectors, unstructured = [], {}
    sums = {"structured": 0, "vectors": 0, "unstructured": 0}
    # Tensors are concatenated contiguously, so sorting the chosen flat positions groups them by tensor (in
    # candidate order) and orders each group; the group sizes are the prefix counts.
    chosen = torch.sort(top[:tau]).values
    per_tensor = torch.split(chosen, counts[:, j].tolist())
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), ends[:-1]])
    for t, c in enumerate(cands):
        n_sel = int(counts[t, j])
        if n_sel == 0:
            continue
        if bool(structured[t, j]):
            table[c.block][OPS.index(c.op)] = 1
            sums["structured"] += int(cost[t, j])
        elif bool(whole[t, j]):
            tuned_vectors.append(c.key)
            sums["vectors"] += int(cost[t, j])
        else:
            unstructured[c.key] = (per_tensor[t] - starts[t]).tolist()
            sums["unstructured"] += n_sel
    return {
        "budget_m": budget_m,
        "tau": tau,
        "total": sum(sums.values()) + fixed,
        "structured_total": sums["structured"],
        "vector_total": sums["vectors"],
        "unstructured_total": sums["unstructured"],
        "tuned_matrices": table,
        "per_op": [sum(row[i] for row in table) for i in range(len(OPS))],
        "tuned_vectors": tuned_vectors,
        "unstructured": unstructured,
    }


def _num_blocks(cands: list[Candidate]) -> int:
    return 1 + max((c.block for c in cands if c.block is not None), default=-1)


# ============================================================================================ the file
def allocation_json(doc: dict[str, Any]) -> str:
    """Canonical text: the same allocation always gives the same bytes (deterministic files, spec §5.1 item 5)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n"


def write_allocation(path: str | Path, doc: dict[str, Any]) -> Path:
    """Write the allocation JSON atomically (a temp file then rename); never pickle (design.md conventions)."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise ConfigError(f"--out {path}: the allocation file must end in .json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(allocation_json(doc))
    os.replace(tmp, path)
    return path


def read_allocation(path: str | Path, key: str = "allocation") -> dict[str, Any]:
    """Read and check an allocation file; errors name the file (and ``key``, the config key it came from)."""
    path = Path(path)
    if not path.is_file():
        hint = "; set method.task to fill in {task}" if "{task}" in str(path) else ""
        raise AllocationError(f"{key}: allocation file not found: {path} (write one with `peft-dist sensitivity "
                              f"--config F --out FILE`{hint})")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AllocationError(f"{key}: {path} is not an SPT allocation JSON file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != ALLOCATION_FORMAT:
        raise AllocationError(f"{key}: {path} is not an SPT allocation file (format must be {ALLOCATION_FORMAT!r})")
    if doc.get("version") != ALLOCATION_VERSION:
        raise AllocationError(f"{key}: {path} has version {doc.get('version')!r}; this peft-dist reads version "
                              f"{ALLOCATION_VERSION}")
    required = ("structured_type", "rank", "tensors", "budgets", "fixed_params")
    missing = [k for k in required if k not in doc]
    if missing:
        raise AllocationError(f"{key}: {path} lacks {', '.join(missing)}")
    if doc["structured_type"] not in STRUCTURED_TYPES:
        raise AllocationError(f"{key}: {path} has structured_type {doc['structured_type']!r}; allowed: "
                              f"{', '.join(STRUCTURED_TYPES)}")
    return doc


def backbone_fingerprint(model: nn.Module) -> str | None:
    """sha256 of the backbone's weights (every parameter but the head's, in name order): tells a pre-trained
    backbone from a random one or another checkpoint, whatever the file was called. None for a model without
    data (meta or fake tensors: the dry run and the memory estimator), whose weights cannot be told apart."""
    import hashlib

    from peft_dist.methods.base import head_parameters

    params = sorted(model.named_parameters())
    if any(p.is_meta or type(p.data).__name__ == "FakeTensor" for _, p in params):
        return None
    digest = hashlib.sha256()
    head = {id(p) for p in head_parameters(model)}
    for name, p in params:
        if id(p) not in head:
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_allocation_metadata(doc: dict[str, Any], path: str | Path, expected: dict[str, Any],
                              key: str = "method.allocation") -> None:
    """Refuse, in one line naming every difference, an allocation computed for another task, head or backbone.
    Only what both the file's metadata and ``expected`` record is compared (files without metadata pass)."""
    found = doc.get("metadata") or {}
    differ = []
    for name, want in expected.items():
        have = found.get(name)
        if want is None or have is None or have == want:
            continue
        if name == "backbone_sha256":
            differ.append(f"backbone weights differ (the file's, from checkpoint {found.get('checkpoint')}, have "
                          f"sha256 {have[:12]}; this run's {want[:12]})")
        elif name != "checkpoint":  # a checkpoint path may move: the weights' fingerprint decides
            differ.append(f"{name} {have!r} in the file, {want!r} in this run")
    if differ:
        raise AllocationError(f"{key}: {path} was computed for another run: {'; '.join(differ)}; run `peft-dist "
                              "sensitivity` for this task and backbone")


def expand_allocation_path(pattern: str | Path, task: str | None, budget_m: float, key: str = "method.allocation") -> str:
    """``{task}`` and ``{budget}`` (in millions, ``0.4``) filled in: one allocation file per task and budget, as the
    official code keeps them (``sensitivity_<exp>/<task>/param_req_<B>.pth``, spec spt_arc_hta §1.1)."""
    pattern = str(pattern)
    try:  # without a task, {task} stays in the path: "not found" then names it (read_allocation)
        return pattern.format(task=task or "{task}", budget=f"{float(budget_m):g}")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{key}: {pattern}: only {{task}} and {{budget}} may be filled in ({e})") from None


def select_budget(doc: dict[str, Any], budget_m: float, where: str = "method.budget") -> dict[str, Any]:
    """The entry of ``doc`` for ``budget_m`` (millions); an error lists the budgets the file holds."""
    for entry in doc["budgets"]:
        if math.isclose(float(entry["budget_m"]), float(budget_m), rel_tol=1e-9, abs_tol=1e-12):
            return entry
    have = ", ".join(f"{float(e['budget_m']):g}" for e in doc["budgets"])
    raise AllocationError(f"{where}: got {budget_m!r}; the allocation file holds budgets {have}")


def format_allocation_table(doc: dict[str, Any], entry: dict[str, Any]) -> str:
    """The per-op table of one budget: S = structured module, a number = unstructured entries, . = nothing."""
    unstructured = entry["unstructured"]
    lines = [f"budget {float(entry['budget_m']):g} M ({doc['structured_type']}): tau={entry['tau']:,} "
             f"total={entry['total']:,} = structured {entry['structured_total']:,} + whole vectors "
             f"{entry['vector_total']:,} + unstructured {entry['unstructured_total']:,} + fixed "
             f"{doc['fixed_params']:,}",
             "block " + "".join(f"{op:>8}" for op in OPS)]
    for b, row in enumerate(entry["tuned_matrices"]):
        cells = []
        for i, op in enumerate(OPS):
            prefix = "attn" if op in ("q", "k", "v", "proj") else "mlp"
            n = len(unstructured.get(f"blocks.{b}.{prefix}.{op}.weight", ()))
            cells.append("S" if row[i] else (str(n) if n else "."))
        lines.append(f"{b:>5} " + "".join(f"{c:>8}" for c in cells))
    lines.append("per-op" + "".join(f"{n:>8}" for n in entry["per_op"]))
    lines.append(f"whole vectors: {len(entry['tuned_vectors'])}; unstructured tensors: {len(unstructured)}")
    return "\n".join(lines)


# ============================================================================================ the CLI
def add_sensitivity_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``peft-dist sensitivity`` (the lead mounts it; ``run_sensitivity(cfg, args)`` does the work)."""
    parser.add_argument("--config", action="append", default=None,
                        help="run config YAML (repeatable, later files win); the model section builds the backbone")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--out", required=True, help="allocation file to write (.json)")
    parser.add_argument("--structured-type", choices=STRUCTURED_TYPES, default=None,
                        help="structured module the costs are computed for; default: from method.name "
                             "(spt_lora → lora, spt_adapter → adapter). SPT-Adapter needs adapter-derived files.")
    parser.add_argument("--num-batches", type=int, default=16, help="batches of the sensitivity pass (official 16)")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS_M),
                        help="target totals in millions of parameters, head excluded")
    parser.add_argument("--rank", type=int, default=8, help="rank r of the structured modules")
    parser.add_argument("--alpha", type=float, default=10.0, help="structured threshold: c >= P_s / alpha")
    parser.add_argument("--beta", type=float, default=5.0, help="whole-vector threshold: c >= n / beta")
    parser.add_argument("--tau-step", type=int, default=DEFAULT_TAU_STEP, help="τ grid step (entries)")
    parser.add_argument("--tau-count", type=int, default=DEFAULT_TAU_COUNT, help="number of τ values in the grid")
    parser.add_argument("--no-structured-vector", dest="structured_vector", action="store_false",
                        help="never tune a vector whole (the official scripts all pass --structured_vector, the "
                             "default here): vectors keep only their selected entries")
    parser.add_argument("--score", choices=SCORES, default="grad_sq",
                        help="grad_sq (official), fisher (per-sample), taylor (|g·w|)")


def structured_type_for(cfg, args: argparse.Namespace) -> str:
    if getattr(args, "structured_type", None):
        return args.structured_type
    by_method = {"spt_lora": "lora", "spt_adapter": "adapter"}
    if cfg.method.name in by_method:
        return by_method[cfg.method.name]
    raise ConfigError(f"--structured-type: required when method.name is {cfg.method.name!r} "
                      "(not spt_lora/spt_adapter); allowed: lora, adapter")


def run_sensitivity(cfg, args: argparse.Namespace, batches: Iterable | None = None) -> int:
    """``peft-dist sensitivity``: sensitivity pass + sweep + allocation file; prints the per-op tables.

    The backbone is built like the trainer builds it (``train.seed`` seeds the random head, spec §5.1 item 5) and
    ``model.drop_path_rate`` applies (the official pass uses 0.1). ``batches`` defaults to the
    subset in file order: the first ``num_batches`` global batches of the split (the official 16 × 32 = 512
    images), each rank its contiguous slice of every global batch, whatever the world size and worker count.
    Started by torchrun (or ``peft-dist launch``), the command joins the process group itself;
    every rank contributes its share of each global batch (``data.batch_size`` per rank, so use 32/world for the
    official 32-image batches) and ends with the same scores; rank 0 builds the document, broadcasts it, and one
    process per node writes the identical file.
    """
    from launcher.env import read_dist_env
    from peft_dist.engines.process_group import destroy_process_group, init_process_group

    structured_type = structured_type_for(cfg, args)
    if args.num_batches < 1:
        raise ConfigError(f"--num-batches: got {args.num_batches}; allowed: >= 1")
    env = read_dist_env()
    started_group = env.distributed and not dist.is_initialized()  # under torchrun / `peft-dist launch`
    device = init_process_group(env, cfg.dist.backend, cfg.dist.timeout_s)
    try:
        return _sensitivity(cfg, args, batches, structured_type, device)
    finally:
        if started_group:
            destroy_process_group()


def _sensitivity(cfg, args: argparse.Namespace, batches: Iterable | None, structured_type: str,
                 device: torch.device) -> int:
    from peft_dist.models.backbone import create_backbone
    from peft_dist.train.trainer import seed_everything

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
        else (0, 1)
    seed_everything(cfg.train.seed)
    model = create_backbone(cfg.model.name, cfg.model.num_classes, cfg.model.checkpoint,
                            drop_path_rate=cfg.model.drop_path_rate, **cfg.model.kwargs)
    model.to(device)
    if batches is None and cfg.data.source == "synthetic":
        from peft_dist.data import build_train_loader

        batches = build_train_loader(cfg.data, rank, world, cfg.train.seed)
    elif batches is None:  # the first num_batches x global batch samples in file order (spec §1.2)
        from peft_dist.data.loader import build_ordered_loader

        batches = build_ordered_loader(cfg.data, rank, world, args.num_batches)
    fingerprint = backbone_fingerprint(model)
    task = getattr(getattr(batches, "info", None), "task", None)
    scores = compute_sensitivity(model, batches, args.num_batches, score=args.score, device=device)
    doc = None
    if rank == 0:
        total_entries = sum(s.numel() for s in scores.values())
        cls_token = getattr(model, "cls_token", None)
        doc = build_allocation(
            scores, structured_type=structured_type, rank=args.rank, alpha=args.alpha, beta=args.beta,
            budgets_m=args.budgets, taus=default_taus(total_entries, args.tau_step, args.tau_count),
            fixed_params=cls_token.numel() if cls_token is not None else 0,
            structured_vector=getattr(args, "structured_vector", True),
            metadata={"model": cfg.model.name, "model_kwargs": cfg.model.kwargs, "checkpoint": cfg.model.checkpoint,
                      "num_classes": cfg.model.num_classes, "seed": cfg.train.seed, "num_batches": args.num_batches,
                      "batch_size_per_rank": cfg.data.batch_size, "world_size": world, "score": args.score,
                      "drop_path_rate": cfg.model.drop_path_rate, "task": task,
                      "backbone_sha256": fingerprint})
    if world > 1:
        box = [doc]
        dist.broadcast_object_list(box, src=0)
        doc = box[0]
    files = allocation_files(args.out, doc, task)
    if int(os.environ.get("LOCAL_RANK", rank)) == 0:
        for path, one in files.items():
            write_allocation(path, one)
    if world > 1:
        dist.barrier()
    if rank == 0:
        for entry in doc["budgets"]:
            print(format_allocation_table(doc, entry), end="\n\n")
        print(f"wrote {', '.join(files)}")
    return 0


def allocation_files(out: str, doc: dict[str, Any], task: str | None) -> dict[str, dict[str, Any]]:
    """``--out`` with ``{budget}``: one file per budget (that budget's entry only); otherwise one file with all.
    ``{task}`` is the task of the data (``_info.json``)."""
    if "{task}" in out and not task:
        raise ConfigError(f"--out {out}: names {{task}}, but the data records no task (no task in _info.json)")
    if "{budget}" not in out:
        return {expand_allocation_path(out, task, 0.0, key="--out"): doc}
    return {expand_allocation_path(out, task, entry["budget_m"], key="--out"): {**doc, "budgets": [entry]}
            for entry in doc["budgets"]}
