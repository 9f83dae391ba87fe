"""``peft-dist demo``: the product's main job, small enough for a laptop CPU.

1. writes the scikit-learn handwritten digits (1,797 real images, 10 classes) as webdataset shards;
2. adapts a small ViT with LoRA on 2 processes (DDP over gloo) streaming those shards;
3. evaluates, logs the run to MLflow (SQLite beside the run directory) and prints the summary.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", default="runs/demo", help="run directory (the shards go beside it)")
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) to train with")
    p.add_argument("--config", default=str(DEMO_CONFIG))
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for the training run")


def run_demo(args: argparse.Namespace) -> int:
    from launcher.local import launch
    from peft_dist.data.shards import write_shards

    out_dir = Path(args.out_dir).resolve()
    shards = out_dir.parent / f"{out_dir.name}-digits-shards"
    start = time.perf_counter()
    if not (shards / "_info.json").is_file():
        info = write_shards("digits", shards, shard_size=256, seed=0)
        print(f"wrote digits shards to {shards}: {json.dumps(info.get('splits', info))[:200]}")
    else:
        print(f"using the digits shards in {shards}")
    argv = ["train", "--config", args.config, f"data.path={shards}", f"train.out_dir={out_dir}",
            "train.overwrite=true", *args.overrides]  # each demo replaces the previous one
    status = launch(args.nproc, argv)
    if status != 0:
        return status
    summary = json.loads((out_dir / "summary.json").read_text())
    print(f"demo finished in {time.perf_counter() - start:.0f} s: top-1 {100 * summary['top1']:.1f} % "
          f"with {summary['trainable_params']:,} trainable parameters on {summary['world_size']} processes")
    return 0
