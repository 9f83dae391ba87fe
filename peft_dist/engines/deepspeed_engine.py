"""``deepspeed``: ZeRO stage 1, 2 or 3 over the adapter-injected model (spec ecosystem.md §2).

Frozen parameters never enter the optimizer (we hand DeepSpeed a torch AdamW built from the trainable parameters
only; ZeRO-3 still partitions the frozen weights, which is the point of stage 3). DeepSpeed owns gradient
accumulation, clipping and the scheduler step, so this engine calls ``engine.step()`` after every micro-batch as
DeepSpeed expects. Methods with gradient-driven schedules (SNELLA) get full gradients through
``safe_get_full_grad`` and see θ_{t+1} (spec snell_snella.md §7.5). Checkpoints are DeepSpeed's own, with
``exclude_frozen_parameters=True``.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from peft_dist.engines.engine import Engine
from peft_dist.methods.base import Method

_TAG = "deepspeed"


def deepspeed_config(cfg, world_size: int, cuda: bool, trainable_elements: int | None = None,
                     precision: str | None = None) -> dict[str, Any]:
    """The generated DeepSpeed config; ``dist.deepspeed_config`` (a JSON file) is merged over it.

    ZeRO's default communication buckets hold 5e8 elements (2 GB in fp32), allocated whatever the trainable size; with
    only adapters trainable, buckets sized to the trainable elements do the same work in one bucket at a tiny cost.
    """
    zero: dict[str, Any] = {"stage": cfg.dist.zero_stage}
    if trainable_elements:
        bucket = int(min(5e8, max(2**20, trainable_elements)))
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * world_size,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # a torch AdamW over the trainable parameters only
        "gradient_clipping": cfg.optim.grad_clip,
        # precision: the engine's resolved one; without it (the memory estimator), auto counts as bf16 on CUDA
        "bf16": {"enabled": bool(cuda and (precision or cfg.train.precision) != "fp32")},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.dist.deepspeed_config:
        _merge(generated, json.loads(Path(cfg.dist.deepspeed_config).read_text()))
    return generated


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _ensure_process_group() -> None:
    """DeepSpeed needs a process group even on one rank: start a 1-rank gloo group on a free local port."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)


def register_adapter_parameters(model: nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters in that module's own pre-forward hook. A method's module that reads a
    wrapped layer's weight directly (SNELL's fused kernel reads ``base.weight`` without calling ``base``) would see
    the empty partition, so every parameter under an adapted module is registered as used by it."""
    import deepspeed

    from peft_dist.methods.base import AdaptedModule

    for module in model.modules():
        if isinstance(module, AdaptedModule):
            for p in module.parameters():
                deepspeed.zero.register_external_parameter(module, p)


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, model, method, cfg, env, device, total_steps, warmup_steps):
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed
        except ImportError:
            raise RuntimeError("dist.engine=deepspeed needs the extra: pip install 'peft-dist[deepspeed]'") from None
        _ensure_process_group()
        super().__init__(model, method, cfg, env, device, total_steps, warmup_steps)
        self.zero_stage = cfg.dist.zero_stage
        self.forward_needs_all_ranks = self.zero_stage == 3
        self.autocast_dtype = None  # DeepSpeed's bf16 mode casts the model itself
        trainable = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        ds_cfg = deepspeed_config(cfg, env.world_size, device.type == "cuda", trainable, self.precision)
        self.bf16 = ds_cfg["bf16"]["enabled"]
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=ds_cfg,
            dist_init_required=False)
        if self.zero_stage == 3:
            register_adapter_parameters(self.module)
        self.reads_gradients = type(method).on_step_end is not Method.on_step_end

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def gathered(self, params: list[nn.Parameter], modifier_rank: int | None = None):
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)

    # ------------------------------------------------------------------ training
    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, sync: bool = True) -> torch.Tensor:
        images = images.to(self.device, torch.bfloat16 if self.bf16 else torch.float32)
        labels = labels.to(self.device)
        with self.phase("forward"):
            logits = self.model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.train.label_smoothing)
        with self.phase("backward"):
            self.model.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        if not sync:
            self.model.step()  # not a boundary: DeepSpeed only counts the micro-step
        return loss.detach()

    def step(self, step: int) -> float:
        lr = self.optimizer.param_groups[0]["lr"]
        grads = {}
        if self.reads_gradients:
            from deepspeed.utils import safe_get_full_grad

            grads = {p: safe_get_full_grad(p) for p in self.trainable()}
        self.model.step()  # optimizer + scheduler + zero grads, at the accumulation boundary
        if self.reads_gradients:
            params = self.trainable()
            with self.gathered(params):
                for p in params:
                    p.grad = grads[p]
                self.method.on_step_end(self.module, step)
                for p in params:
                    p.grad = None
        return lr

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        return self.model(images.to(self.device, dtype)).float()

    # ------------------------------------------------------------------ state
    def state_dict(self, adapters_only: bool = True) -> dict[str, torch.Tensor]:
        """Full adapter state (parameters gathered under ZeRO-3); collective under ZeRO-3."""
        from peft_dist.methods.base import adapter_buffer_names

        names = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad or not adapters_only]
        buffers = dict(self.module.named_buffers())
        keep = adapter_buffer_names(self.module) if adapters_only else list(buffers)
        state = {n: b.detach().cpu().clone() for n, b in buffers.items() if n in keep}
        with self.gathered([p for _, p in names]):
            state.update({n: p.detach().float().cpu().clone() for n, p in names})
        return state

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        params = dict(self.module.named_parameters())
        buffers = dict(self.module.named_buffers())
        with self.gathered([params[k] for k in sd if k in params], modifier_rank=0), torch.no_grad():
            for k, v in sd.items():
                target = params.get(k, buffers.get(k))
                if target is None:
                    raise KeyError(f"adapter state has a tensor the model does not: {k}")
                target.copy_(v.to(target.dtype))

    def save(self, path) -> None:
        self.model.save_checkpoint(str(path), tag=_TAG, exclude_frozen_parameters=True)

    def load(self, path) -> None:
        from peft_dist.models.backbone import CheckpointError

        if not (Path(path) / _TAG).is_dir():
            raise CheckpointError(f"{path} is not a DeepSpeed checkpoint (no {_TAG}/ inside); resume it with the "
                                  "engine that wrote it")
        loaded, _ = self.model.load_checkpoint(str(path), tag=_TAG, load_module_strict=False,
                                               load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {path}")
