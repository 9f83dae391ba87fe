"""``peft-dist demo``: the product's story in under two minutes on a laptop CPU.

1. A small ViT (4 blocks, 96 wide, 32x32 input) is pre-trained on scikit-learn's real handwritten digits 0-4 with
   full fine-tuning, once: the checkpoint is cached in the runs directory (``digits-pretrained/``) and reused by
   later demos and by ``benchmarks/transfer_digits.py``. Linear probing of that backbone on the digits 5-9 is
   measured once beside it: the floor an adapter has to beat.
2. The backbone is adapted to the digits 5-9 (the papers' transfer setting) with SNELL-8 (kernelized low-rank +
   sparse deltas) under FSDP2 on 2 processes over gloo, the frozen backbone sharded over the ranks; the run is
   logged to MLflow (SQLite beside the run directory).
3. The summary puts the run's measured per-rank memory beside the same run replicated (DDP) and full fine-tuning,
   both from the memory estimator (fake tensors, labelled as estimated), and its top-1 beside linear probing;
   a PNG shows loss and eval top-1 over the steps and the model state by category per rank (step peaks above).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIG = REPO_CONFIGS / "demo_transfer.yaml"
PRETRAINED_DIR = "digits-pretrained"
"""Under the runs directory: the pre-trained backbone, its record and the linear-probe figure (reused)."""
PRETRAIN_RECIPE = {"epochs": 10, "lr": 2e-3, "seed": 0, "batch_size": 32}
"""Full fine-tuning on digits 0-4 (``benchmarks/transfer_digits.py --pretrain-epochs`` sets the epochs)."""
LINEAR_PROBE_RECIPE = {"epochs": 5, "lr": 2e-2, "seed": 0}
MEMORY_FIELDS = ("params_frozen", "params_trainable", "grads", "optimizer_state")


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", default="runs/demo",
                   help="run directory; the data, the pre-trained backbone and MLflow's store go beside it")
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) to adapt with")
    p.add_argument("--config", default=str(DEMO_CONFIG))
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for the adaptation run")


# ----------------------------------------------------------------------------------------------- cached inputs
def digits_half_shards(runs: Path, classes: range) -> Path:
    """The shards of one half of the digits under the runs directory, written on first use."""
    from peft_dist.data.digits import write_digits_subset_shards

    shards = runs / f"digits-{classes.start}to{classes.stop - 1}-shards"
    if not (shards / "_info.json").is_file():
        write_digits_subset_shards(shards, classes)
        print(f"wrote the digits {classes.start}-{classes.stop - 1} as shards: {shards}", flush=True)
    return shards


def _model_overrides(config: Path) -> list[str]:
    """model.name / model.kwargs of the demo config, so that pre-training builds the very backbone it adapts."""
    from peft_dist.config import load_config

    cfg = load_config(config)
    kwargs = "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in cfg.model.kwargs.items()) + "}"
    return [f"model.name={cfg.model.name}", f"model.kwargs={kwargs}", f"data.img_size={cfg.data.img_size}",
            f"data.mean={json.dumps(list(cfg.data.mean))}", f"data.std={json.dumps(list(cfg.data.std))}"]


def _train_in_process(overrides: list[str]) -> dict[str, Any]:
    """One run through the real trainer and loader in this process (no process group needed for one rank)."""
    import torch

    from launcher.env import DistEnv
    from peft_dist.config import load_config
    from peft_dist.train.trainer import Trainer

    # memory accounting off: these runs are inputs of the demo, and its CPU tracker costs time
    cfg = load_config(None, ["data.source=shards", "data.num_workers=0", "data.eval_batch_size=256",
                             "train.progress=false", "tracking.enabled=false", "train.overwrite=true",
                             "memory.enabled=false", *overrides])
    return Trainer(cfg, DistEnv(), torch.device("cpu")).fit()


def pretrained_digits_backbone(runs: str | Path, config: str | Path = DEMO_CONFIG,
                               epochs: int = PRETRAIN_RECIPE["epochs"]) -> tuple[Path, dict[str, Any]]:
    """The backbone pre-trained on the digits 0-4 (full fine-tuning), cached as ``RUNS/digits-pretrained/``
    ``backbone.safetensors`` with ``pretrain.json`` (recipe, model, top-1); reused when the recipe matches."""
    from safetensors.torch import save_file

    from peft_dist.data.digits import PRETRAIN_DIGITS

    runs = Path(runs).resolve()
    folder = runs / PRETRAINED_DIR
    checkpoint, record_file = folder / "backbone.safetensors", folder / "pretrain.json"
    model = _model_overrides(Path(config))
    recipe = {**PRETRAIN_RECIPE, "epochs": epochs, "model": model}
    if checkpoint.is_file() and record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("recipe") == recipe:
            return checkpoint, record
    shards = digits_half_shards(runs, PRETRAIN_DIGITS)
    print(f"pre-training the backbone on the digits 0-4 ({epochs} epochs, full fine-tuning, once) ...", flush=True)
    import torch

    import peft_dist
    from launcher.env import DistEnv
    from peft_dist.config import load_config
    from peft_dist.train.trainer import Trainer

    cfg = load_config(None, [*model, "model.num_classes=5", "method.name=full", "data.source=shards",
                             f"data.path={shards}", "data.num_workers=0", "data.eval_batch_size=256",
                             f"data.batch_size={recipe['batch_size']}", f"train.out_dir={folder / 'run'}",
                             f"train.epochs={epochs}", f"train.seed={recipe['seed']}", "train.progress=false",
                             "train.overwrite=true", "tracking.enabled=false", "memory.enabled=false",
                             f"optim.lr={recipe['lr']}", "optim.weight_decay=1e-4", "optim.warmup_epochs=1"])
    trainer = Trainer(cfg, DistEnv(), torch.device("cpu"))
    summary = trainer.fit()
    weights = {k: v.detach().contiguous() for k, v in peft_dist.merge(trainer.model).state_dict().items()}
    tmp = checkpoint.with_name(f".{checkpoint.name}.tmp")
    save_file(weights, str(tmp))
    tmp.replace(checkpoint)
    record = {"recipe": recipe, "top1_digits_0to4": summary["top1"], "wall_time_s": summary["wall_time_s"]}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    print(f"pre-trained on the digits 0-4: top-1 {100 * summary['top1']:.1f} % -> {checkpoint}", flush=True)
    return checkpoint, record


def linear_probe_top1(checkpoint: Path, transfer_shards: Path, config: Path) -> float:
    """Top-1 on the digits 5-9 of the head alone on the frozen backbone; measured once per backbone (cached)."""
    record_file = checkpoint.parent / "linear_probe.json"
    key = {**LINEAR_PROBE_RECIPE, "checkpoint_mtime_ns": checkpoint.stat().st_mtime_ns}
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("recipe") == key:
            return float(record["top1"])
    summary = _train_in_process([
        *_model_overrides(config), "model.num_classes=5", f"model.checkpoint={checkpoint}", "method.name=linear",
        f"data.path={transfer_shards}", f"train.out_dir={checkpoint.parent / 'linear-probe'}",
        f"train.epochs={LINEAR_PROBE_RECIPE['epochs']}", f"train.seed={LINEAR_PROBE_RECIPE['seed']}",
        f"optim.lr={LINEAR_PROBE_RECIPE['lr']}", "optim.warmup_epochs=1"])
    record_file.write_text(json.dumps({"recipe": key, "top1": summary["top1"]}, indent=2) + "\n")
    return float(summary["top1"])


# ----------------------------------------------------------------------------------------------- memory
def estimated_alternatives(run_dir: Path, world_size: int) -> dict[str, Any]:
    """The same run replicated (DDP) and full fine-tuning (DDP), per rank, from the memory estimator (the switched
    method drops SNELL's options, as on the command line)."""
    from peft_dist.config import load_config
    from peft_dist.memory.estimator import estimate

    # eval_batch_size=0: the training step only. The run's evaluation batches are smaller than eval_batch_size when
    # a rank holds fewer test images, which the estimator cannot know; the table compares step peaks.
    return {label: estimate(load_config(run_dir / "config.yaml", overrides), world_size, device="cpu",
                            eval_batch_size=0)
            for label, overrides in (("same run, replicated (ddp)", ["dist.engine=ddp"]),
                                     ("full fine-tuning (ddp)", ["dist.engine=ddp", "method.name=full"]))}


def step_peak(report) -> int | None:
    """The training step's peak (forward, backward, optimizer), without the evaluation forward."""
    phases = {k: v for k, v in (report.phase_peak_allocated_bytes or {}).items() if k != "eval"}
    return max(phases.values()) if phases else report.peak_allocated_bytes


def memory_comparison(measured: list, estimated: dict[str, Any]) -> str:
    """Per-rank state (what sharding divides) and peak of this run beside the estimated alternatives, in MiB."""
    from peft_dist.memory.profiler import MIB

    header = ("", "frozen", "trainable", "grads", "optimizer", "state", "step peak")
    rows = [header]

    def row(label, r, peak):
        state = sum(int(getattr(r, f"{f}_bytes") or 0) for f in MEMORY_FIELDS)
        return (label, *(f"{int(getattr(r, f'{f}_bytes') or 0) / MIB:.2f}" for f in MEMORY_FIELDS),
                f"{state / MIB:.2f}", "—" if peak is None else f"{peak / MIB:.1f}")

    for r in measured:
        rows.append(row(f"this run: snell, fsdp2 sharded, rank {r.rank} (measured)", r, step_peak(r)))
    for label, r in estimated.items():
        rows.append(row(f"{label}, per rank (estimated)", r, step_peak(r)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["memory per rank, MiB (state = frozen + trainable + grads + optimizer; estimated = peft-dist memory on "
             "fake tensors, not run; step peak = tracked tensors at the training step's peak)"]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- plot
def write_plot(run_dir: Path, summary: dict, measured: list, estimated: dict[str, Any], path: Path) -> Path:
    """Left: training loss and eval top-1 over the steps. Right: memory by category per rank, this run measured
    beside the estimated alternatives."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peft_dist.memory.profiler import CATEGORIES, MIB

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, (curves, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    curves.plot([r["step"] for r in records], [r["loss"] for r in records], color="tab:blue", label="training loss")
    curves.set_xlabel("step")
    curves.set_ylabel("training loss", color="tab:blue")
    top1 = curves.twinx()
    history = summary.get("eval_history") or [{"step": summary["steps"], "top1": summary["top1"]}]
    top1.plot([e["step"] for e in history], [100 * e["top1"] for e in history], "o-", color="tab:green",
              label="eval top-1")
    top1.set_ylabel("eval top-1 (%), digits 5-9", color="tab:green")
    curves.set_title(f"{summary['method']} on {summary['world_size']} ranks ({summary['engine']})")

    bars = [(f"rank {r.rank}\nmeasured\n(fsdp2)", r) for r in measured]
    bars += [(label.replace(" (", "\n(").replace(", ", ",\n") + "\nestimated", r) for label, r in estimated.items()]
    # Activations are left out of the stack: at the demo's scale they dwarf the model state, which is what
    # sharding and PEFT divide; each bar's peak, activations included, is written above it.
    bottom = [0.0] * len(bars)
    for category in (c for c in CATEGORIES if c != "activations"):
        heights = [int(getattr(r, f"{category}_bytes") or 0) / MIB for _, r in bars]
        memory.bar(range(len(bars)), heights, bottom=bottom, label=category.replace("_", " "))
        bottom = [b + h for b, h in zip(bottom, heights)]
    for i, (_, r) in enumerate(bars):
        if step_peak(r):
            memory.annotate(f"step peak {step_peak(r) / MIB:.1f}", (i, bottom[i]), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
    memory.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=7)
    memory.set_ylabel("MiB per rank")
    memory.set_title("model state per rank (training step's peak, activations included, above each bar)")
    memory.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_to_mlflow(summary: dict, files: list[Path], metrics: dict[str, float]) -> None:
    """The plot and the comparison figures join the run's MLflow entry (the trainer logged everything else)."""
    if not summary.get("mlflow_tracking_uri"):
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["mlflow_tracking_uri"])
    for f in files:
        client.log_artifact(summary["mlflow_run_id"], str(f))
    for name, value in metrics.items():
        client.log_metric(summary["mlflow_run_id"], name, value)


# ----------------------------------------------------------------------------------------------- the job
def run_demo(args: argparse.Namespace) -> int:
    from launcher.local import launch
    from peft_dist.data.digits import TRANSFER_DIGITS
    from peft_dist.memory.profiler import read_memory_json

    start = time.perf_counter()
    out_dir = Path(args.out_dir).resolve()
    runs = out_dir.parent
    config = Path(args.config).resolve()
    checkpoint, pretrain = pretrained_digits_backbone(runs, config)
    transfer = digits_half_shards(runs, TRANSFER_DIGITS)
    argv = ["train", "--config", str(config), f"model.checkpoint={checkpoint}", f"data.path={transfer}",
            f"train.out_dir={out_dir}", "train.overwrite=true", *args.overrides]  # each demo replaces the last
    print(f"adapting to the digits 5-9 on {args.nproc} processes: peft-dist launch --nproc {args.nproc} -- "
          f"{' '.join(argv)}", flush=True)
    status = launch(args.nproc, argv)
    if status != 0:
        return status
    summary = json.loads((out_dir / "summary.json").read_text())
    measured = read_memory_json(out_dir / "memory.json")
    estimated = estimated_alternatives(out_dir, summary["world_size"])
    probe = linear_probe_top1(checkpoint, transfer, config)
    plot = write_plot(out_dir, summary, measured, estimated, out_dir / "demo.png")
    ddp, full = (estimated[k] for k in estimated)

    def state(r) -> int:
        return sum(int(getattr(r, f"{f}_bytes") or 0) for f in MEMORY_FIELDS)

    busiest = max(state(r) for r in measured)
    log_to_mlflow(summary, [plot], {"linear_probe_top1": probe, "estimated_state_bytes_ddp": state(ddp),
                                    "estimated_state_bytes_full_ddp": state(full)})
    print()
    print(memory_comparison(measured, estimated))
    print(f"per-rank state: {busiest / state(ddp):.2f}x the replicated run's, {busiest / state(full):.3f}x full "
          f"fine-tuning's (estimated)")
    print(f"top-1 on the digits 5-9: {summary['method']} {100 * summary['top1']:.1f} % vs linear probing "
          f"{100 * probe:.1f} % of the same backbone (pre-trained on 0-4: {100 * pretrain['top1_digits_0to4']:.1f} %)")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    print(f"plot: {plot}")
    print(f"adapter: {out_dir / 'adapter.safetensors'}")
    if summary.get("mlflow_tracking_uri"):
        print(f"mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}")
    return 0
