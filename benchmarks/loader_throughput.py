"""Training-loader throughput: decoded + augmented images per second per worker, exact sampling against resampled
streaming and stock webdataset, side by side.

Writes ``--samples`` synthetic 224x224 JPEGs (smooth random colour fields plus noise, so they compress and decode
like photographs rather than like white noise) as shards with ``peft_dist.data.write_shards``, then runs whole
training epochs of ``peft_dist.data.build_train_loader`` (``augment: flip`` = random resized crop + flip +
normalise, timm transforms): ``data.sampling: exact`` (indexed reads) with 1 and with 2 loader workers,
``resampled`` streaming with 1, and — as a reference — the stock webdataset 1.0.2 pipeline
(``WebDataset(resampled=True).shuffle().decode("pil").map(transform).batched()``) with 1 worker. All alternate round
by round (interleaved), and medians are reported.

Per configuration: ``images_per_s`` counts the images after the first batch over the time after it (steady state,
workers started and shuffle chunk filled); ``epoch_s`` is the whole epoch including worker start-up.
``images_per_s_per_worker`` divides the steady rate by the worker count. Wall-clock rates need free cores: on a
machine shared with other jobs they measure the contention. ``images_per_cpu_s_per_worker`` (the epoch's images
over the CPU seconds its joined workers used, start-up and prefetched-but-unused batches included) does not, so
the 1-vs-2-worker and ours-vs-stock comparisons are also given on that basis (``cpu_efficiency_*``: 1.0 = the same
work per image).

    python benchmarks/loader_throughput.py            # 512 samples, batch 32, 3 rounds
    python benchmarks/loader_throughput.py --quick    # 64 small samples, 1 round: a smoke test

The last line printed is one JSON object: ``exact_images_per_s_per_worker`` (1 worker),
``exact_over_stock_webdataset`` and ``resampled_over_stock_webdataset`` (1 worker each; the target is exact ≥ 0.9×
stock), ``exact_images_per_s_per_worker_2w``, ``speedup_2w_vs_1w`` (2-worker over 1-worker exact images/s; 2.0 is
perfect scaling), the CPU-second figures above and the 1-minute load average at the end.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def photo_like_jpegs(folder: Path, samples: int, size: int, classes: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(samples):
        coarse = Image.fromarray(rng.uniform(0, 255, (7, 7, 3)).astype(np.uint8))
        smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        pixels = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
        target = folder / f"class{i % classes}" / f"{i:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target, quality=90)


def children_cpu_s() -> float:
    """CPU seconds of this process's terminated (joined) children: the loader workers of finished epochs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_epoch(loader, epoch: int) -> dict[str, float]:
    """Seconds to the first batch and for the whole epoch, images after the first batch and in all, and the CPU
    seconds the epoch's workers used (counted once the loader has joined them at the end of the epoch)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    cpu_before = children_cpu_s()
    start = time.perf_counter()
    first = None
    images = after_first = 0
    for batch in loader:
        images += len(batch[0])
        if first is None:
            first = time.perf_counter() - start
        else:
            after_first += len(batch[0])
    total = time.perf_counter() - start
    gc.collect()  # the epoch's DataLoader iterator is gone: its workers are joined and their CPU time counted
    return {"first_s": first, "epoch_s": total, "images_after_first": after_first, "images": images,
            "worker_cpu_s": children_cpu_s() - cpu_before}


def stock_webdataset_loader(cfg, shard_dir: Path, batches: int):
    """The webdataset-documented training pipeline, for reference (trusted local shards: its decoders are fine)."""
    import webdataset as wds

    from peft_dist.data import read_info
    from peft_dist.data.transforms import build_transform

    info = read_info(shard_dir)
    urls = [str(p) for p in info.shard_paths(cfg.train_split)]
    transform = build_transform(cfg, train=True)
    dataset = (wds.WebDataset(urls, resampled=True, shardshuffle=False, seed=0)
               .shuffle(min(cfg.shuffle_buffer, batches * cfg.batch_size))
               .decode("pil").to_tuple("jpg", "cls").map_tuple(transform, int).batched(cfg.batch_size))
    return wds.WebLoader(dataset, batch_size=None, num_workers=1, persistent_workers=False).with_epoch(batches)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--augment", default="flip", choices=["none", "flip", "randaug"])
    p.add_argument("--quick", action="store_true", help="64 samples of 64x64, batch 16, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.img_size, args.batch_size, args.shard_size, args.rounds = 64, 64, 16, 16, 1

    import torch

    from peft_dist.config import DataConfig
    from peft_dist.data import build_train_loader, write_shards

    torch.set_num_threads(1)  # the main process only receives batches; leave the cores to the workers
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        tmp_path = Path(tmp)
        photo_like_jpegs(tmp_path / "images", args.samples, args.img_size, classes=10, seed=0)
        write_shards(f"folder:{tmp_path / 'images'}", tmp_path / "shards", shard_size=args.shard_size, seed=0)
        base = dict(path=str(tmp_path / "shards"), img_size=args.img_size, batch_size=args.batch_size,
                    augment=args.augment)
        batches = math.ceil(args.samples / args.batch_size)
        configs = {
            "exact_1w": (1, lambda: build_train_loader(DataConfig(**base, num_workers=1), 0, 1, seed=0)),
            "exact_2w": (2, lambda: build_train_loader(DataConfig(**base, num_workers=2), 0, 1, seed=0)),
            "resampled_1w": (1, lambda: build_train_loader(DataConfig(**base, num_workers=1, sampling="resampled"),
                                                           0, 1, seed=0)),
            "stock_webdataset_1w": (1, lambda: stock_webdataset_loader(DataConfig(**base), tmp_path / "shards",
                                                                        batches)),
        }
        rates: dict[str, list[float]] = {k: [] for k in configs}
        per_cpu: dict[str, list[float]] = {k: [] for k in configs}
        epochs: dict[str, list[float]] = {k: [] for k in configs}
        for r in range(args.rounds):
            for name, (_, make) in configs.items():  # interleaved: each round runs every configuration once
                m = time_epoch(make(), epoch=r)
                rates[name].append(m["images_after_first"] / max(m["epoch_s"] - m["first_s"], 1e-9))
                per_cpu[name].append(m["images"] / max(m["worker_cpu_s"], 1e-9))
                epochs[name].append(m["epoch_s"])
                print(f"round {r} {name}: {rates[name][-1]:.1f} images/s steady, epoch {m['epoch_s']:.2f} s "
                      f"(first batch after {m['first_s']:.2f} s), {per_cpu[name][-1]:.1f} images per worker "
                      f"CPU-second", file=sys.stderr)
    median = {k: statistics.median(v) for k, v in rates.items()}
    median_cpu = {k: statistics.median(v) for k, v in per_cpu.items()}
    result = {
        "exact_images_per_s_per_worker": median["exact_1w"],
        "exact_over_stock_webdataset": median["exact_1w"] / median["stock_webdataset_1w"],
        "resampled_over_stock_webdataset": median["resampled_1w"] / median["stock_webdataset_1w"],
        "exact_images_per_s_per_worker_2w": median["exact_2w"] / 2,
        "speedup_2w_vs_1w": median["exact_2w"] / median["exact_1w"],
        "images_per_cpu_s_per_worker": median_cpu,
        "cpu_efficiency_2w_vs_1w": median_cpu["exact_2w"] / median_cpu["exact_1w"],
        "cpu_efficiency_exact_vs_stock_webdataset": median_cpu["exact_1w"] / median_cpu["stock_webdataset_1w"],
        "images_per_s": median,
        "epoch_s": {k: statistics.median(v) for k, v in epochs.items()},
        "load_average_1m": os.getloadavg()[0],
        "config": {"samples": args.samples, "img_size": args.img_size, "batch_size": args.batch_size,
                   "augment": args.augment, "rounds": args.rounds, "cpus": os.cpu_count()},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
