"""Spawned ranks for tests/test_resume_engines.py: train, interrupt, resume, and compare checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist


class Interrupted(Exception):
    """Stands in for a killed job: raised on every rank at the same step, after that step's checkpoint."""


def run_trainer(rank: int, world: int, overrides: list[str], batches, stop_before: int | None = None):
    """One run on this rank's contiguous share of each global batch; ``stop_before``: raise before that step."""
    from launcher.env import DistEnv, read_dist_env
    from peft_dist.config import load_config
    from peft_dist.train.trainer import Trainer

    share = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in batches]
    trainer = Trainer(load_config(None, overrides), read_dist_env() if dist.is_initialized() else DistEnv(),
                      torch.device("cpu"), share, share)
    if stop_before is not None:
        original = trainer.train_step

        def train_step(step, stream):
            if step == stop_before:
                raise Interrupted(step)
            return original(step, stream)

        trainer.train_step = train_step
    try:
        trainer.fit()
    except Interrupted:
        pass
    return trainer


def straight_and_resumed(rank: int, world: int, port: int, straight: list[str], resumed: list[str], batches,
                         stop_before: int) -> None:
    """An uninterrupted run, then a run interrupted before ``stop_before`` and resumed (``resumed`` overrides)."""
    _init(rank, world, port)
    try:
        torch.set_num_threads(1)
        run_trainer(rank, world, straight, batches)
        run_trainer(rank, world, resumed, batches, stop_before=stop_before)
        run_trainer(rank, world, resumed + ["train.resume=auto"], batches)
    finally:
        _finish()


def interrupted(rank: int, world: int, port: int, overrides: list[str], batches, stop_before: int) -> None:
    _init(rank, world, port)
    try:
        torch.set_num_threads(1)
        run_trainer(rank, world, overrides, batches, stop_before=stop_before)
    finally:
        _finish()


def resume_and_compare(rank: int, world: int, port: int, overrides: list[str], batches, checkpoint: str,
                       result_file: str) -> None:
    """Resume at another world size; rank 0 writes whether the state the engine now holds (gathered again) equals
    the checkpoint's tensors bitwise, then the run trains to its end."""
    from safetensors.torch import load_file

    from peft_dist.train import checkpoint as ckpt
    from peft_dist.train.trainer import Trainer

    _init(rank, world, port)
    try:
        torch.set_num_threads(1)
        from launcher.env import read_dist_env
        from peft_dist.config import load_config

        share = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in batches]
        trainer = Trainer(load_config(None, overrides + [f"train.resume={checkpoint}"]), read_dist_env(),
                          torch.device("cpu"), share, share)
        full = trainer.engine.full_state()  # collective
        if rank == 0:
            saved_model = load_file(str(Path(checkpoint) / ckpt.MODEL_FILE))
            saved_optim = load_file(str(Path(checkpoint) / ckpt.OPTIMIZER_FILE))
            now_optim, _ = ckpt.flatten_optimizer_state(full.optimizer_state)
            result = {"start_step": trainer.start_step,
                      "model_keys_equal": sorted(saved_model) == sorted(full.model),
                      "optim_keys_equal": sorted(saved_optim) == sorted(now_optim),
                      "model_differs": [k for k in saved_model if k in full.model
                                        and not torch.equal(saved_model[k], full.model[k])],
                      "optim_differs": [k for k in saved_optim if k in now_optim
                                        and not torch.equal(saved_optim[k], now_optim[k].to(saved_optim[k].dtype))]}
            Path(result_file).write_text(json.dumps(result))
        trainer.fit()
    finally:
        _finish()


def _init(rank: int, world: int, port: int) -> None:
    from dist_workers import init_gloo

    init_gloo(rank, world, port)


def _finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
