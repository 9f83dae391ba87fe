"""Engines: parallelism applied *to* a plain adapter-injected model by a function (torchtitan's pattern)."""
from __future__ import annotations

import torch
from torch import nn

from launcher.env import DistEnv
from peft_dist.engines.engine import Engine

_ENGINES = {"single": "peft_dist.engines.engine:Engine", "ddp": "peft_dist.engines.ddp:DDPEngine",
            "fsdp2": "peft_dist.engines.fsdp2:FSDP2Engine", "deepspeed": "peft_dist.engines.deepspeed_engine:DeepSpeedEngine",
            "fairscale_oss": "peft_dist.engines.fairscale_oss:FairscaleOSSEngine"}


NEEDS_PROCESS_GROUP = ("ddp", "fsdp2", "fairscale_oss")
"""Engines that run on several processes only (DeepSpeed starts a one-rank group itself)."""


def engine_names() -> list[str]:
    return list(_ENGINES)


def check_engine_environment(engine: str, env: DistEnv) -> None:
    """``dist.engine`` must fit how the process was started: multi-process engines need a launcher's ranks, and
    ``single`` must not run as one of several ranks."""
    from peft_dist.config import ConfigError

    # a launcher's one-rank world is fine (a run resumed on fewer GPUs, a one-task SLURM job)
    if engine in NEEDS_PROCESS_GROUP and env.source == "single":
        raise ConfigError(f"dist.engine={engine}: needs a process group, but this process was started without a "
                          "launcher; launch with "
                          f"`peft-dist launch --nproc N -- train ...`, torchrun or srun, or use dist.engine=single")
    if engine == "single" and env.distributed:
        raise ConfigError(f"dist.engine=single: this process is rank {env.rank} of {env.world_size} "
                          f"({env.source}); use dist.engine=ddp (or fsdp2, deepspeed)")


def parallelize(model: nn.Module, method, cfg, env: DistEnv, device: torch.device, total_steps: int,
                warmup_steps: int, *, steps_per_epoch: int | None = None) -> Engine:
    """Wrap ``model`` (already injected and frozen by ``method``) in the engine ``cfg.dist.engine``.
    ``steps_per_epoch``: optimizer steps per epoch, for the per-epoch ``timm_epoch`` schedule."""
    import importlib

    check_engine_environment(cfg.dist.engine, env)
    module_name, _, cls_name = _ENGINES[cfg.dist.engine].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(model, method, cfg, env, device, total_steps, warmup_steps, steps_per_epoch=steps_per_epoch)
