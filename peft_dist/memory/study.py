"""``peft-dist study --grid F``: memory over a grid of runs → CSV, Markdown table, PNG plots (issue 9 item 4).

A grid file (``configs/studies/*.yaml``) names the axes (backbone, method label, batch size, dtype, activation
checkpointing, engine, world size), what each method label means (``methods:``), settings shared by every point
(``base:``, RunConfig sections), and optionally the paper's figures (``paper:``) and the ratios to report
(``ratios:``). Every grid point is estimated on CPU (:func:`peft_dist.memory.estimator.estimate`) or, in
``mode: measure`` (``auto`` with a GPU present), measured by a short real run on the GPU.

Outputs in ``--out`` (default ``runs/studies/<study>``): ``<study>.csv`` (one row per grid point, bytes per rank),
``<study>.md`` (the tables printed to the terminal), ``<study>_vs_backbone.png`` (memory vs backbone size per
method, SNELL Fig. 3c), ``<study>_vs_world.png`` (memory per rank vs world size per engine) and
``<study>_breakdown.png`` (stacked bytes by category). Methods that this checkout does not have are skipped with a
printed note and picked up as soon as they are registered.

SPT needs an allocation file per backbone; ``allocation: synthetic`` in a method label builds a structural stand-in
(structured LoRA/adapter modules on chosen ops of every block plus a fixed number of unstructured entries per fc1):
memory depends on how many entries and modules are trained, not on which.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft_dist.config import ConfigError, read_yaml_mapping

AXES = ("backbone", "method", "batch_size", "dtype", "activation_checkpointing", "engine", "world_size", "attention")
AXIS_DEFAULTS: dict[str, Any] = {"batch_size": 8, "dtype": "fp32", "activation_checkpointing": False,
                                 "engine": "single", "world_size": 1, "attention": "sdpa"}
"""``attention``: ``sdpa`` (timm's, what training runs) or ``explicit`` (the official PETL code's softmax(QKᵀ)V,
estimate only: :mod:`peft_dist.memory.attention`)."""
TOP_KEYS = ("study", "description", "mode", "device", "base", "eval_batch_size", "grid", "methods", "paper",
            "ratios", "backbone_labels", "jobs")
MODES = ("estimate", "measure", "auto")
CSV_COLUMNS = ("backbone", "method", "engine", "world_size", "batch_size", "dtype", "activation_checkpointing", "attention",
               "params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "peak_bytes",
               "params_frozen_bytes", "params_trainable_bytes", "buffers_bytes", "peak_reserved_bytes",
               "backbone_params", "method_name", "source", "status", "seconds", "paper_mib", "ours_over_paper",
               "notes")
MIB = 2**20


# ============================================================================================ the grid file
@dataclass
class Ratio:
    numerator: str
    denominator: str
    target_max: float | None = None


@dataclass
class Study:
    name: str
    path: Path
    description: str = ""
    mode: str = "estimate"
    device: str = "cuda"
    base: dict[str, Any] = field(default_factory=dict)
    eval_batch_size: int = 0
    grid: dict[str, list[Any]] = field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    paper: dict[str, dict[str, float]] = field(default_factory=dict)
    paper_units: str = "MiB"
    paper_source: str = ""
    ratios: list[Ratio] = field(default_factory=list)
    backbone_labels: dict[str, str] = field(default_factory=dict)
    jobs: int | None = None

    def points(self) -> list[dict[str, Any]]:
        axes = [self.grid.get(a, [AXIS_DEFAULTS.get(a)]) for a in AXES]
        return [dict(zip(AXES, values)) for values in itertools.product(*axes)]

    def method_spec(self, label: str) -> dict[str, Any]:
        return dict(self.methods.get(label) or {"name": label})


def load_study(path: str | Path) -> Study:
    """Read and check a grid file; every error names the file and the key."""
    path = Path(path)
    raw = read_yaml_mapping(path, "--grid: file not found", f"a mapping with keys {', '.join(TOP_KEYS)}")
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}; allowed: {', '.join(TOP_KEYS)}")
    study = Study(name=str(raw.get("study") or path.stem), path=path, description=str(raw.get("description", "")))
    study.mode = raw.get("mode", "estimate")
    if study.mode not in MODES:
        raise ConfigError(f"{path}: mode: got {study.mode!r}; allowed: {', '.join(MODES)}")
    study.device = raw.get("device", "cuda")
    if study.device not in ("cuda", "cpu"):
        raise ConfigError(f"{path}: device: got {study.device!r}; allowed: cuda, cpu")
    study.base = _mapping(raw.get("base"), f"{path}: base")
    study.eval_batch_size = raw.get("eval_batch_size", 0)
    if not isinstance(study.eval_batch_size, int) or study.eval_batch_size < 0:
        raise ConfigError(f"{path}: eval_batch_size: got {study.eval_batch_size!r}; allowed: an integer >= 0")
    grid = _mapping(raw.get("grid"), f"{path}: grid")
    for axis, values in grid.items():
        if axis not in AXES:
            raise ConfigError(f"{path}: grid.{axis}: unknown axis; allowed: {', '.join(AXES)}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{axis}: expected a non-empty list")
    for axis in ("backbone", "method"):
        if axis not in grid:
            raise ConfigError(f"{path}: grid.{axis}: required (a list)")
    for v in grid.get("dtype", []):
        if v not in ("fp32", "bf16"):
            raise ConfigError(f"{path}: grid.dtype: got {v!r}; allowed: fp32, bf16")
    for axis in ("batch_size", "world_size"):
        for v in grid.get(axis, []):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{path}: grid.{axis}: got {v!r}; allowed: integers >= 1")
    for v in grid.get("activation_checkpointing", []):
        if not isinstance(v, bool):
            raise ConfigError(f"{path}: grid.activation_checkpointing: got {v!r}; allowed: true, false")
    for v in grid.get("attention", []):
        if v not in ("sdpa", "explicit"):
            raise ConfigError(f"{path}: grid.attention: got {v!r}; allowed: sdpa, explicit")
    study.grid = grid
    methods = _mapping(raw.get("methods"), f"{path}: methods")
    for label, spec in methods.items():
        if not isinstance(spec, dict) or "name" not in spec:
            raise ConfigError(f"{path}: methods.{label}: expected a mapping with 'name' (the registered method) and "
                              "its options")
    study.methods = {str(k): dict(v) for k, v in methods.items()}
    paper = _mapping(raw.get("paper"), f"{path}: paper")
    for key in paper:
        if key not in ("units", "source", "values"):
            raise ConfigError(f"{path}: paper.{key}: unknown key; allowed: units, source, values")
    study.paper_units = paper.get("units", "MiB")
    if study.paper_units not in ("MiB", "MB", "GiB"):
        raise ConfigError(f"{path}: paper.units: got {study.paper_units!r}; allowed: MiB, MB, GiB")
    study.paper_source = str(paper.get("source", ""))
    values = _mapping(paper.get("values"), f"{path}: paper.values")
    study.paper = {str(k): {str(b): float(x) for b, x in _mapping(v, f"{path}: paper.values.{k}").items()}
                   for k, v in values.items()}
    for i, r in enumerate(raw.get("ratios") or []):
        if not isinstance(r, dict) or not {"numerator", "denominator"} <= set(r) or \
                not set(r) <= {"numerator", "denominator", "target_max"}:
            raise ConfigError(f"{path}: ratios[{i}]: expected {{numerator, denominator[, target_max]}}")
        study.ratios.append(Ratio(str(r["numerator"]), str(r["denominator"]),
                                  None if r.get("target_max") is None else float(r["target_max"])))
    study.backbone_labels = {str(k): str(v) for k, v in _mapping(raw.get("backbone_labels"),
                                                                f"{path}: backbone_labels").items()}
    study.jobs = raw.get("jobs")
    _check_points(study)
    return study


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _check_points(study: Study) -> None:
    """Every point's run config must validate before anything runs (errors name the file and the point)."""
    from peft_dist.methods.registry import method_names

    present = set(method_names())
    for point in study.points():
        spec = study.method_spec(point["method"])
        if spec["name"] not in present:
            continue  # reported (skipped) when the study runs
        try:
            point_config(study, point)
        except ConfigError as e:
            raise ConfigError(f"{study.path}: point {_point_name(point)}: {e}") from None


