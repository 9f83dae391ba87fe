"""Spawned ranks of tests/test_sharded_init.py and benchmarks/sharded_init_memory.py."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_workers import init_gloo  # noqa: E402


def _batches(img_size: int, classes: int, n: int = 2):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(2, 3, img_size, img_size, generator=g), torch.randint(0, classes, (2,), generator=g))
            for _ in range(n)]


def full_values_after_build(rank: int, world: int, port: int, overrides: list[str], out_file: str):
    """Build a Trainer, gather every tensor of the model in full (rank 0 saves them), then train one step."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from launcher.env import read_dist_env
    from peft_dist.config import load_config
    from peft_dist.train.trainer import Trainer

    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    try:
        cfg = load_config(None, overrides)
        batches = _batches(cfg.data.img_size, cfg.model.num_classes)
        trainer = Trainer(cfg, read_dist_env(), torch.device("cpu"), batches, batches[:1])
        if cfg.dist.engine == "deepspeed":  # ZeRO-3: every parameter gathered
            full = trainer.engine.state_dict(adapters_only=False)
        else:
            full = get_model_state_dict(trainer.engine.module,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        trainer.fit()
        if rank == 0:
            save_file({k: v.contiguous() for k, v in full.items()}, out_file)
    finally:
        dist.destroy_process_group()


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def startup_peak_memory(rank: int, world: int, port: int, overrides: list[str], checkpoint: str, out_file: str):
    """Peak RSS increase of this rank while the Trainer builds (and materializes) the model, over the RSS after
    every import; then this rank's shards against the checkpoint's slices, and one training step."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    from launcher.env import read_dist_env
    from peft_dist.config import load_config
    from peft_dist.models.materialize import local_slices
    from peft_dist.train.trainer import Trainer

    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    try:
        cfg = load_config(None, overrides)
        batches = _batches(cfg.data.img_size, cfg.model.num_classes, n=1)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        baseline = _rss_kib("VmRSS")
        start = time.monotonic()
        trainer = Trainer(cfg, read_dist_env(), torch.device("cpu"), batches, batches)
        build_s = time.monotonic() - start
        peak, anon, mapped = _rss_kib("VmHWM"), _rss_kib("RssAnon"), _rss_kib("RssFile")
        mismatched = []
        with safe_open(checkpoint, framework="pt") as f:
            for name, p in trainer.engine.module.named_parameters():
                plain = name.replace(".base.", ".")
                if plain not in f.keys() or tuple(f.get_slice(plain).get_shape()) != tuple(p.shape):
                    continue  # the task's head, a resized position embedding
                if isinstance(p, DTensor):
                    local = p.to_local()
                    expected = f.get_slice(plain)[local_slices(p.shape, p.device_mesh, p.placements)]
                elif hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's span of the flattened tensor, zero-padded
                    local, size = p.ds_tensor.detach(), p.ds_tensor.numel()
                    flat = f.get_tensor(plain).flatten()[rank * size:(rank + 1) * size]
                    expected = torch.cat([flat, flat.new_zeros(size - flat.numel())])
                else:
                    local, expected = p, f.get_tensor(plain)
                if not torch.equal(local.detach(), expected):
                    mismatched.append(name)
        start = time.monotonic()
        trainer.fit()
        step_s = time.monotonic() - start
        Path(f"{out_file}.rank{rank}").write_text(json.dumps({
            "baseline_mib": baseline / 1024, "peak_increase_mib": (peak - baseline) / 1024,
            "after_build_anon_mib": anon / 1024, "after_build_file_mib": mapped / 1024, "build_s": build_s,
            "step_s": step_s, "mismatched": mismatched, "trained_steps": trainer.total_steps}))
    finally:
        dist.destroy_process_group()
