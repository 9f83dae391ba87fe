"""The Engine the trainer sees (design.md "Backend"): one micro-batch forward+backward, one optimizer step.

The base class is the ``single`` engine; others override :meth:`wrap` (and, where the framework owns the
optimizer, :meth:`build_optimizer`). Engines know nothing about the method beyond its parameter groups and hooks.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from launcher.env import DistEnv
from peft_dist.config import RunConfig
from peft_dist.models.materialize import is_deferred


FP16_ENGINES = ("single", "ddp", "fsdp2")
"""Engines whose gradients ``torch.amp.GradScaler`` can unscale and check: plain local tensors (DDP's are already
averaged) and FSDP2's DTensor shards (the scaler's inf check is reduced over the mesh: torch PR #132816; FSDP2
needs no ShardedGradScaler, which is FSDP1's). DeepSpeed's flat partitions and OSS's sharded optimizer are not
offered fp16."""


def check_fp16_engine(engine: str) -> None:
    """One line naming the engines that take ``train.precision=fp16`` (the engines and the estimator ask)."""
    if engine not in FP16_ENGINES:
        from peft_dist.config import ConfigError

        raise ConfigError(f"train.precision=fp16: not available with dist.engine={engine} (it steps its own "
                          "optimizer over its own gradient partitions, which torch's gradient scaler cannot unscale "
                          f"and check); use dist.engine {', '.join(FP16_ENGINES[:-1])} or {FP16_ENGINES[-1]} (or "
                          "train.precision fp32 or bf16)")


class Engine:
    name = "single"
    forward_needs_all_ranks = False
    """True when a forward pass runs collectives (sharded weights): evaluation then keeps every rank in step."""

    def __init__(self, model: nn.Module, method, cfg: RunConfig, env: DistEnv, device: torch.device,
                 total_steps: int, warmup_steps: int, *, steps_per_epoch: int | None = None):
        # the plain (adapter-injected) model; one built on meta is materialized by its engine after sharding
        self.module = model if is_deferred(model) else model.to(device)
        self.method = method
        self.cfg = cfg
        self.env = env
        self.device = device
        self.precision = resolve_precision(cfg.train.precision, device)
        """``train.precision`` resolved for this device (``auto`` → bf16 or fp32); what the summary records."""
        if self.precision == "fp16":
            check_fp16_engine(self.name)
        # fp16 gradients of small adapters underflow without a scale; bf16's range needs none
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None
        self.scaler_skipped_steps = 0
        """Optimizer steps the gradient scaler skipped (inf/NaN in the scaled gradients; the scale was lowered)."""
        if cfg.dist.activation_checkpointing:
            apply_activation_checkpointing(self.module)  # before wrapping, so every engine recomputes the same way
        self.autocast_dtype = _autocast_dtype(self.precision)  # before wrap: an engine's wrap may drop it
        self.model = self.wrap(self.module)
        self.optimizer = self.build_optimizer()
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, total_steps, warmup_steps, steps_per_epoch)
        self.phase = lambda name: contextlib.nullcontext()  # the trainer plugs the memory profiler in here

    # ------------------------------------------------------------------ set-up
    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def build_optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.method.param_groups(self.module, self.cfg.optim.weight_decay), self.cfg.optim)

    # ------------------------------------------------------------------ training
    def no_sync(self) -> contextlib.AbstractContextManager:
        """Skip gradient synchronisation on all but the last micro-batch of an accumulation window."""
        return contextlib.nullcontext()

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, sync: bool = True) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the (detached) mean loss of this rank's micro-batch."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with (contextlib.nullcontext() if sync else self.no_sync()):
            with self.phase("forward"), self.autocast():
                logits = self.model(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.train.label_smoothing)
            with self.phase("backward"):
                scaled = loss / self.cfg.train.grad_accum
                (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
        return loss.detach()

    def step(self, step: int) -> float:
        """Clip, optimizer step, method hook (grads still readable), scheduler, zero grads. Returns the lr used.
        Under fp16 the gradients are unscaled first, so the clip norm applies to the true gradient (as timm's
        NativeScaler does); a step the scaler skips runs no method hook (its gradients hold inf/NaN)."""
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.grad_clip > 0:
            self.clip_grad_norm(self.cfg.optim.grad_clip)
        if self.scaler is None:
            self.optimizer.step()
            applied = True
        else:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            applied = self.scaler.get_scale() >= scale  # update() lowers the scale exactly when it found inf/NaN
            self.scaler_skipped_steps += not applied
        if applied:
            self.method.on_step_end(self.module, step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def grad_norm(self) -> torch.Tensor | None:
        """The global L2 norm of the trainable gradients, on the device (all ranks' shards: a collective under
        FSDP2); None where the engine cannot read its gradients before its step, or where a gradient scaler
        owns them (fp16: an overflow is the scaler's to skip, not a divergence)."""
        if self.scaler is not None:
            return None
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        norm = torch.nn.utils.get_total_norm(grads)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def skip_step(self) -> None:
        """Drop this step's gradients; the schedule still advances, so later steps keep their planned lr."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def clip_grad_norm(self, max_norm: float) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits from the unwrapped model: evaluation batches may differ per rank, so no collective may run."""
        with self.autocast():
            return self.module(images.to(self.device, non_blocking=True)).float()

    def train_mode(self, training: bool = True) -> None:
        self.model.train(training)

    # ------------------------------------------------------------------ state
    def scaler_state(self) -> dict[str, Any] | None:
        """The gradient scaler's state as plain values (the checkpoint manifest's JSON), None without fp16."""
        if self.scaler is None:
            return None
        return {**self.scaler.state_dict(), "skipped_steps": self.scaler_skipped_steps}

    def load_scaler_state(self, state: dict[str, Any] | None) -> None:
        if (state is None) != (self.scaler is None):
            from peft_dist.models.backbone import CheckpointError

            raise CheckpointError(f"the checkpoint was written {'without' if state is None else 'with'} a gradient "
                                  f"scaler, this run has train.precision={self.precision}")
        if state is not None:
            state = dict(state)
            self.scaler_skipped_steps = int(state.pop("skipped_steps"))
            self.scaler.load_state_dict(state)

    def state_dict(self, adapters_only: bool = True) -> dict[str, torch.Tensor]:
        """Adapter state (trainable tensors + injected buffers, see ``adapter_state_names``) of the plain model, on
        CPU, keyed as in the timm model; everything with ``adapters_only=False``."""
        from peft_dist.methods.base import adapter_state_names

        full = self.module.state_dict()
        if not adapters_only:
            return {k: v.detach().cpu() for k, v in full.items()}
        names = adapter_state_names(self.module)
        return {k: v.detach().cpu() for k, v in full.items() if k in names}

    def full_state(self):
        """The resumable state as full tensors keyed by FQN, on rank 0 (empty elsewhere): trainable tensors and
        adapter buffers, optimizer state and groups. Collective. Engines whose framework owns the optimizer's
        layout (DeepSpeed, OSS) override it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        from peft_dist.train.checkpoint import FullState

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer, options=opts)
        names = set(self.full_shapes())
        return FullState({k: v for k, v in model_sd.items() if k in names}, optim_sd.get("state", {}),
                         optim_sd.get("param_groups", []))

    def load_full_state(self, full) -> None:
        """Restore :meth:`full_state`'s output (read by every rank), resharded to this engine's layout."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        check_param_groups(self.param_group_fqns(), full.param_groups)
        set_state_dict(self.module, self.optimizer, model_state_dict=dict(full.model),
                       optim_state_dict={"state": dict(full.optimizer_state), "param_groups": full.param_groups},
                       options=StateDictOptions(full_state_dict=True, strict=False))

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        """The full (unsharded) shape of every tensor a checkpoint holds: trainable parameters, adapter buffers."""
        from peft_dist.methods.base import adapter_state_names

        names = adapter_state_names(self.module)
        tensors = {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}
        return {n: tuple(getattr(t, "ds_shape", t.shape)) for n, t in tensors.items() if n in names}

    def param_group_fqns(self) -> list[list[str]]:
        """The optimizer's groups as lists of parameter FQNs (the order the optimizer holds them in)."""
        fqn = {id(p): n for n, p in self.module.named_parameters()}
        return [[fqn[id(p)] for p in g["params"]] for g in self.optimizer.param_groups]

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        tensors = {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}
        unknown = [k for k in sd if k not in tensors]
        if unknown:
            raise KeyError(f"adapter state has tensors the model does not: {', '.join(unknown[:4])}")
        with torch.no_grad():
            for k, v in sd.items():
                tensors[k].copy_(v.to(tensors[k].device, tensors[k].dtype))


def check_param_groups(current: list[list[str]], saved: list[dict[str, Any]]) -> None:
    """A checkpoint's optimizer groups must hold the same parameters as this run's."""
    from peft_dist.models.backbone import CheckpointError

    saved_fqns = [list(g.get("params", [])) for g in saved]
    if len(saved_fqns) != len(current):
        raise CheckpointError(f"the checkpoint's optimizer has {len(saved_fqns)} parameter group(s), this run's "
                              f"{len(current)}")
    for i, (now, then) in enumerate(zip(current, saved_fqns)):
        if set(now) != set(then):
            extra = sorted(set(now) ^ set(then))
            raise CheckpointError(f"optimizer group {i} holds other parameters in the checkpoint than in this run, "
                                  f"e.g. {extra[0]}")


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Per-block non-reentrant recomputation through timm's own hook (module names stay unchanged)."""
    from timm.layers import set_reentrant_ckpt

    if not hasattr(model, "set_grad_checkpointing"):
        raise ValueError(f"dist.activation_checkpointing=true: {type(model).__name__} has no set_grad_checkpointing")
    set_reentrant_ckpt(False)
    model.set_grad_checkpointing(True)


# ---------------------------------------------------------------------- optimizer and schedule
def build_optimizer(groups: list[dict], cfg) -> torch.optim.Optimizer:
    if not groups:
        raise ValueError("the method left no trainable parameters; nothing to optimise")
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def lr_factor(step: int, total_steps: int, warmup_steps: int, base_lr: float, warmup_start_lr: float,
              min_lr: float) -> float:
    """Multiplier on ``base_lr`` at ``step`` of the ``cosine`` schedule (``peft_dist.train.schedule``)."""
    from peft_dist.train.schedule import cosine_factor

    return cosine_factor(step, total_steps, warmup_steps, base_lr, warmup_start_lr, min_lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int, warmup_steps: int,
                    steps_per_epoch: int | None = None):
    """The ``optim.schedule`` scheduler (``peft_dist.train.schedule``); stepped once per optimizer step."""
    from peft_dist.train.schedule import build_schedule

    return build_schedule(optimizer, cfg, total_steps, warmup_steps, steps_per_epoch)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on a CUDA device with native bf16 (compute capability 8.0+), fp32 elsewhere, including GPUs
    that only emulate bf16 (V100, T4: an emulated bf16 step is slower than fp32). ``auto`` never picks fp16: it
    needs a gradient scaler (``fp16`` asked for explicitly gets one). An explicit precision is taken as given."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"


def _autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def describe(engine: Engine) -> dict[str, Any]:
    return {"engine": engine.name, "world_size": engine.env.world_size, "device": str(engine.device)}
