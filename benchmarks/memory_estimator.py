"""The CPU memory estimator vs the same training step traced on real tensors, side by side in one run.

For each configuration (backbone × method, batch 8, fp32, single engine), three traces alternate (interleaved
repetitions): the estimator as shipped (fake tensors, depth extrapolation), the estimator tracing the full depth
(fake tensors, no extrapolation), and the reference: torch's MemTracker over real CPU tensors running the same
step (``estimate(..., fake=False)``). We report the peak ratio estimated / real (must be ≈ 1: fake tensors must
not change what is allocated), whether extrapolation equals the full-depth trace to the byte, and the median
wall time of each (the estimator's point is to be cheap: no weights, no arithmetic).

    python benchmarks/memory_estimator.py            # ViT-S/16 at 224² (12 blocks): LoRA-8, full, SNELL-8 merged
    python benchmarks/memory_estimator.py --quick    # a 4-block tiny ViT at 32², one repetition: a smoke test

The last line printed is one JSON object with ``peak_ratio_estimated_over_real_min`` / ``_max``,
``extrapolation_exact``, ``speedup_estimate_vs_real`` and ``speedup_extrapolated_vs_full_depth`` (medians over
configurations; > 1 means the estimator is faster).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from peft_dist.config import load_config
from peft_dist.memory.estimator import estimate

METHODS = {"lora-8": ["method.name=lora", "method.rank=8", "method.targets=[q,k,v,proj,fc1,fc2]"],
           "full": ["method.name=full"],
           "snell-8-merged": ["method.name=snell", "method.rank=8", "method.mode=merged"]}


def config(backbone: str, kwargs: str | None, method: list[str], batch: int):
    overrides = ["data.source=synthetic", "tracking.enabled=false", f"model.name={backbone}", "model.num_classes=10",
                 f"data.batch_size={batch}", "train.precision=fp32", *method]
    if kwargs:
        overrides.append(f"model.kwargs={kwargs}")
    return load_config(None, overrides)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny 4-block ViT at 32x32, one repetition")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repetitions (default 2; quick 1)")
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.quick:
        backbone, kwargs, batch = "vit_tiny_patch16_224", "{img_size: 32, patch_size: 8, depth: 4, embed_dim: 48, " \
                                                          "num_heads: 3}", 4
    else:
        backbone, kwargs, batch = "vit_small_patch16_224", None, 8
    repeats = args.repeats or (1 if args.quick else 2)
    rows = []
    for label, method in METHODS.items():
        cfg = config(backbone, kwargs, method, batch)
        times = {"estimate": [], "full_depth": [], "real": []}
        for _ in range(repeats):  # interleaved: the three runs share whatever load the machine has
            est, t = timed(lambda: estimate(cfg, 1, device="cpu", eval_batch_size=0))
            times["estimate"].append(t)
            full, t = timed(lambda: estimate(cfg, 1, device="cpu", eval_batch_size=0, extrapolate=False))
            times["full_depth"].append(t)
            real, t = timed(lambda: estimate(cfg, 1, device="cpu", eval_batch_size=0, fake=False,
                                             extrapolate=False))
            times["real"].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"method": label, "backbone": backbone, "batch": batch,
               "peak_estimated_mib": round(est.peak_allocated_bytes / 2**20, 2),
               "peak_real_mib": round(real.peak_allocated_bytes / 2**20, 2),
               "peak_ratio": est.peak_allocated_bytes / real.peak_allocated_bytes,
               "extrapolation_exact": est.phase_peak_allocated_bytes == full.phase_peak_allocated_bytes,
               "seconds": {k: round(v, 2) for k, v in med.items()}}
        rows.append(row)
        print(f"{label:<16} peak est {row['peak_estimated_mib']:>9.1f} MiB  real {row['peak_real_mib']:>9.1f} MiB  "
              f"ratio {row['peak_ratio']:.4f}  extrapolation exact {row['extrapolation_exact']}  "
              f"time est {med['estimate']:.1f} s / full depth {med['full_depth']:.1f} s / real {med['real']:.1f} s",
              flush=True)
    ratios = [r["peak_ratio"] for r in rows]
    result = {
        "benchmark": "memory_estimator", "quick": args.quick, "backbone": backbone, "batch": batch,
        "repeats": repeats, "configs": rows,
        "peak_ratio_estimated_over_real_min": round(min(ratios), 4),
        "peak_ratio_estimated_over_real_max": round(max(ratios), 4),
        "extrapolation_exact": all(r["extrapolation_exact"] for r in rows),
        "speedup_estimate_vs_real": round(statistics.median(r["seconds"]["real"] / r["seconds"]["estimate"]
                                                            for r in rows), 2),
        "speedup_extrapolated_vs_full_depth": round(statistics.median(
            r["seconds"]["full_depth"] / r["seconds"]["estimate"] for r in rows), 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
