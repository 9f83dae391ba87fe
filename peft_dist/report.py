"""``peft-dist report RUNS...``: the tables users compare with the papers (spec spt_arc_hta.md §4, §5.1).

Per method (runs of several seeds are averaged, with their standard deviation): top-1 per task, the three VTAB
group means, the **mean of the group means** (SPT/SNELL's convention) and the **mean over the 19 tasks** (HTA/ARC's)
— both, each labelled — the FGVC mean, trainable parameters with and without the head, peak memory and images/s.
Writes ``report.md``, ``report.csv`` and ``accuracy_vs_params.png``; where the runs are VTAB-1k or FGVC on ViT-B/16,
the papers' anchor rows are printed beside them.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peft_dist.config import ConfigError
from peft_dist.tasks import TASKS, VTAB_GROUPS, get_task

# ViT-B/16 IN-21k anchors (top-1 %). Group means and Grp from SNELL Table 1 / HTA Table 1 reprints
# (spec spt_arc_hta.md §4.1, snell_snella.md §6.1); Mean19 as printed by HTA Table 1; FGVC from SNELL Table 1.
ANCHORS_VIT_B16 = {
    "full": {"natural": 75.9, "specialized": 83.4, "structured": 47.6, "mean_groups": 69.0, "mean19": 65.6,
             "fgvc": 88.5},
    "linear": {"natural": 68.9, "specialized": 77.2, "structured": 26.9, "mean_groups": 57.7, "mean19": 52.9,
               "fgvc": 79.3},
    "bitfit": {"natural": 73.3, "specialized": 78.3, "structured": 44.1, "mean_groups": 65.2, "mean19": 62.1,
               "fgvc": 88.4},
    "adapter": {"natural": 79.0, "specialized": 84.1, "structured": 58.5, "mean_groups": 73.9, "mean19": 71.4},
    "lora": {"natural": 79.5, "specialized": 84.6, "structured": 60.5, "mean_groups": 74.9, "mean19": 72.3,
             "fgvc": 86.0},
    "arc": {"natural": 81.6, "specialized": 85.8, "structured": 60.0, "mean_groups": 75.8, "mean19": 73.4,
            "fgvc": 90.1},
    "hta": {"natural": 82.4, "specialized": 86.0, "structured": 62.3, "mean_groups": 76.9, "mean19": 74.7,
            "fgvc": 90.6},
    "spt_lora": {"natural": 81.9, "specialized": 85.9, "structured": 61.3, "mean_groups": 76.4, "fgvc": 90.1},
    "spt_adapter": {"natural": 82.0, "specialized": 85.8, "structured": 61.4, "mean_groups": 76.4, "fgvc": 89.8},
    "snell": {"natural": 82.7, "specialized": 86.1, "structured": 61.8, "mean_groups": 76.9, "mean19": 74.6,
              "fgvc": 91.8},
}
ANCHOR_NOTE = ("paper anchors: ViT-B/16 IN-21k, the papers' best-test-epoch protocol; LoRA/Adapter rows are SPT's "
               "runs; SNELL row is SNELL-32")


# ---------------------------------------------------------------------------------------------- arithmetic
def vtab_group_means(per_task: dict[str, float]) -> dict[str, float | None]:
    """Mean top-1 per VTAB group over the group's tasks present in ``per_task`` (``vtab/<name>`` keys); a group
    with a missing task gets None, as does every aggregate that needs it."""
    out: dict[str, float | None] = {}
    for group in VTAB_GROUPS:
        keys = [k for k, t in TASKS.items() if t.benchmark == "vtab" and t.group == group]
        out[group] = statistics.fmean(per_task[k] for k in keys) if all(k in per_task for k in keys) else None
    groups = [out[g] for g in VTAB_GROUPS]
    out["mean_groups"] = statistics.fmean(groups) if all(v is not None for v in groups) else None
    vtab_keys = [k for k, t in TASKS.items() if t.benchmark == "vtab"]
    out["mean19"] = statistics.fmean(per_task[k] for k in vtab_keys) if all(k in per_task for k in vtab_keys) \
        else None
    return out


def fgvc_mean(per_task: dict[str, float]) -> float | None:
    keys = [k for k, t in TASKS.items() if t.benchmark == "fgvc"]
    return statistics.fmean(per_task[k] for k in keys) if all(k in per_task for k in keys) else None


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    path: Path
    method: str
    label: str
    task: str
    model: str
    top1: float
    top1_paper: float | None
    trainable: int
    trainable_without_head: int
    peak_bytes: int
    images_per_s: float
    state_bytes: int = 0
    """Parameters + buffers + gradients + optimizer state of the largest rank (exact; 0 for older runs)."""
    peak_is_rss: bool = False
    """The peak is the process's max RSS (CPU runs), not the CUDA allocator's peak."""
    config: dict[str, Any] = field(default_factory=dict)
    """The run's resolved ``config.yaml``."""

    def setting(self, key: str) -> Any:
        """The value of ``section.key`` in the run's config (one line naming the key and the run if absent)."""
        section, _, name = key.partition(".")
        values = self.config.get(section) or {}
        if not name or name not in values:
            raise ConfigError(f"--best-of {key}: run {self.path} has no {key} in its config.yaml")
        return values[name]


