"""Peak host memory per rank at start-up, sharded initialization (dist.init=sharded) against every rank building
the whole model (dist.init=full): ViT-B/16 measured on gloo ranks from a local safetensors file; ViT-H/14 computed
on the meta device from the sizes of its FSDP2 shards. The last line is JSON.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/sharded_init_memory.py [--ranks 4] [--img-size 224]
        [--engine fsdp2|zero3] [--checkpoint PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


ENGINES = {"fsdp2": ["dist.engine=fsdp2"], "zero3": ["dist.engine=deepspeed", "dist.zero_stage=3", "data.batch_size=1"]}


def write_vit_b(path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(timm.create_model("vit_base_patch16_224", pretrained=False).state_dict(), str(path))


def measure(ranks: int, checkpoint: Path, init: str, work: Path, img_size: int, engine: str) -> list[dict]:
    import torch.multiprocessing as mp

    from conftest import free_port
    from sharded_init_workers import startup_peak_memory

    overrides = ["model.name=vit_base_patch16_224", "model.num_classes=10", f"model.kwargs={{img_size: {img_size}}}",
                 f"data.img_size={img_size}", "method.name=lora",
                 *ENGINES[engine], f"model.checkpoint={checkpoint}", "train.steps=1", "train.progress=false",
                 "tracking.enabled=false", "memory.enabled=false", f"dist.init={init}",
                 f"train.out_dir={work / (init + '-run')}"]
    out = work / init
    mp.start_processes(startup_peak_memory, args=(ranks, free_port(), overrides, str(checkpoint), str(out)),
                       nprocs=ranks, join=True, start_method="spawn")
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(ranks)]


def sharded_bytes_on_meta(name: str, ranks: int) -> dict:
    """Per-rank bytes of a model's fp32 tensors under FSDP2's layout (``balanced_placement``, torch.chunk's uneven
    split, rank 0 the largest), the largest single tensor, and the whole model."""
    import timm

    from peft_dist.engines.fsdp2 import balanced_placement

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    place = balanced_placement(ranks)
    shard, largest, whole = 0, 0, 0
    for p in model.parameters():
        dim = place(p).dim
        rows = -(-p.shape[dim] // ranks)  # the first chunk, the largest
        shard += p.numel() // p.shape[dim] * rows * p.element_size()
        largest = max(largest, p.numel() * p.element_size())
        whole += p.numel() * p.element_size()
    return {"model_mib": whole / 2**20, "shard_mib": shard / 2**20, "largest_tensor_mib": largest / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--engine", choices=list(ENGINES), default="fsdp2")
    parser.add_argument("--img-size", type=int, default=224, help="32 keeps the one training step cheap on a CPU")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a ViT-B/16 safetensors file (written if absent)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sharded-init-") as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint or work / "vit_b.safetensors"
        if not checkpoint.is_file():
            write_vit_b(checkpoint)
        vit_b = {init: measure(args.ranks, checkpoint, init, work, args.img_size, args.engine) for init in ("sharded", "full")}
    for init, ranks in vit_b.items():
        for r, fig in enumerate(ranks):
            print(f"ViT-B {args.engine} {init:7s} rank {r}: peak RSS +{fig['peak_increase_mib']:.0f} MiB over "
                  f"{fig['baseline_mib']:.0f} MiB after imports (anon {fig['after_build_anon_mib']:.0f}, "
                  f"file-mapped {fig['after_build_file_mib']:.0f}); build {fig['build_s']:.1f} s")
    vit_h = {n: sharded_bytes_on_meta("vit_huge_patch14_224", n) for n in (args.ranks, 8)}
    for n, fig in vit_h.items():
        print(f"ViT-H/14 on {n} ranks (meta): model {fig['model_mib']:.0f} MiB; per rank, full build holds it all, "
              f"sharded {fig['shard_mib']:.0f} MiB of shards + {fig['largest_tensor_mib']:.0f} MiB largest tensor")
    print(json.dumps({"engine": args.engine, "ranks": args.ranks, "img_size": args.img_size, "vit_b": {init: [{k: round(v, 2) if isinstance(v, float) else v
                                                               for k, v in fig.items() if k != "mismatched"}
                                                              for fig in ranks] for init, ranks in vit_b.items()},
                      "vit_b_model_mib": sharded_bytes_on_meta("vit_base_patch16_224", args.ranks),
                      "vit_h": vit_h}))


if __name__ == "__main__":
    main()
