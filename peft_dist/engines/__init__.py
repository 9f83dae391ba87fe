"""Engines: parallelism applied *to* a plain adapter-injected model by a function (torchtitan's pattern)."""
from __future__ import annotations

import torch
from torch import nn

from launcher.env import DistEnv
from peft_dist.engines.engine import Engine

_ENGINES = {"single": "peft_dist.engines.engine:Engine", "ddp": "peft_dist.engines.ddp:DDPEngine",
            "fsdp2": "peft_dist.engines.fsdp2:FSDP2Engine", "deepspeed": "peft_dist.engines.deepspeed_engine:DeepSpeedEngine",
            "fairscale_oss": "peft_dist.engines.fairscale_oss:FairscaleOSSEngine"}


def engine_names() -> list[str]:
    return list(_ENGINES)


def parallelize(model: nn.Module, method, cfg, env: DistEnv, device: torch.device, total_steps: int,
                warmup_steps: int) -> Engine:
    """Wrap ``model`` (already injected and frozen by ``method``) in the engine ``cfg.dist.engine``."""
    import importlib

    module_name, _, cls_name = _ENGINES[cfg.dist.engine].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    if cfg.dist.engine == "single" and env.world_size > 1:
        raise RuntimeError(f"dist.engine=single but WORLD_SIZE={env.world_size}; use dist.engine=ddp")
    return cls(model, method, cfg, env, device, total_steps, warmup_steps)
