"""The study's PNG figures (matplotlib, Agg backend): memory vs backbone size per method (SNELL Fig. 3c), memory per
rank vs world size per engine, and the stacked breakdown by category. Each takes the study's CSV rows (dicts with
the columns of :data:`peft_dist.memory.study.CSV_COLUMNS`) and writes one file; with nothing to compare along the
x axis (one backbone, one world size) the figure is skipped and None returned."""
from __future__ import annotations

from pathlib import Path
from typing import Any

GIB = 2**30
CATEGORY_COLUMNS = (("params_frozen_bytes", "frozen params"), ("params_trainable_bytes", "trainable params"),
                    ("buffers_bytes", "buffers"), ("grads_bytes", "gradients"),
                    ("optimizer_bytes", "optimizer state"), ("activations_bytes", "activations (rest)"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series_key(row: dict[str, Any], *axes: str) -> str:
    return ", ".join(f"{row[a]}" for a in axes)


def _varying(rows: list[dict[str, Any]], axes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(a for a in axes if len({str(r[a]) for r in rows}) > 1)


def _series(rows: list[dict[str, Any]], line_axis: str, other_axes: tuple[str, ...]) -> dict[str, list[dict]]:
    """One line per value of ``line_axis``, split further by whichever of ``other_axes`` vary in the rows."""
    others = _varying(rows, other_axes)
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(_series_key(r, line_axis, *others), []).append(r)
    return series


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def memory_vs_backbone(rows: list[dict[str, Any]], path: Path, labels: dict[str, str] | None = None) -> Path | None:
    """Peak GiB per rank vs backbone parameters (millions), one line per method (and per other varying setting)."""
    if len({r["backbone"] for r in rows}) < 2:
        return None
    plt = _pyplot()
    series = _series(rows, "method", ("engine", "world_size", "batch_size", "dtype", "activation_checkpointing"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab20").colors
    markers = "osD^v<>p*h"
    for i, (name, points) in enumerate(series.items()):
        points = sorted(points, key=lambda r: r["backbone_params"])
        ax.plot([r["backbone_params"] / 1e6 for r in points], [r["peak_bytes"] / GIB for r in points],
                marker=markers[i % len(markers)], color=colors[(2 * i) % 20 + (i // 10) % 2], label=name)
    ticks = sorted({(r["backbone_params"], r["backbone"]) for r in rows})
    ax.set_xticks([t[0] / 1e6 for t in ticks])
    ax.set_xticklabels([f"{(labels or {}).get(b, b)}\n{n / 1e6:.0f}M" for n, b in ticks], fontsize=7)
    ax.set_xlabel("backbone (parameters)")
    ax.set_ylabel("peak memory per rank (GiB)")
    ax.set_title("memory vs backbone size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(plt, fig, path)


def memory_vs_world(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Peak GiB per rank vs world size (log2 axis), one line per engine (and per other varying setting)."""
    if len({int(r["world_size"]) for r in rows}) < 2:
        return None
    plt = _pyplot()
    series = _series(rows, "engine", ("backbone", "method", "batch_size", "dtype", "activation_checkpointing"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        points = sorted(points, key=lambda r: int(r["world_size"]))
        xs = [int(r["world_size"]) for r in points]
        ax.plot(xs, [r["peak_bytes"] / GIB for r in points], marker="o", label=f"{name} peak")
        ax.plot(xs, [r["params_frozen_bytes"] / GIB for r in points], linestyle=":", label=f"{name} frozen params")
    worlds = sorted({int(r["world_size"]) for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(worlds)
    ax.set_xticklabels([str(w) for w in worlds])
    ax.set_xlabel("world size (ranks)")
    ax.set_ylabel("memory per rank (GiB)")
    ax.set_title("memory per rank vs world size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def breakdown(rows: list[dict[str, Any]], path: Path, labels: dict[str, str] | None = None) -> Path:
    """Stacked bars: the categories of every grid point (they add up to its peak)."""
    plt = _pyplot()
    varying = _varying(rows, ("method", "backbone", "engine", "world_size", "batch_size", "dtype",
                              "activation_checkpointing")) or ("method",)
    names = []
    for r in rows:
        parts = [(labels or {}).get(str(r[a]), str(r[a])) if a == "backbone" else
                 (f"w{r[a]}" if a == "world_size" else str(r[a])) for a in varying]
        names.append("\n".join(parts))
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(rows) + 2), 5))
    bottoms = [0.0] * len(rows)
    for column, label in CATEGORY_COLUMNS:
        values = [float(r.get(column) or 0) / GIB for r in rows]
        ax.bar(range(len(rows)), values, bottom=bottoms, label=label)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, fontsize=6, rotation=90)
    ax.set_ylabel("GiB per rank")
    ax.set_title("memory by category at the peak")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)
