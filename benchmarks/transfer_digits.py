"""A real transfer study that runs on 2 CPU cores in minutes (issue 10).

1. Pre-train a small ViT (4 blocks, 96 wide, 32x32 input, 8x8 patches) with full fine-tuning on scikit-learn's
   handwritten digits 0-4, as a local ``.safetensors`` checkpoint: the one ``make demo`` caches in
   ``runs/digits-pretrained/`` (``--runs``), reused when its recipe matches, written there otherwise.
2. Adapt that checkpoint to digits 5-9 with every method of the registry — linear probe and full fine-tuning
   included — over several seeds, through the real trainer and methods.
3. Print the report table (top-1 mean ± std, trainable parameters, peak memory, images/s) and, last, one JSON line.

The digits are real data (1,797 8x8 scans, upscaled); train/test is a stratified 80/20 split per half. With
``--sampling exact`` (the default) each half is the demo's PNG shards (``runs/digits-5to9-shards``, written by
``peft-dist shards`` through the list source, one shard per split) and trained through the real loader: every
epoch a new permutation of all training images, the last batch short.
``--sampling memory`` is the study as it ran before exact sampling: batches built in memory once, in one fixed
order every epoch, the remainder dropped.

    .venv/bin/python benchmarks/transfer_digits.py            # the full study (3 seeds)
    .venv/bin/python benchmarks/transfer_digits.py --quick    # 1 seed, 2 epochs (the cached backbone): a smoke test
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 96, "num_heads": 3}
METHOD_OPTIONS = {  # per method: options and learning rate for this small problem (same epochs for all)
    "full": ({}, 1e-3), "linear": ({}, 1e-2), "bitfit": ({}, 1e-2),
    "lora": ({"rank": 8, "targets": ["q", "v"]}, 1e-2), "adapter": ({"rank": 8}, 1e-2),
    "snell": ({"rank": 8}, 1e-2), "snella": ({"rank": 8}, 1e-2),
    "arc": ({}, 1e-2), "arc_att": ({}, 1e-2), "hta": ({}, 1e-2),
    "spt_lora": ({}, 1e-2), "spt_adapter": ({}, 1e-2), "sparse_masked": ({}, 1e-2),
}


def digit_halves(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    x = F.interpolate(x[:, None], size=MODEL["img_size"], mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target)
    halves = {}
    for name, classes in (("pretrain", range(0, 5)), ("transfer", range(5, 10))):
        idx = [i for i in range(len(y)) if int(y[i]) in classes]
        labels = [int(y[i]) - classes.start for i in idx]
        tr, te = train_test_split(idx, test_size=0.2, random_state=seed, stratify=labels)
        halves[name] = (x[tr], y[tr] - classes.start, x[te], y[te] - classes.start)
    return halves


def batches(x, y, bs, seed):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    x, y = x[order], y[order]
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(y) - bs + 1, bs)]


def run(method: str, options: dict, lr: float, data, out_dir: Path, checkpoint: Path | None, epochs: int,
        seed: int, shards: Path | None = None) -> dict:
    """``shards``: train through the loader (exact sampling) on that directory; else on in-memory batches."""
    from launcher.env import DistEnv
    from peft_dist.config import load_config
    from peft_dist.train.trainer import Trainer

    xtr, ytr, xte, yte = data
    kw = "{" + ", ".join(f"{k}: {v}" for k, v in MODEL.items()) + "}"
    source = ["data.source=synthetic"] if shards is None else [
        "data.source=shards", f"data.path={shards}", f"data.img_size={MODEL['img_size']}", "data.batch_size=32",
        "data.eval_batch_size=256", "data.num_workers=0", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"]
    overrides = ["model.name=vit_tiny_patch16_224", "model.num_classes=5", f"model.kwargs={kw}",
                 f"method.name={method}", *source, f"train.out_dir={out_dir}",
                 f"train.epochs={epochs}", f"train.seed={seed}", "train.progress=false", "tracking.enabled=false",
                 f"optim.lr={lr}", "optim.weight_decay=1e-4", "optim.warmup_epochs=1"]
    overrides += [f"method.{k}={json.dumps(v)}" for k, v in options.items()]
    if checkpoint is not None:
        overrides.append(f"model.checkpoint={checkpoint}")
    cfg = load_config(None, overrides)
    if shards is None:
        train = batches(xtr, ytr, 32, seed)
        test = [(xte[i:i + 256], yte[i:i + 256]) for i in range(0, len(yte), 256)]
        trainer = Trainer(cfg, DistEnv(), torch.device("cpu"), train, test)
    else:
        trainer = Trainer(cfg, DistEnv(), torch.device("cpu"))
    summary = trainer.fit()
    return {"trainer": trainer, "summary": summary}


SPT_BUDGET_M = 0.02
"""SPT's parameter budget for this 0.45 M-parameter backbone (millions, head excluded)."""