def best_of(runs: list[Run], key: str, paper_protocol: bool = False) -> list[Run]:
    """Per method, task and seed, the run whose ``key`` (e.g. ``method.budget``) gave the best top-1, labelled
    with the key. SPT's protocol trains each task at every budget and reports the best (spec spt_arc_hta.md §1.6:
    {1.0, 0.8, 0.6, 0.4, 0.2} M, "per-task budget selection"): a choice on the test split, as the papers make
    it, so the label says which setting was chosen from."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        r.setting(key)
        seed = (r.config.get("train") or {}).get("seed")
        label = method_label({k: v for k, v in (r.config.get("method") or {}).items() if f"method.{k}" != key})
        groups.setdefault((label, r.task, seed), []).append(r)

    def score(r: Run) -> float:
        return r.top1_paper if paper_protocol and r.top1_paper is not None else r.top1

    chosen = []
    for (label, _, _), group in groups.items():
        best = max(group, key=score)
        chosen.append(dataclasses.replace(best, label=f"{label} (best {key} per task)"))
    return chosen


def method_label(method: dict[str, Any]) -> str:
    name = method.get("name", "?")
    rank = method.get("rank")
    return f"{name}-{rank}" if rank is not None else name


def read_run(path: Path) -> Run:
    summary_file, config_file = path / "summary.json", path / "config.yaml"
    for f in (summary_file, config_file):
        if not f.is_file():
            raise FileNotFoundError(f"not a finished run directory (no {f.name}): {f}")
    s = json.loads(summary_file.read_text())
    cfg = yaml.safe_load(config_file.read_text())
    task = s.get("task")
    if task:
        try:
            task = get_task(task).key
        except ValueError:
            pass
    return Run(path, s["method"], method_label(cfg.get("method", {})), task or path.name, s["model"],
               100 * s["top1"], 100 * s["top1_paper_protocol"] if "top1_paper_protocol" in s else None,
               s["trainable_params"], s["trainable_params_without_head"],
               max(s.get("peak_memory_bytes_per_rank") or [0]), s.get("images_per_s", float("nan")),
               max(s.get("state_memory_bytes_per_rank") or [0]), s.get("peak_memory_kind") == "rss", cfg)


@dataclass
class Row:
    label: str
    per_task: dict[str, list[float]] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)

    def mean(self, task: str) -> float:
        return statistics.fmean(self.per_task[task])

    def std(self, task: str) -> float:
        v = self.per_task[task]
        return statistics.stdev(v) if len(v) > 1 else 0.0


def build_rows(runs: list[Run], paper_protocol: bool = False) -> list[Row]:
    rows: dict[str, Row] = {}
    for r in runs:
        row = rows.setdefault(r.label, Row(r.label))
        value = r.top1_paper if paper_protocol and r.top1_paper is not None else r.top1
        row.per_task.setdefault(r.task, []).append(value)
        row.runs.append(r)
    return list(rows.values())


def row_figures(row: Row) -> dict[str, Any]:
    per_task = {t: row.mean(t) for t in row.per_task}
    figs: dict[str, Any] = {"method": row.label}
    for t in per_task:
        figs[t] = per_task[t]
        figs[f"{t} std"] = row.std(t)
    groups = vtab_group_means(per_task)
    figs.update({k: v for k, v in groups.items() if v is not None})
    fg = fgvc_mean(per_task)
    if fg is not None:
        figs["fgvc"] = fg
    figs["trainable_params_M"] = statistics.fmean(r.trainable for r in row.runs) / 1e6
    figs["trainable_params_without_head_M"] = statistics.fmean(r.trainable_without_head for r in row.runs) / 1e6
    figs["peak_memory_MiB"] = max(r.peak_bytes for r in row.runs) / 2**20
    figs["state_memory_MiB"] = max(r.state_bytes for r in row.runs) / 2**20
    figs["images_per_s"] = statistics.fmean(r.images_per_s for r in row.runs)
    figs["runs"] = len(row.runs)
    return figs


# ---------------------------------------------------------------------------------------------- output
AGG_LABELS = {"natural": "Natural", "specialized": "Specialized", "structured": "Structured",
              "mean_groups": "Mean of group means (SPT/SNELL)", "mean19": "Mean of 19 tasks (HTA/ARC)",
              "fgvc": "FGVC mean"}


def write_report(runs: list[Run], out_dir: Path, paper_protocol: bool = False) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [row_figures(r) for r in build_rows(runs, paper_protocol)]
    tasks = sorted({t for r in runs for t in [r.task]}, key=lambda t: (list(TASKS).index(t) if t in TASKS else 999,
                                                                       t))
    aggs = [a for a in AGG_LABELS if any(a in r for r in rows)]
    cols = ["method", *tasks, *aggs, "trainable_params_M", "trainable_params_without_head_M", "state_memory_MiB",
            "peak_memory_MiB", "images_per_s", "runs"]
    csv_path = out_dir / "report.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + [f"{t} std" for t in tasks], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)

    protocol = "paper protocol: best test epoch (test-set selection)" if paper_protocol else \
        "standard protocol: last epoch"
    rss = any(r.peak_is_rss for r in runs)
    header = ["method", *tasks, *(AGG_LABELS[a] for a in aggs), "trainable params", "w/o head",
              "state MiB", "peak RSS MiB" if rss else "peak MiB", "img/s"]
    lines = [f"top-1 % ({protocol}; mean ± std over seeds)", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["method"]]
        for t in tasks:
            cells.append(f"{r[t]:.1f} ± {r[f'{t} std']:.1f}" if t in r else "—")
        cells += [f"{r[a]:.1f}" if a in r else "—" for a in aggs]
        cells += [f"{1e6 * r['trainable_params_M']:,.0f}", f"{1e6 * r['trainable_params_without_head_M']:,.0f}",
                  f"{r['state_memory_MiB']:.1f}", f"{r['peak_memory_MiB']:.0f}", f"{r['images_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "state MiB: parameters + buffers + gradients + optimizer state of the largest rank, counted exactly."]
    if rss:
        lines.append("peak RSS MiB: CPU runs report the process's max resident set, which also holds whatever the "
                     "process did before (compare it across separate processes only).")
    anchors = anchor_rows(runs, aggs)
    if anchors:
        lines += ["", ANCHOR_NOTE, ""] + anchors
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(lines) + "\n")
    png_path = out_dir / "accuracy_vs_params.png"
    plot_accuracy_vs_params(rows, tasks, aggs, png_path)
    return {"markdown": md_path, "csv": csv_path, "png": png_path}


def anchor_rows(runs: list[Run], aggs: list[str]) -> list[str]:
    if not runs or not all(r.model == "vit_base_patch16_224" for r in runs):
        return []
    shown = aggs
    if not shown:
        return []
    lines = ["| paper | " + " | ".join(AGG_LABELS[a] for a in shown) + " |", "|" + "---|" * (len(shown) + 1)]
    for name in sorted({r.method for r in runs}):
        a = ANCHORS_VIT_B16.get(name)
        if a:
            lines.append(f"| {name} (paper) | " + " | ".join(f"{a[k]:.1f}" if k in a else "—" for k in shown) + " |")
    return lines if len(lines) > 2 else []


def plot_accuracy_vs_params(rows: list[dict], tasks: list[str], aggs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = next((a for a in ("mean_groups", "mean19", "fgvc") if a in aggs), None)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in rows:
        y = r.get(key) if key else statistics.fmean(r[t] for t in tasks if t in r)
        x = max(r["trainable_params_without_head_M"], 1e-4)
        ax.scatter([x], [y])
        ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters without head (M, log scale)")
    ax.set_ylabel(f"top-1 % ({AGG_LABELS[key] if key else 'mean over tasks'})")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories (each with summary.json and config.yaml)")
    p.add_argument("--out", default="report", help="output directory for report.md/.csv/.png")
    p.add_argument("--paper-protocol", action="store_true",
                   help="tabulate the best-test-epoch figures of runs trained with --paper-protocol (labelled)")
    p.add_argument("--best-of", metavar="KEY", default=None,
                   help="per method, task and seed keep the run whose config KEY (e.g. method.budget: SPT's budget "
                        "sweep) scored best; the row is labelled with KEY")


def run_report(args: argparse.Namespace) -> int:
    runs = [read_run(Path(p)) for p in args.runs]
    if args.best_of:
        runs = best_of(runs, args.best_of, args.paper_protocol)
    paths = write_report(runs, Path(args.out), args.paper_protocol)
    print(paths["markdown"].read_text())
    print(f"wrote {paths['markdown']}, {paths['csv']}, {paths['png']}")
    return 0


