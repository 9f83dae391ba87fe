"""``peft-dist`` command line: train | eval | export | shards | sensitivity | launch | demo.

Every user error (bad config, missing file, wrong shapes) ends as one line ``peft-dist: error: ...`` and exit
status 2; nothing is written before the config validates.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from launcher.env import EnvError
from launcher.preemption import PreemptionFlag
from peft_dist.config import ConfigError
from peft_dist.data.info import DataError
from peft_dist.methods.base import MergeError
from peft_dist.models.backbone import CheckpointError, check_model_config
from peft_dist.tasks import TaskError
from peft_dist.train.errors import Diverged

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, MergeError, FileNotFoundError,
                                                DataError, TaskError, EnvError, Diverged)


def _run_distributed(cfg, work: Callable):
    """Start the process group from the environment, run ``work(env, device)``, always tear the group down."""
    from launcher.env import read_dist_env
    from peft_dist.engines.process_group import destroy_process_group, init_process_group

    env = read_dist_env()
    device = init_process_group(env, cfg.dist.backend, cfg.dist.timeout_s)
    try:
        return env, work(env, device)
    finally:
        destroy_process_group()


def cmd_train(args: argparse.Namespace) -> int:
    from peft_dist.config import load_config, resolve_global_batch
    from peft_dist.train.trainer import train

    cfg = load_config(args.config, args.overrides + (["train.protocol=paper"] if args.paper_protocol else []))
    check_model_config(cfg.model, cfg.data.img_size)
    if args.dry_run:
        from launcher.dry_run import dry_run, format_report

        report = dry_run(resolve_global_batch(cfg, args.world_size), args.world_size)
        print(format_report(report))
        return 0
    from launcher.env import read_dist_env
    from peft_dist.engines import check_engine_environment

    launched = read_dist_env()
    check_engine_environment(cfg.dist.engine, launched)
    # data.global_batch_size: the per-rank batch and grad_accum follow from this launch's world size (torchrun's
    # or srun's variables), checked before any process group starts
    resolve_global_batch(cfg, launched.world_size)
    env, summary = _run_distributed(cfg, lambda env, device: train(cfg, env, device, preemption=args.preemption))
    if env.is_main:
        print_summary(summary, cfg.train.out_dir)
    return 0


def check_eval_classes(loader, cfg, run: str) -> None:
    """A run's model scores only the classes it was trained on: shards with another class count are refused."""
    classes = getattr(getattr(loader, "info", None), "num_classes", None)
    if classes is not None and classes != cfg.model.num_classes:
        data = f"data.path: {cfg.data.path}" if cfg.data.source == "shards" else \
            "data.synthetic_classes: the synthetic source"
        raise ConfigError(f"{data} holds {classes} classes, but the run {run} was trained with "
                          f"model.num_classes={cfg.model.num_classes}; evaluate it on data of its own classes")