def spt_allocation(data, checkpoint: Path, out: Path, structured: str) -> dict:
    """SPT's stage 1 on the transfer half: squared-gradient sensitivity over 8 batches of the pre-trained model,
    then the allocation document for a few budgets; the methods read it (spec spt_arc_hta.md §1.2-1.3)."""
    import peft_dist
    from peft_dist.methods.spt_sensitivity import build_allocation, compute_sensitivity, write_allocation

    torch.manual_seed(0)
    model = peft_dist.create_backbone("vit_tiny_patch16_224", num_classes=5, checkpoint=checkpoint, **MODEL)
    scores = compute_sensitivity(model, batches(data[0], data[1], 32, 0), num_batches=8)
    doc = build_allocation(scores, structured_type=structured, budgets_m=(0.04, SPT_BUDGET_M, 0.01))
    write_allocation(out, doc)
    return {"allocation": str(out), "budget": SPT_BUDGET_M}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--pretrain-epochs", type=int, default=None,
                   help="default: the demo's recipe (peft_dist.demo.PRETRAIN_RECIPE), so its cached backbone is reused")
    p.add_argument("--runs", default=str(REPO / "runs"),
                   help="runs directory holding the cached pre-trained backbone and digit shards (make demo's)")
    p.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    p.add_argument("--out", default=None, help="keep the runs and report here (default: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="1 seed, 2 epochs")
    p.add_argument("--sampling", choices=["exact", "memory"], default="exact",
                   help="exact: PNG shards through the loader; memory: the fixed in-memory batches of before")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.epochs = 1, 2
    torch.set_num_threads(2)

    import peft_dist
    from peft_dist.data.digits import TRANSFER_DIGITS
    from peft_dist.demo import PRETRAIN_RECIPE, digits_half_shards, pretrained_digits_backbone
    from peft_dist.report import read_run, write_report

    root = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="transfer-digits-"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    halves = digit_halves()  # in memory: the --sampling memory batches and SPT's sensitivity pass
    shards = {"transfer": digits_half_shards(Path(a.runs).resolve(), TRANSFER_DIGITS) if a.sampling == "exact"
              else None}
    ckpt, pretrain = pretrained_digits_backbone(a.runs, epochs=a.pretrain_epochs or PRETRAIN_RECIPE["epochs"])
    print(f"pre-trained on digits 0-4: top-1 {100 * pretrain['top1_digits_0to4']:.1f} % -> {ckpt}", flush=True)

    methods = a.methods or [m for m in peft_dist.method_names() if m in METHOD_OPTIONS]
    run_dirs = []
    for method in methods:
        options, lr = METHOD_OPTIONS.get(method, ({}, 1e-2))
        options = dict(options)
        if method.startswith("spt_"):
            options.update(spt_allocation(halves["transfer"], ckpt, root / f"{method}-allocation.json",
                                          method.removeprefix("spt_")))
        for seed in range(a.seeds):
            d = root / f"{method}-seed{seed}"
            shutil.rmtree(d, ignore_errors=True)
            r = run(method, options, lr, halves["transfer"], d, ckpt, a.epochs, seed, shards["transfer"])
            print(f"{method:>14} seed {seed}: top-1 {100 * r['summary']['top1']:.1f} %", flush=True)
            run_dirs.append(d)

    runs = [read_run(d) for d in run_dirs]
    for r in runs:
        r.task = "digits 5-9"
    paths = write_report(runs, root / "report")
    print(paths["markdown"].read_text())
    by_method: dict[str, list[float]] = {}
    for r in runs:
        by_method.setdefault(r.method, []).append(r.top1)
    figures = {m: round(sum(v) / len(v), 2) for m, v in by_method.items()}
    linear = figures.get("linear")
    result = {"top1_mean_by_method": figures,
              "methods_above_linear_probe": sorted(m for m, v in figures.items() if linear is not None and v > linear),
              "pretrain_top1": round(100 * pretrain["top1_digits_0to4"], 2), "seeds": a.seeds, "epochs": a.epochs,
              "sampling": a.sampling,
              "wall_time_s": round(time.perf_counter() - start, 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
