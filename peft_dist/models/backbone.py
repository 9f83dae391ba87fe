"""Backbone factory: any timm model name, weights from a local file, a new head sized to the task.

Weights never come from a hub at run time. Supported files:
  * ``.npz``  — timm/JAX checkpoints (the original IN-21k ViT releases), through timm's own npz loader;
  * ``.pth`` / ``.pt`` / ``.bin`` — a state dict (optionally under ``model``/``state_dict``), ``weights_only=True``;
  * ``.safetensors``.
State dicts go through the model's timm ``checkpoint_filter_fn`` (position-embedding resize, layout fixes) when the
model family has one. The classification head is re-initialised whenever its shape differs from the task's.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import timm
import torch
from torch import nn

CHECKPOINT_SUFFIXES = (".npz", ".pth", ".pt", ".bin", ".safetensors")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or does not fit the model; the message names the file/tensors."""


def create_backbone(name: str, num_classes: int, checkpoint: str | Path | None = None, **timm_kwargs) -> nn.Module:
    """Build ``timm.create_model(name, num_classes=...)`` and load local weights (head re-sized to the task)."""
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **timm_kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise CheckpointError(f"model.name: unknown timm model {name!r} (see timm.list_models())") from None
        raise
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt``/``.bin``/``.safetensors`` state dict (never unpickles arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt or foreign file: say which file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return sd


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(f"checkpoint {path}: unsupported file type {suffix!r}; allowed: "
                              f"{', '.join(CHECKPOINT_SUFFIXES)}")
    if suffix == ".npz":
        _load_npz(model, path)
        return
    sd = read_state_dict(path)
    sd = _filter_for_model(model, sd)
    load_matching(model, sd, source=str(path))


def load_matching(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``sd`` into ``model``: the head may be dropped (task-sized), anything else must match."""
    own = model.state_dict()
    head_keys = _head_keys(model)
    sd = {k: v for k, v in sd.items() if not (k in head_keys and k in own and own[k].shape != v.shape)}
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        more = f" (and {len(mismatched) - 5} more)" if len(mismatched) > 5 else ""
        raise CheckpointError(f"checkpoint {source} does not fit the model; shape mismatch: "
                              + "; ".join(mismatched[:5]) + more)
    missing = [k for k in own if k not in sd and k not in head_keys]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:4])})")
        raise CheckpointError(f"checkpoint {source} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(sd, strict=False)


def _head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier (re-sized to the task, so never required from a checkpoint)."""
    keys: set[str] = set()
    classifier = getattr(model, "default_cfg", {}).get("classifier", "head") if hasattr(model, "default_cfg") else "head"
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    own = model.state_dict()
    for n in names:
        keys |= {k for k in own if k == n or k.startswith(n + ".")}
    return keys


def _filter_for_model(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the timm family's checkpoint filter (pos-embed resize, layout conversions) when it has one."""
    module = importlib.import_module(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None:
        return sd
    try:
        return fn(sd, model)
    except Exception:  # a filter that chokes on an already-timm-format dict: fall back to the raw dict
        return sd


def _load_npz(model: nn.Module, path: Path) -> None:
    if not hasattr(model, "load_pretrained"):
        raise CheckpointError(f"checkpoint {path}: .npz weights load only into timm ViT-family models, "
                              f"not {type(model).__name__}")
    import numpy as np

    try:
        with np.load(path) as w:
            keys = set(w.files)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not any(k.startswith(("Transformer/", "embedding/")) for k in keys):
        raise CheckpointError(f"checkpoint {path}: not a timm/JAX ViT .npz (no Transformer/ or embedding/ arrays)")
    try:
        model.load_pretrained(str(path))
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {type(e).__name__}: {e}") from None
