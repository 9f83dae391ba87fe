"""The checks only a GPU can make (issue 17), in one command for one H100/H200, meant to take under 8 minutes.

Sections (each one's failure is recorded in the JSON under ``errors`` and the others still run):

* ``estimator``: the CPU estimator's peak (``estimate(cfg, 1, device="cuda")``) against the measured peak of two
  training steps, ViT-B/16, ViT-L/16, ViT-H/14 × LoRA-8, SNELL-8 (merged) at batch 8 fp32 (SNELL's Table A8
  setting), with the profiler's per-phase peaks;
* ``shipped``: ``configs/vit_h_snell_fsdp2.yaml`` (bf16, FSDP2) at world 1 on synthetic data, estimated and measured;
* ``step``: ``benchmarks/snell_step.py --precision bf16 --batch 32`` on the GPU (SNELL-32 over LoRA-8 step time,
  merged split/fp32 against faithful), its JSON line as is;
* ``precision``: the CPU test's precision matrix (``tests/precision_fit.py``) under CUDA bf16 autocast;
* ``oom``: a forced out-of-memory step (ViT-H, batch 4096) must leave an allocator snapshot behind.

    python benchmarks/gpu_check.py            # prints one JSON line last
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

BACKBONES = {"vit_b16": "vit_base_patch16_224", "vit_l16": "vit_large_patch16_224", "vit_h14": "vit_huge_patch14_224"}
METHODS = {"lora8": ["method.name=lora", "method.rank=8", "method.alpha=8", "method.targets=[q,k,v,proj,fc1,fc2]"],
           "snell8": ["method.name=snell", "method.rank=8", "method.mode=merged"]}


def batches(cfg, n: int = 2):
    g = torch.Generator().manual_seed(0)
    size = cfg.data.img_size
    return [(torch.randn(cfg.data.batch_size, 3, size, size, generator=g),
             torch.randint(0, cfg.model.num_classes, (cfg.data.batch_size,), generator=g)) for _ in range(n)]


def measure(cfg) -> dict:
    """Two training steps on the GPU through the trainer; its summary's peak and memory.json's phase peaks."""
    from launcher.env import read_dist_env
    from peft_dist.train.trainer import Trainer

    data = batches(cfg)
    summary = Trainer(cfg, read_dist_env(), torch.device("cuda"), data, data[:1]).fit()
    memory = json.loads((Path(cfg.train.out_dir) / "memory.json").read_text())
    return {"peak_bytes": summary["peak_memory_bytes_per_rank"][0], "precision": summary["precision"],
            "memory": memory}


def run_config(base: list[str], out: Path, estimate_too: bool = True, config_file: Path | None = None) -> dict:
    from peft_dist.config import load_config
    from peft_dist.memory.estimator import estimate

    cfg = load_config(config_file, [*base, "data.source=synthetic", "tracking.enabled=false", "train.progress=false",
                             "train.steps=2", "train.save_every_steps=0", f"train.out_dir={out}"])
    row = {}
    if estimate_too:
        started = time.perf_counter()
        row["estimated_peak_bytes"] = estimate(cfg, 1, device="cuda").peak_allocated_bytes
        row["estimate_s"] = round(time.perf_counter() - started, 1)
    torch.cuda.empty_cache()
    row.update(measure(cfg))
    if estimate_too:
        row["estimated_over_measured"] = row["estimated_peak_bytes"] / row["peak_bytes"]
    return row


def section_estimator(tmp: Path) -> dict:
    rows = {}
    for bname, backbone in BACKBONES.items():
        for mname, method in METHODS.items():
            rows[f"{bname}/{mname}"] = run_config([f"model.name={backbone}", "model.num_classes=100",
                                                   "data.batch_size=8", "train.precision=fp32", "dist.engine=single",
                                                   *method], tmp / f"{bname}-{mname}")
    return rows


def section_shipped(tmp: Path) -> dict:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29531"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        return {"vit_h_snell_fsdp2": run_config(["data.path=null", "train.resume=none"], tmp / "shipped",
                                                config_file=ROOT / "configs" / "vit_h_snell_fsdp2.yaml")}
    finally:
        dist.destroy_process_group()


def section_step() -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "snell_step.py"), "--device", "cuda",
                          "--precision", "bf16", "--batch", "32", "--reps", "5"], capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def section_precision() -> dict:
    import precision_fit as pf

    rows = {}
    for spec in pf.CASES:
        case = pf.Case(*spec)
        case.model.cuda()
        x = pf.inputs().cuda()

        def forward():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return case.layer(x)

        y = forward()
        case.zero()
        rows[case.label()] = pf.relative_error(pf.fitted_delta(x, y, forward()).cpu(), case.reference)
    return rows


def section_oom(tmp: Path) -> dict:
    out = tmp / "oom"
    try:
        run_config(["model.name=vit_huge_patch14_224", "model.num_classes=100", "data.batch_size=4096",
                    "train.precision=fp32", "dist.engine=single", "memory.snapshot_on_oom=true", *METHODS["lora8"]],
                   out, estimate_too=False)
        return {"oom_raised": False}
    except torch.cuda.OutOfMemoryError:
        snapshots = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "snapshot" in str(p))
        return {"oom_raised": True, "snapshot_files": snapshots}
    finally:
        torch.cuda.empty_cache()


def main() -> None:
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        sys.exit(1)
    result, errors, seconds = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}, {}, {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tmp = Path(tmp)
        for name, fn in [("precision", section_precision), ("step", section_step),
                         ("estimator", lambda: section_estimator(tmp)), ("shipped", lambda: section_shipped(tmp)),
                         ("oom", lambda: section_oom(tmp))]:
            started = time.perf_counter()
            try:
                result[name] = fn()
            except Exception:  # noqa: BLE001 - one failed section must not hide the others' figures
                errors[name] = traceback.format_exc(limit=3)[-800:]
            seconds[name] = round(time.perf_counter() - started, 1)
            print(f"{name}: {seconds[name]} s{' (failed)' if name in errors else ''}", file=sys.stderr, flush=True)
    result.update(seconds=seconds, errors=errors)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