def _point_name(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def point_raw_config(study: Study, point: dict[str, Any]) -> dict[str, Any]:
    """The RunConfig dict of one grid point: ``base`` + the point's axes + the method label's settings."""
    import copy

    raw = copy.deepcopy(study.base)
    spec = study.method_spec(point["method"])
    if spec.get("allocation") == "synthetic":
        spec.pop("synthetic", None)
        spec["allocation"] = "<synthetic>"
    raw.setdefault("model", {})["name"] = point["backbone"]
    raw["method"] = spec
    data = raw.setdefault("data", {})
    data.update(source="synthetic", batch_size=point["batch_size"])
    data.setdefault("eval_batch_size", max(1, study.eval_batch_size))
    raw.setdefault("train", {})["precision"] = point["dtype"]
    dist = raw.setdefault("dist", {})
    dist.update(engine=point["engine"], activation_checkpointing=point["activation_checkpointing"])
    raw.setdefault("tracking", {})["enabled"] = False
    return raw


def point_config(study: Study, point: dict[str, Any]):
    from peft_dist.config import config_from_dict

    raw = point_raw_config(study, point)
    synthetic = raw["method"].get("allocation") == "<synthetic>"
    if synthetic:  # checked with a stand-in for the file the worker writes
        raw["method"] = {"name": "linear"}
    cfg = config_from_dict(raw)
    from peft_dist.memory.estimator import resolve_plan

    resolve_plan(cfg, point["world_size"], study.device)
    return cfg


# ============================================================================================ SPT stand-in
def synthetic_spt_allocation(model, structured_type: str = "lora", rank: int = 8,
                             structured_ops: tuple[str, ...] = ("q", "v"), unstructured_per_fc1: int = 8192,
                             fixed_params: int | None = None) -> dict[str, Any]:
    """An SPT allocation document for ``model`` (a plain backbone, meta is fine) with structured modules on
    ``structured_ops`` of every block and ``unstructured_per_fc1`` evenly spaced entries in every fc1 weight; the
    single budget equals its total. Not a sensitivity result: a structural stand-in for memory studies."""
    from peft_dist.methods.spt_sensitivity import (ALLOCATION_FORMAT, ALLOCATION_VERSION, OPS, model_candidates,
                                                   structured_param_count)

    cands = model_candidates(model)
    blocks = 1 + max(c.block for c in cands if c.block is not None)
    table = [[0] * len(OPS) for _ in range(blocks)]
    unstructured: dict[str, list[int]] = {}
    structured_total = unstructured_total = 0
    for c in cands:
        if c.kind != "matrix":
            continue
        if c.op in structured_ops:
            table[c.block][OPS.index(c.op)] = 1
            structured_total += structured_param_count(structured_type, *c.shape, rank)
        elif c.op == "fc1" and unstructured_per_fc1 > 0:
            count = min(unstructured_per_fc1, c.numel)
            step = c.numel / count
            unstructured[c.key] = [int(i * step) for i in range(count)]
            unstructured_total += count
    if fixed_params is None:
        cls = getattr(model, "cls_token", None)
        fixed_params = int(cls.numel()) if cls is not None else 0
    total = structured_total + unstructured_total + fixed_params
    entry = {"budget_m": total / 1e6, "tau": 0, "total": total, "structured_total": structured_total,
             "vector_total": 0, "unstructured_total": unstructured_total, "tuned_matrices": table,
             "per_op": [sum(row[i] for row in table) for i in range(len(OPS))], "tuned_vectors": [],
             "unstructured": unstructured}
    return {"format": ALLOCATION_FORMAT, "version": ALLOCATION_VERSION, "structured_type": structured_type,
            "rank": int(rank), "alpha": 10.0, "beta": 5.0, "fixed_params": int(fixed_params), "ops": list(OPS),
            "num_blocks": blocks, "tensors": [[c.key, list(c.shape)] for c in cands], "sweep": [],
            "budgets": [entry], "metadata": {"synthetic": "peft_dist.memory.study.synthetic_spt_allocation"}}


def _synthetic_options(spec: dict[str, Any], cfg, folder: Path):
    """``options_at_depth`` for a method label with ``allocation: synthetic``: writes one file per traced depth."""
    import torch

    from peft_dist.methods.spt_sensitivity import write_allocation
    from peft_dist.models.backbone import create_backbone

    settings = dict(spec.get("synthetic") or {})
    options = {k: v for k, v in spec.items() if k not in ("name", "synthetic", "allocation", "budget")}
    structured_type = "adapter" if spec["name"] == "spt_adapter" else "lora"

    def at_depth(depth: int | None) -> dict[str, Any]:
        kwargs = dict(cfg.model.kwargs)
        if depth is not None:
            kwargs["depth"] = depth
        with torch.device("meta"):
            backbone = create_backbone(cfg.model.name, cfg.model.num_classes, None, **kwargs)
        doc = synthetic_spt_allocation(backbone, structured_type, int(settings.get("rank", 8)),
                                       tuple(settings.get("structured_ops", ("q", "v"))),
                                       int(settings.get("unstructured_per_fc1", 8192)))
        path = write_allocation(folder / f"{structured_type}_{cfg.model.name}_d{depth or 'full'}.json", doc)
        return {**options, "allocation": str(path), "budget": doc["budgets"][0]["budget_m"]}

    return at_depth


# ============================================================================================ one point
def run_point(study: Study, point: dict[str, Any], out_dir: Path, mode: str) -> dict[str, Any]:
    """Estimate (or measure) one grid point; returns its CSV row."""
    from peft_dist.methods.registry import method_names

    row: dict[str, Any] = {**{k: point[k] for k in AXES}, "method": point["method"]}
    spec = study.method_spec(point["method"])
    row["method_name"] = spec["name"]
    if spec["name"] not in method_names():
        row["status"] = "skipped: method not installed"
        return row
    started = time.perf_counter()
    try:
        report, backbone_params = _measure_or_estimate(study, point, spec, out_dir, mode)
    except Exception as e:  # one failing point must not lose the others: recorded and reported
        row["status"] = f"failed: {type(e).__name__}: {e}"
        row["seconds"] = round(time.perf_counter() - started, 2)
        return row
    row.update(params_bytes=report.params_bytes, grads_bytes=report.grads_bytes,
               optimizer_bytes=report.optimizer_state_bytes, activations_bytes=report.activations_bytes,
               peak_bytes=report.peak_bytes, params_frozen_bytes=report.params_frozen_bytes,
               params_trainable_bytes=report.params_trainable_bytes, buffers_bytes=report.buffers_bytes,
               peak_reserved_bytes=report.peak_reserved_bytes, backbone_params=backbone_params,
               source=report.source, status="ok", seconds=round(time.perf_counter() - started, 2),
               notes=" | ".join(report.notes))
    paper = study.paper.get(point["method"], {}).get(point["backbone"])
    if paper is not None:
        row["paper_mib"] = round(_to_mib(paper, study.paper_units), 1)
        row["ours_over_paper"] = round(report.peak_bytes / MIB / row["paper_mib"], 3)
    return row


def _to_mib(value: float, units: str) -> float:
    return {"MiB": value, "MB": value * 1e6 / MIB, "GiB": value * 1024}[units]


def _measure_or_estimate(study: Study, point: dict[str, Any], spec: dict[str, Any], out_dir: Path, mode: str):
    import torch

    from peft_dist.config import config_from_dict
    from peft_dist.memory.estimator import estimate
    from peft_dist.models.backbone import create_backbone

    raw = point_raw_config(study, point)
    options_at_depth = None
    if spec.get("allocation") == "synthetic":
        base_cfg = config_from_dict({**raw, "method": {"name": "linear"}})
        options_at_depth = _synthetic_options(spec, base_cfg, out_dir / "allocations")
        raw["method"] = {"name": spec["name"], **options_at_depth(None)}
    cfg = config_from_dict(raw)
    with torch.device("meta"):
        plain = create_backbone(cfg.model.name, cfg.model.num_classes, None, **cfg.model.kwargs)
    backbone_params = sum(p.numel() for p in plain.parameters())
    del plain
    attention = point.get("attention", "sdpa")
    if mode == "measure":
        if attention != "sdpa":
            raise ConfigError("attention=explicit is an estimate only (training runs timm's attention); use mode "
                              "estimate for it")
        return measure_point(cfg, point["world_size"], out_dir / "runs" / _slug(point)), backbone_params
    report = estimate(cfg, point["world_size"], device=study.device, eval_batch_size=study.eval_batch_size,
                      options_at_depth=options_at_depth, attention=attention)
    return report, backbone_params


def measure_point(cfg, world_size: int, run_dir: Path):
    """A short real run on this machine's GPU (world 1): the profiler's report of rank 0."""
    import torch

    from launcher.env import DistEnv
    from peft_dist.memory.profiler import read_memory_json
    from peft_dist.train.trainer import train

    if not torch.cuda.is_available():
        raise RuntimeError("mode measure needs a CUDA device; use mode estimate (or auto) on this machine")
    if world_size != 1 or cfg.dist.engine not in ("single",):
        raise RuntimeError("mode measure runs one process (engine single, world 1); estimate larger worlds")
    cfg.train.out_dir = str(run_dir)
    cfg.train.steps = 3
    cfg.train.progress = False
    cfg.data.synthetic_classes = cfg.model.num_classes
    torch.cuda.set_device(0)
    train(cfg, DistEnv(), torch.device("cuda", 0))
    return read_memory_json(run_dir / "memory.json")[0]


def _slug(point: dict[str, Any]) -> str:
    return "_".join(str(point[a]) for a in AXES).replace("/", "-")


def _run_point_job(args: tuple) -> dict[str, Any]:
    study_path, point, out_dir, mode = args
    import torch

    torch.set_num_threads(1)
    return run_point(load_study(study_path), point, Path(out_dir), mode)


# ============================================================================================ the whole study
def run_grid(study: Study, out_dir: str | Path, *, jobs: int = 1, mode: str | None = None,
             filters: dict[str, list[str]] | None = None, quiet: bool = False) -> list[dict[str, Any]]:
    """Run every grid point (``jobs`` worker processes), write CSV/Markdown/PNG, return the rows."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = mode or study.mode
    if mode == "auto":
        mode = "measure" if torch.cuda.is_available() else "estimate"
    points = [p for p in study.points() if _selected(p, filters or {})]
    if not points:
        raise ConfigError(f"--filter: no grid point of {study.path} matches {filters}")
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    log(f"study {study.name}: {len(points)} points, mode {mode}, {jobs} job(s) → {out_dir}")
    started = time.perf_counter()
    if jobs > 1 and mode == "estimate":
        import multiprocessing

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = []
            for row in pool.map(_run_point_job, [(str(study.path), p, str(out_dir), mode) for p in points]):
                _log_row(log, row)
                rows.append(row)
    else:
        rows = []
        for p in points:
            row = run_point(study, p, out_dir, mode)
            _log_row(log, row)
            rows.append(row)
    write_outputs(study, rows, out_dir)
    log(format_study(study, rows))
    log(f"study {study.name}: {time.perf_counter() - started:.1f} s; wrote {out_dir / (study.name + '.csv')}, "
        f"{out_dir / (study.name + '.md')} and the PNG plots")
    return rows


def _selected(point: dict[str, Any], filters: dict[str, list[str]]) -> bool:
    return all(str(point[k]).lower() in [v.lower() for v in vs] for k, vs in filters.items())


def _log_row(log, row: dict[str, Any]) -> None:
    if row.get("status") == "ok":
        log(f"  {row['method']:<16} {row['backbone']:<24} {row['engine']:<7} w{row['world_size']:<3} "
            f"peak {row['peak_bytes'] / MIB:>10,.1f} MiB  ({row['seconds']:.1f} s)")
    else:
        log(f"  {row['method']:<16} {row['backbone']:<24} {row['status']}")


def write_outputs(study: Study, rows: list[dict[str, Any]], out_dir: Path) -> None:
    from peft_dist.memory import plots

    with (out_dir / f"{study.name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
    (out_dir / f"{study.name}.md").write_text(format_study(study, rows, markdown=True) + "\n")
    ok = [r for r in rows if r.get("status") == "ok"]
    if ok:
        plots.memory_vs_backbone(ok, out_dir / f"{study.name}_vs_backbone.png", study.backbone_labels)
        plots.memory_vs_world(ok, out_dir / f"{study.name}_vs_world.png")
        plots.breakdown(ok, out_dir / f"{study.name}_breakdown.png", study.backbone_labels)


# ============================================================================================ tables
def _settings_key(row: dict[str, Any]) -> tuple:
    return (row["engine"], row["world_size"], row["batch_size"], row["dtype"], row["activation_checkpointing"],
            row.get("attention", "sdpa"))


def ratio_rows(study: Study, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per ratio and per (backbone, settings): ours, the paper's (when both figures are given) and the target."""
    index = {(r["method"], r["backbone"], _settings_key(r)): r for r in rows if r.get("status") == "ok"}
    out = []
    for ratio in study.ratios:
        for (label, backbone, settings), num in index.items():
            if label != ratio.numerator:
                continue
            den = index.get((ratio.denominator, backbone, settings))
            if den is None:
                continue
            ours = num["peak_bytes"] / den["peak_bytes"]
            pn = study.paper.get(ratio.numerator, {}).get(backbone)
            pd = study.paper.get(ratio.denominator, {}).get(backbone)
            out.append({"ratio": f"{ratio.numerator} / {ratio.denominator}", "backbone": backbone,
                        "attention": settings[-1],
                        "settings": settings, "ours": ours, "paper": pn / pd if pn and pd else None,
                        "target_max": ratio.target_max,
                        "meets_target": None if ratio.target_max is None else ours <= ratio.target_max})
    return out


def format_study(study: Study, rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """Per settings group: peak MiB per method (rows) and backbone (columns), the paper's figure and ours/paper beside
    it; then the ratios with the paper's and the targets; then skipped and failed points."""
    ok = [r for r in rows if r.get("status") == "ok"]
    label = lambda b: study.backbone_labels.get(b, b)  # noqa: E731
    lines = [f"# Memory study: {study.name}" if markdown else f"== memory study {study.name}"]
    if study.description:
        lines += ["", study.description.strip()]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in ok:
        groups.setdefault(_settings_key(r), []).append(r)
    for settings, group in groups.items():
        engine, world, batch, dtype, ac, attention = settings
        source = sorted({r["source"] for r in group})
        lines += ["", f"## {engine}, world {world}, batch {batch}/rank, {dtype}, activation checkpointing "
                      f"{'on' if ac else 'off'}, attention {attention} ({'/'.join(source)}; peak per rank, MiB)"]
        backbones = list(dict.fromkeys(r["backbone"] for r in group))
        methods = list(dict.fromkeys(r["method"] for r in group))
        cell = {(r["method"], r["backbone"]): r for r in group}
        header = ["method"] + [label(b) for b in backbones]
        table = [header]
        for m in methods:
            cells = [m]
            for b in backbones:
                r = cell.get((m, b))
                if r is None:
                    cells.append("")
                    continue
                text = f"{r['peak_bytes'] / MIB:,.0f}"
                if r.get("paper_mib"):
                    text += f" (paper {r['paper_mib']:,.0f}; ×{r['ours_over_paper']:.2f})"
                cells.append(text)
            table.append(cells)
        lines += _table(table, markdown)
        if len(group) > 1:
            lines += ["", "by category (MiB; they add up to the peak; activations = the rest)"]
            table = [["method", "backbone", "frozen", "trainable", "buffers", "grads", "optimizer", "activations"]]
            for r in group:
                columns = ("params_frozen_bytes", "params_trainable_bytes", "buffers_bytes", "grads_bytes",
                           "optimizer_bytes", "activations_bytes")
                table.append([r["method"], label(r["backbone"])] + [f"{(r.get(k) or 0) / MIB:,.1f}" for k in columns])
            lines += _table(table, markdown)
    ratios = ratio_rows(study, rows)
    if ratios:
        lines += ["", "## ratios of peak memory (ours vs paper)"]
        table = [["ratio", "backbone", "attention", "ours", "paper", "target", ""]]
        for r in ratios:
            verdict = "" if r["meets_target"] is None else ("meets" if r["meets_target"] else "MISSES")
            table.append([r["ratio"], label(r["backbone"]), r["settings"][-1], f"{r['ours']:.3f}",
                          "" if r["paper"] is None else f"{r['paper']:.3f}",
                          "" if r["target_max"] is None else f"≤ {r['target_max']:.2f}", verdict])
        lines += _table(table, markdown)
    if study.paper_source:
        lines += ["", f"paper figures: {study.paper_source} ({study.paper_units})"]
    other = [r for r in rows if r.get("status") != "ok"]
    for r in other:
        lines.append(f"note: {r['method']} on {label(r['backbone'])} ({r['engine']}, world {r['world_size']}): "
                     f"{r['status']}")
    return "\n".join(lines)


def _table(rows: list[list[str]], markdown: bool) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    if markdown:
        out = ["", "| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
        out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows[1:]]
        return out
    return [""] + ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                   for r in rows]


# ============================================================================================ CLI
def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """``peft-dist study --grid F``: memory over a grid (CSV + Markdown + PNG)."""
    parser.add_argument("--grid", required=True, help="grid file, e.g. configs/studies/snell_table_a8.yaml")
    parser.add_argument("--out", default=None, help="output directory (default runs/studies/<study>)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes for estimates (default: the grid's jobs, else min(2, CPUs))")
    parser.add_argument("--mode", choices=MODES, default=None, help="override the grid's mode")
    parser.add_argument("--filter", action="append", default=[], metavar="AXIS=V1,V2",
                        help="run only the points whose AXIS is one of the values (repeatable)")


def parse_filters(items: list[str]) -> dict[str, list[str]]:
    filters: dict[str, list[str]] = {}
    for item in items:
        axis, sep, values = item.partition("=")
        if not sep or axis not in AXES or not values:
            raise ConfigError(f"--filter {item!r}: expected AXIS=V1[,V2...] with AXIS one of {', '.join(AXES)}")
        filters.setdefault(axis, []).extend(v.strip() for v in values.split(","))
    return filters


def run_study(args: argparse.Namespace) -> int:
    study = load_study(args.grid)
    out = Path(args.out) if args.out else Path("runs") / "studies" / study.name
    jobs = args.jobs or study.jobs or max(1, min(2, os.cpu_count() or 1))
    rows = run_grid(study, out, jobs=jobs, mode=args.mode, filters=parse_filters(args.filter))
    failed = [r for r in rows if str(r.get("status", "")).startswith("failed")]
    summary = {"study": study.name, "points": len(rows), "ok": sum(r.get("status") == "ok" for r in rows),
               "skipped": sum(str(r.get("status", "")).startswith("skipped") for r in rows), "failed": len(failed),
               "ratios": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "settings"}
                          for r in ratio_rows(study, rows)]}
    print(json.dumps(summary))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peft_dist.memory.study", description=__doc__.splitlines()[0])
    add_study_arguments(parser)
    try:
        return run_study(parser.parse_args(argv))
    except ConfigError as e:
        print(f"peft-dist: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
