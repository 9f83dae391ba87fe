"""peft-dist: parameter-efficient fine-tuning of frozen vision transformers, from one GPU to a SLURM cluster.

The public API (the CLI is built on it):

    model = peft_dist.create_backbone("vit_base_patch16_224", num_classes=100, checkpoint="ViT-B_16.npz")
    method = peft_dist.apply_method(model, "lora", rank=8, targets=["q", "v"])   # injects and freezes in place
    adapters = peft_dist.trainable_state_dict(model)                           # adapter tensors only
    plain = peft_dist.merge(model)                                             # a plain timm model
"""
from __future__ import annotations

import torch
from torch import nn

from peft_dist.methods.base import MergeError, adapter_state_names, count_trainable
from peft_dist.methods.registry import apply_method, method_names
from peft_dist.models.backbone import CheckpointError, create_backbone

__version__ = "0.1.0"
__all__ = ["create_backbone", "apply_method", "trainable_state_dict", "merge", "method_names", "count_trainable",
           "MergeError", "CheckpointError"]


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter state only: the trainable tensors (adapters, head, whatever the method trains) and the buffers of
    the injected modules (e.g. SNELLA's learned sparsity), detached, keyed as in ``model.state_dict()``."""
    names = adapter_state_names(model)
    return {name: t.detach() for name, t in model.state_dict(keep_vars=True).items() if name in names}


def merge(model: nn.Module) -> nn.Module:
    """Fold the applied method into the backbone in place and return the plain timm model.

    Raises :class:`MergeError` for methods whose modules cannot be folded (e.g. bottleneck adapters)."""
    method = getattr(model, "peft_method", None)
    if method is None:
        return model
    return method.merge(model)
