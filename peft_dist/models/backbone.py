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
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from peft_dist.config import ConfigError

CHECKPOINT_SUFFIXES = (".npz", ".pth", ".pt", ".bin", ".safetensors")
VIT_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
"""The Linear layers every method adapts in each block (``peft_dist.models.targets``)."""
SET_BY_PEFT_DIST = {"num_classes": "model.num_classes", "drop_path_rate": "model.drop_path_rate",
                    "pretrained": "model.checkpoint (weights come from a local file only)"}
"""``create_model`` arguments that come from other config keys, never from ``model.kwargs``."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or does not fit the model; the message names the file/tensors."""


class BackboneConfigError(ConfigError, CheckpointError):
    """``model.name`` / ``model.kwargs`` / ``data.img_size`` do not describe a timm ViT the methods can adapt. A
    config error; also a :class:`CheckpointError`, which is what an unknown model name raised before."""


def create_backbone(name: str, num_classes: int, checkpoint: str | Path | None = None, **timm_kwargs) -> nn.Module:
    """Build ``timm.create_model(name, num_classes=...)`` and load local weights (head re-sized to the task).

    The model must be a ViT the methods can adapt (blocks holding :data:`VIT_LINEARS`); a name timm does not know,
    a ``timm_kwargs`` key the model does not take and a non-ViT are :class:`BackboneConfigError` naming the key."""
    check_kwargs_keys({k: v for k, v in timm_kwargs.items() if k != "drop_path_rate"})
    if not timm.is_model(name):
        raise BackboneConfigError(f"model.name: unknown timm model {name!r}; allowed: a timm ViT such as "
                                  "vit_base_patch16_224 (see timm.list_models('vit_*'))")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **timm_kwargs)
    except (TypeError, ValueError, AssertionError) as e:  # timm's constructors check their arguments this way
        check_vit(_default_on_meta(name), name)  # ViT kwargs on a non-ViT: the name is what is wrong
        raise kwargs_error(name, timm_kwargs, e) from None
    check_vit(model, name)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def _default_on_meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


def check_kwargs_keys(kwargs: dict[str, Any]) -> None:
    for key, instead in SET_BY_PEFT_DIST.items():
        if key in kwargs:
            raise BackboneConfigError(f"model.kwargs.{key}: set by peft-dist; use {instead}")


def kwargs_error(name: str, timm_kwargs: dict[str, Any], error: Exception) -> BackboneConfigError:
    """One line naming the ``model.kwargs`` key timm refused and the keys the model takes."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    unexpected = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", text)
    if unexpected and unexpected.group(2) in timm_kwargs:
        class_name, key = unexpected.groups()
        allowed = init_parameters(name, class_name)
        hint = f"; allowed keys of {class_name}: {', '.join(allowed)}" if allowed else ""
        return BackboneConfigError(f"model.kwargs: unknown key {key!r} for {name}{hint}")
    given = ", ".join(f"{k}={v!r}" for k, v in timm_kwargs.items() if k not in SET_BY_PEFT_DIST)
    return BackboneConfigError(f"model.kwargs: timm cannot build {name} with {given or 'no kwargs'}: "
                               f"{type(error).__name__}: {text}")


def init_parameters(name: str, class_name: str) -> list[str]:
    """The constructor arguments of the timm class ``class_name`` that builds ``name`` ([] if not found)."""
    from timm.models import model_entrypoint

    module = sys.modules.get(model_entrypoint(name).__module__)
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        return []
    skip = {"self", "args", "kwargs", "device", "dtype", *SET_BY_PEFT_DIST}
    return [p for p in inspect.signature(cls.__init__).parameters if p not in skip]


def check_vit(model: nn.Module, name: str) -> None:
    """The methods adapt ViT blocks (:data:`VIT_LINEARS` in each); anything else is refused naming ``model.name``."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks):
        lacking = [path for path in VIT_LINEARS if not isinstance(_submodule(blocks[0], path), nn.Linear)]
        what = f"ViT blocks without {', '.join(lacking)}"
    else:
        lacking, what = list(VIT_LINEARS), "no ViT blocks"
    if lacking:
        raise BackboneConfigError(f"model.name: {name} builds a {type(model).__name__} with {what}; allowed: a "
                                  "timm ViT whose blocks hold attn.qkv, attn.proj, mlp.fc1 and mlp.fc2, such as "
                                  "vit_base_patch16_224 (see timm.list_models('vit_*'))")


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def input_size(model: nn.Module) -> tuple[int, int] | None:
    """The (height, width) a ViT's patch embedding requires; None when it takes any size (``dynamic_img_size``)."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None or getattr(model, "dynamic_img_size", False) or not getattr(patch_embed, "strict_img_size", True):
        return None
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def check_image_size(model: nn.Module, img_size: int, origin: str = "model.kwargs.img_size") -> None:
    """``data.img_size`` must be what the model was built for (timm ViTs assert it at the first forward);
    ``origin`` says where the model's size comes from."""
    required = input_size(model)
    if required is not None and required != (img_size, img_size):
        raise BackboneConfigError(f"data.img_size: got {img_size}, but the model takes {required[0]}x{required[1]} "
                                  f"images ({origin}); set data.img_size={required[0]}, or "
                                  f"model.kwargs.img_size={img_size} (a new position embedding)")