def cmd_eval(args: argparse.Namespace) -> int:
    from launcher.env import read_dist_env
    from peft_dist.data import build_eval_loader
    from peft_dist.engines.process_group import all_reduce_sum
    from peft_dist.train.evaluate import load_run_config, restore_run

    cfg = load_run_config(args.run, args.overrides)
    check_model_config(cfg.model, cfg.data.img_size)
    env = read_dist_env()
    loader = build_eval_loader(cfg.data, env.rank, env.world_size)
    check_eval_classes(loader, cfg, args.run)
    cfg, model, _ = restore_run(args.run, args.overrides)

    def work(env, device):
        import torch

        model.to(device).eval()
        correct = total = 0
        with torch.no_grad():
            for batch in loader:
                logits = model(batch[0].to(device)).float()
                correct += int((logits.argmax(-1).cpu() == batch[1]).sum())
                total += int(batch[1].numel())
        correct, total = all_reduce_sum([correct, total], device)
        return {"top1": correct / max(total, 1), "samples": int(total), "split": cfg.data.eval_split}

    env, result = _run_distributed(cfg, work)
    if env.is_main:
        print(json.dumps(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from peft_dist.train.evaluate import export_run

    out = export_run(args.run, args.format, args.out)
    if args.format == "peft":
        print(f"wrote {out} (adapter_config.json + adapter_model.safetensors: peft.PeftModel.from_pretrained(model, "
              f"'{out}') on the timm backbone described in {out / 'base_model.json'})")
    else:
        print(f"wrote {out} (plain timm weights; create the model with the kwargs in {out.with_suffix('.json')})")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from launcher.local import launch

    return launch(args.nproc, args.argv)


def print_summary(summary: dict, out_dir: str) -> None:
    mib = [f"{b / 2**20:.0f} MiB" for b in summary["peak_memory_bytes_per_rank"]]
    print(f"\n== {summary['method']} on {summary['model']}, {summary['world_size']} process(es), "
          f"engine {summary['engine']}")
    print(f"top-1 ({summary['eval_split']}, last epoch): {100 * summary['top1']:.2f} %")
    if "top1_paper_protocol" in summary:
        print(f"top-1 {summary['protocol']}: {100 * summary['top1_paper_protocol']:.2f} % "
              f"(epoch {summary['top1_paper_protocol_epoch']:g})")
    print(f"trainable parameters: {summary['trainable_params']:,} "
          f"({summary['trainable_params_without_head']:,} without the head)")
    print(f"throughput: {summary['images_per_s']:.1f} images/s; wall time {summary['wall_time_s']:.1f} s; "
          f"steps {summary['steps']}")
    print(f"peak memory per rank: {', '.join(mib)}")
    memory_file = Path(out_dir) / "memory.json"
    if memory_file.is_file():
        from peft_dist.memory.profiler import format_memory_table, read_memory_json

        print("memory by category (MiB):")
        print(format_memory_table(read_memory_json(memory_file)))
    if summary.get("skipped_samples"):
        print(f"skipped corrupt samples: {summary['skipped_samples']}")
    print(f"run directory: {out_dir} (config.yaml, metrics.jsonl, summary.json, memory.json, adapter.safetensors)")
    if summary.get("mlflow_tracking_uri"):
        print(f"MLflow run {summary['mlflow_run_id']}: mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peft-dist", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a method on a backbone (one process, or under torchrun/launch)")
    t.add_argument("--config", action="append", default=None,
                   help="run config YAML; repeat to layer files (backbone, method, task), later ones win")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides")
    t.add_argument("--dry-run", action="store_true",
                   help="build, apply the method and shard on a fake process group with meta weights; report "
                        "per-rank memory; no training")
    t.add_argument("--world-size", type=int, default=8, help="world size of the --dry-run")
    t.add_argument("--paper-protocol", action="store_true",
                   help="also report the best test epoch, as the papers do (labelled as such); same as "
                        "train.protocol=paper")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="top-1 of a finished run on its eval split")
    e.add_argument("--run", required=True, help="run directory (holds config.yaml and adapter.safetensors)")
    e.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.eval_split=val")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="a run's adapters as a plain timm model.safetensors (merged) or a Hugging Face "
                                      "peft adapter directory (peft, LoRA runs)")
    x.add_argument("--run", required=True)
    x.add_argument("--format", default="merged", choices=["merged", "peft"],
                   help="merged: adapters folded into plain timm weights; peft: adapter_config.json + "
                        "adapter_model.safetensors for peft.PeftModel.from_pretrained (LoRA)")
    x.add_argument("--out", default=None,
                   help="output: a file for merged (default: RUN/model.safetensors), a directory for peft "
                        "(default: RUN/peft)")
    x.set_defaults(func=cmd_export)

    la = sub.add_parser("launch", help="start N local processes: peft-dist launch --nproc 2 -- train --config F")
    la.add_argument("--nproc", type=int, required=True)
    la.add_argument("argv", nargs=argparse.REMAINDER)
    la.set_defaults(func=cmd_launch)

    from peft_dist.report import add_report_arguments, run_report

    r = sub.add_parser("report", help="tables over finished runs: per task, VTAB group means, Mean19, FGVC mean")
    add_report_arguments(r)
    r.set_defaults(func=run_report)

    _optional_subcommands(sub)
    return p


_OPTIONAL_SUBCOMMANDS = [  # (name, module, add-arguments, run, help, needs a loaded config)
    ("shards", "peft_dist.data.shards", "add_shards_arguments", "run_shards",
     "write webdataset shards from an image folder, a list file, a VTAB/FGVC task folder or digits", False),
    ("sensitivity", "peft_dist.methods.spt_sensitivity", "add_sensitivity_arguments", "run_sensitivity",
     "SPT stage 1: sensitivity pass and allocation file", True),
    ("memory", "peft_dist.memory.estimator", "add_memory_arguments", "run_memory",
     "estimate per-rank memory on CPU for any backbone x method x engine x world size", False),
    ("study", "peft_dist.memory.study", "add_study_arguments", "run_study",
     "run a memory study over a grid: CSV, Markdown and plots", False),
    ("demo", "peft_dist.demo", "add_demo_arguments", "run_demo",
     "the main job: pre-train on digits 0-4 (cached) -> SNELL on 5-9 under fsdp2, 2 processes -> memory, MLflow",
     False),
]


def _optional_subcommands(sub) -> None:
    """Subcommands whose modules live in other packages (data, methods, memory); absent ones are not offered."""
    import importlib

    for name, module, add, run, help_text, needs_config in _OPTIONAL_SUBCOMMANDS:
        try:
            mod = importlib.import_module(module)
            add_arguments, run_fn = getattr(mod, add), getattr(mod, run)
        except (ImportError, AttributeError):
            continue
        s = sub.add_parser(name, help=help_text)
        add_arguments(s)
        s.set_defaults(func=_with_config(run_fn) if needs_config else run_fn)


def _with_config(fn: Callable) -> Callable:
    def run(args: argparse.Namespace) -> int:
        from peft_dist.config import load_config

        cfg = load_config(args.config, getattr(args, "overrides", []))
        check_model_config(cfg.model, cfg.data.img_size)
        return fn(cfg, args)

    return run


def main(argv: list[str] | None = None) -> int:
    # a SLURM signal while the process sets up (config, data, model, process group), trains, runs the final
    # evaluation or writes the summary is the trainer's to act on (launcher/preemption.py); only the interpreter's
    # and peft_dist's imports come before this line. Other commands keep the default actions.
    preemption = PreemptionFlag().install()
    try:
        args = build_parser().parse_args(argv)
        if args.command != "train" or args.dry_run:
            preemption.uninstall()
        args.preemption = preemption
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"peft-dist: error: {e}", file=sys.stderr)
        return 2
    finally:
        preemption.uninstall()


if __name__ == "__main__":
    sys.exit(main())
