"""``deepspeed``: ZeRO stage 1, 2 or 3 over the adapter-injected model (spec ecosystem.md §2).

Frozen parameters never enter the optimizer (we hand DeepSpeed a torch AdamW built from the trainable parameters
only; ZeRO-3 still partitions the frozen weights, which is the point of stage 3). DeepSpeed owns gradient
accumulation, clipping and the scheduler step, so this engine calls ``engine.step()`` after every micro-batch as
DeepSpeed expects. Methods with gradient-driven schedules (SNELLA) get full gradients through
``safe_get_full_grad`` and see θ_{t+1} (spec snell_snella.md §7.5). Checkpoints are the project's pickle-free
format (``peft_dist.train.checkpoint``): full fp32 tensors assembled through DeepSpeed's tensor-fragment API, so
they load at any world size and ZeRO stage (DeepSpeed's own checkpoints are pickles, per rank).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from peft_dist.engines.engine import Engine
from peft_dist.methods.base import Method
from peft_dist.models.materialize import is_deferred, materialize_zero3

def deepspeed_config(cfg, world_size: int, cuda: bool, trainable_elements: int | None = None) -> dict[str, Any]:
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
        # DeepSpeed's bf16 mode casts the whole module, adapters included (SNELL's kernel then comes from bf16
        # factors, SNELLA's fp32 gradients meet bf16 parameters) and reduces gradients in bf16: the engine runs bf16
        # as autocast over bf16 frozen weights instead, so DeepSpeed sees fp32 adapters, gradients and Adam state
        "bf16": {"enabled": False},
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


def cast_frozen_matrices(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen weights of Linear and Conv layers in ``dtype`` (``dist.frozen_dtype=bf16``): they hold the
    memory, and autocast casts them to ``dtype`` for each GEMM anyway, so a LoRA forward is unchanged. Everything
    else stays fp32: position tables and tokens are added to the fp32 residual stream, and CPU autocast refuses a
    bf16 LayerNorm scale on fp32 activations. Methods that read W0 themselves (SNELL's merged kernel) see it rounded
    to bf16, as under FSDP2's ``frozen_dtype``."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            w = module.weight
            if not w.requires_grad and w.is_floating_point():
                w.data = w.data.to(dtype)


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


def device_rank(device: torch.device) -> int:
    """The accelerator index DeepSpeed should use (``args.device_rank``, read before LOCAL_RANK): the device
    ``pick_device`` chose, so a task whose local rank exceeds the GPUs it sees still lands on its own GPU. The CPU
    accelerator ignores the index (any value >= 0 keeps DeepSpeed's multi-rank set-up)."""
    return device.index if device.type == "cuda" and device.index is not None else 0


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, model, method, cfg, env, device, total_steps, warmup_steps, *, steps_per_epoch=None):
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed
        except ImportError:
            raise RuntimeError("dist.engine=deepspeed needs the extra: pip install 'peft-dist[deepspeed]'") from None
        if cfg.train.on_nonfinite == "skip":
            from peft_dist.config import ConfigError

            raise ConfigError("train.on_nonfinite=skip is not available with dist.engine=deepspeed (DeepSpeed "
                              "applies the step itself); use train.on_nonfinite=stop")
        # DeepSpeed asserts on LOCAL_RANK (init_process_group sets it; a Trainer built directly may not have) and
        # takes it for the GPU index unless told the device: it gets the one this process picked (device_rank)
        os.environ["LOCAL_RANK"] = str(env.local_rank)
        _ensure_process_group()
        super().__init__(model, method, cfg, env, device, total_steps, warmup_steps, steps_per_epoch=steps_per_epoch)
        self.group_fqns = self.param_group_fqns()  # before DeepSpeed replaces the groups' parameters by flat ones
        self.zero_stage = cfg.dist.zero_stage
        self.forward_needs_all_ranks = self.zero_stage == 3
        trainable = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        ds_cfg = deepspeed_config(cfg, env.world_size, device.type == "cuda", trainable)
        self.bf16 = bool(ds_cfg.get("bf16", {}).get("enabled"))
        """DeepSpeed's own bf16 mode, only when a ``dist.deepspeed_config`` file asks for it (it casts the adapters
        too); otherwise bf16 is autocast (``self.autocast_dtype``) over frozen weights stored in bf16."""
        if self.bf16:
            self.autocast_dtype = None
        if cfg.dist.frozen_dtype == "bf16":
            if self.autocast_dtype is None:
                from peft_dist.config import ConfigError

                raise ConfigError("dist.frozen_dtype=bf16 needs bf16 compute under autocast (train.precision bf16, "
                                  "or auto on a GPU with bf16, and no bf16 section in dist.deepspeed_config)")
            cast_frozen_matrices(self.module, self.autocast_dtype)
        if is_deferred(self.module):  # built on meta (dist.init=sharded, ZeRO-3): partitioned as it is filled
            materialize_zero3(self.module, ds_cfg)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            args=SimpleNamespace(device_rank=device_rank(device)), model=self.module, optimizer=self.optimizer,
            lr_scheduler=self.scheduler, config=ds_cfg, dist_init_required=False)
        if self.zero_stage == 3:
            register_adapter_parameters(self.module)
        self.reads_gradients = type(method).on_step_end is not Method.on_step_end

    def grad_norm(self) -> None:
        """Not readable before DeepSpeed's step (its gradients live in partitioned flat buffers): the divergence
        guard checks the loss only."""
        return None

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
        with self.phase("forward"), self.autocast():
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
        with self.autocast():
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

    # ------------------------------------------------------------------ checkpoints (full, any world size)
    def optimizer_state_keys(self) -> list[str]:
        """The per-parameter tensors of the optimizer; fixed by the config, so every rank asks for the same ones
        (gathering them is collective)."""
        o = self.cfg.optim
        return ["exp_avg", "exp_avg_sq"] if o.name == "adamw" else (["momentum_buffer"] if o.momentum else [])

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _link_optimizer_state(self) -> None:
        """Make every ZeRO partition's optimizer state exist and be reachable through the tensor-fragment API.

        torch creates Adam's moments at a parameter's first step, so a fresh engine (one about to load) has none:
        one step at lr 0 over zero gradients creates them, as torch.distributed.checkpoint does for its own loads.
        ZeRO-1/2 link the fragments right after the first group's step, before later groups have state (DeepSpeed
        0.19: the fragments of a second group, e.g. the head's bias under weight decay groups, stay empty), so the
        link is made again here."""
        inner = self._inner_optimizer()
        previous = [g["params"] for g in inner.param_groups]
        sub_groups = getattr(self.optimizer, "fp32_partitioned_groups_flat", None)
        if sub_groups is not None:  # ZeRO-3 hands its inner optimizer a group's partitions only during its step
            owner = self.optimizer.sub_group_to_group_id
            for gid, group in enumerate(inner.param_groups):
                group["params"] = [p for sub, p in enumerate(sub_groups) if owner[sub] == gid]
        flat = [p for g in inner.param_groups for p in g["params"]]
        if self.optimizer_state_keys() and any(not inner.state.get(p) for p in flat):
            lrs = [g["lr"] for g in inner.param_groups]
            for g in inner.param_groups:
                g["lr"] = 0.0
            grads = [p.grad for p in flat]
            for p in flat:
                p.grad = torch.zeros_like(p)
            inner.step()
            for p, grad in zip(flat, grads):
                p.grad = grad
            for g, lr in zip(inner.param_groups, lrs):
                g["lr"] = lr
        for group, params in zip(inner.param_groups, previous):
            group["params"] = params
        if hasattr(self.optimizer, "_hp_optimizer_states_linked"):  # ZeRO-1/2 (stage 3 reads its state directly)
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    def full_state(self):
        """The fp32 master copy of each trainable parameter and its optimizer state, assembled from every rank's
        ZeRO partition (DeepSpeed's tensor-fragment API). Collective; the tensors are kept on rank 0."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        from peft_dist.methods.base import adapter_buffer_names
        from peft_dist.train.checkpoint import FullState

        self._link_optimizer_state()
        keep = dist.get_rank() == 0
        step = self.optimizer_step()
        model, state = {}, {}
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            value = safe_get_full_fp32_param(p)
            moments = {k: safe_get_full_optimizer_state(p, k) for k in self.optimizer_state_keys()}
            if keep:
                model[name] = value.detach().float().cpu().clone()
                state[name] = {k: v.detach().float().cpu().clone() for k, v in moments.items()}
                state[name]["step"] = torch.tensor(float(step))
        if not keep:
            return FullState({}, {}, [])
        buffers = dict(self.module.named_buffers())
        model.update({n: buffers[n].detach().cpu().clone() for n in adapter_buffer_names(self.module)})
        groups = [{**_plain_hyperparameters(g), "params": fqns}
                  for g, fqns in zip(self.optimizer.param_groups, self.group_fqns)]
        return FullState(model, state, groups)

    def load_full_state(self, full) -> None:
        """Write each full tensor into this rank's partition (any world size, any ZeRO stage): the fp32 master and
        the optimizer state through the tensor-fragment API, the module's own copy through :meth:`load_state_dict`."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        from peft_dist.engines.engine import check_param_groups

        check_param_groups(self.group_fqns, full.param_groups)
        self._link_optimizer_state()
        step = None
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            saved = full.optimizer_state.get(name, {})
            if self.zero_stage == 3:
                self._set_zero3_partition(p, full.model[name], None)
                for key in self.optimizer_state_keys():
                    self._set_zero3_partition(p, saved[key], key)
            else:
                safe_set_full_fp32_param(p, full.model[name].to(self.device))
                for key in self.optimizer_state_keys():
                    safe_set_full_optimizer_state(p, saved[key].to(self.device), key)
            step = saved.get("step", step)
        self.load_state_dict(full.model)
        if step is not None:
            for entry in self._inner_optimizer().state.values():
                if "step" in entry:
                    entry["step"] = torch.as_tensor(step, dtype=torch.float32).clone() \
                        if torch.is_tensor(entry["step"]) else int(step)
            self.model.global_steps = int(step)
            self.model.global_samples = int(step) * self.model.train_batch_size()
        for group, saved in zip(self.optimizer.param_groups, full.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params" and k in group})

    def _set_zero3_partition(self, param: nn.Parameter, value: torch.Tensor, key: str | None) -> None:
        """This rank's slice of ``value`` into ZeRO-3's fp32 partition (``key`` None) or optimizer state. DeepSpeed
        0.19's ``set_full_hp_param`` reads past the end of a parameter whose size does not split evenly over the
        ranks (the last partition is padded); the slice here stops at the parameter's end."""
        zero = self.optimizer
        partition, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
        start = partition.numel() * zero._get_param_partition_rank(param)
        piece = value.flatten()[start:start + partition.numel()].to(partition.device, partition.dtype)
        partition.data[:piece.numel()].copy_(piece)

    def optimizer_step(self) -> int:
        """Optimizer steps taken (Adam's ``step``; DeepSpeed's own counter otherwise)."""
        for entry in self._inner_optimizer().state.values():
            if "step" in entry:
                return int(entry["step"])
        return int(self.model.global_steps)


def _plain_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's JSON-able hyper-parameters (DeepSpeed's flat groups also carry its own bookkeeping)."""
    def plain(v):
        return v is None or isinstance(v, (bool, int, float, str)) or \
            (isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v))

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params" and plain(v)}