def check_model_config(model_cfg, img_size: int) -> None:
    """Everything :func:`create_backbone` and the first forward would refuse about ``model.*`` and
    ``data.img_size``, found by building the model on the meta device (no memory, no weights read): a bad name,
    kwargs or image size is one line before any data is read or file written."""
    check_kwargs_keys(model_cfg.kwargs)
    with torch.device("meta"):
        model = create_backbone(model_cfg.name, model_cfg.num_classes, None,
                                drop_path_rate=model_cfg.drop_path_rate, **model_cfg.kwargs)
    given = model_cfg.kwargs.get("img_size")
    origin = f"model.kwargs.img_size={given}" if given is not None else f"the default of {model_cfg.name}"
    check_image_size(model, img_size, origin)


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
    return unwrap_state_dict(sd, path)


def unwrap_state_dict(loaded: object, path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded ``.pth``: the dict itself, or the one under a training script's ``model`` /
    ``state_dict`` / ``module`` key."""
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(loaded, dict) and wrapper in loaded and isinstance(loaded[wrapper], dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return loaded


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
    sd = filter_for_model(model, sd)
    load_matching(model, sd, source=str(path))


def load_matching(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``sd`` into ``model``: the head may be dropped (task-sized), anything else must match."""
    own = model.state_dict()
    keep = fitting_keys({k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in sd.items()},
                        head_keys(model), source)
    model.load_state_dict({k: sd[k] for k in keep}, strict=False)


def fitting_keys(own: dict[str, tuple[int, ...]], given: dict[str, tuple[int, ...]], head_keys: set[str],
                 source: str) -> set[str]:
    """The checkpoint names (of ``given``: name -> shape) to load into a model with state-dict shapes ``own``: a
    head of another size is left out (task-sized); any other mismatch, missing or unexpected tensor is a
    :class:`CheckpointError` naming them."""
    keep = {k for k in given if not (k in head_keys and k in own and own[k] != given[k])}
    mismatched = [f"{k}: checkpoint {given[k]} vs model {own[k]}" for k in keep if k in own and own[k] != given[k]]
    if mismatched:
        more = f" (and {len(mismatched) - 5} more)" if len(mismatched) > 5 else ""
        raise CheckpointError(f"checkpoint {source} does not fit the model; shape mismatch: "
                              + "; ".join(mismatched[:5]) + more)
    missing = [k for k in own if k not in keep and k not in head_keys]
    unexpected = [k for k in keep if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:4])})")
        raise CheckpointError(f"checkpoint {source} does not fit the model: " + "; ".join(parts))
    return keep


def head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier (re-sized to the task, so never required from a checkpoint)."""
    keys: set[str] = set()
    classifier = getattr(model, "default_cfg", {}).get("classifier", "head") if hasattr(model, "default_cfg") else "head"
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    own = model.state_dict()
    for n in names:
        keys |= {k for k in own if k == n or k.startswith(n + ".")}
    return keys


def filter_for_model(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
