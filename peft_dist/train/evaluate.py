"""Evaluation and export of a finished run directory (``peft-dist eval`` / ``peft-dist export``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from peft_dist.config import ConfigError, RunConfig, load_config
from peft_dist.models.backbone import CheckpointError


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The run's resolved config, its file paths found again when the run directory was copied elsewhere."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"run directory has no config.yaml: {path}")
    overridden = {o.split("=", 1)[0].strip() for o in overrides or []}
    # before load_config: validating the method's options reads its files
    cfg = load_config(path, [*method_file_overrides(path, overridden), *(overrides or [])])
    relocate_run_paths(cfg, Path(run_dir), overridden)
    return cfg


def method_file_overrides(config_path: Path, overridden: set[str]) -> list[str]:
    """``method.<option>=PATH`` for each file the run's method reads (``run_files`` of its options: SPT's
    allocation, sparse_masked's sparsity table): the copy the run kept of it, which is what it trained with, else
    the first of :func:`run_path_candidates` that exists; else nothing, and validation names the missing file."""
    import yaml

    from peft_dist.methods.registry import method_class

    method = (yaml.safe_load(config_path.read_text()) or {}).get("method") or {}
    try:
        run_files = getattr(method_class(method.get("name", "lora")).options_cls, "run_files", {})
    except ConfigError:
        return []  # load_config names the unknown method
    run_dir = config_path.parent
    out = []
    for option, kept in run_files.items():
        value = method.get(option)
        if not value or f"method.{option}" in overridden:
            continue
        found = next((c for c in [run_dir / kept, *run_path_candidates(str(value), run_dir)] if c.is_file()), None)
        if found is not None:
            out.append(f"method.{option}={json.dumps(str(found))}")
    return out


RUN_PATH_KEYS = (("model", "checkpoint"), ("data", "path"))
"""Files a run's config names that ``eval``/``export`` read: the backbone weights and the eval shards."""


def run_path_candidates(value: str, run_dir: Path) -> list[Path]:
    """Where a path the run's config names may be on this machine, in order: as written (absolute, or relative to
    the working directory as at training time), relative to the run directory, then by its name inside the run
    directory or beside it (a run copied together with its backbone or shards)."""
    given = Path(value)
    candidates = [given] if given.is_absolute() else [given, run_dir / given]
    candidates += [run_dir / given.name, run_dir.parent / given.name]
    return list(dict.fromkeys(candidates))


def relocate_run_paths(cfg: RunConfig, run_dir: Path, overridden: set[str]) -> None:
    """Point ``model.checkpoint`` and ``data.path`` at the first candidate that exists. A missing backbone is one
    line naming where it was looked for and the override that names it; missing shards are left for the loader,
    which names them, because ``export`` needs no data. Paths given as overrides are taken as they are."""
    for section, key in RUN_PATH_KEYS:
        value = getattr(getattr(cfg, section), key)
        if value is None or f"{section}.{key}" in overridden:
            continue
        candidates = run_path_candidates(str(value), run_dir)
        found = next((c for c in candidates if c.exists()), None)
        if found is not None:
            setattr(getattr(cfg, section), key, str(found))
        elif (section, key) == ("model", "checkpoint"):
            raise CheckpointError(f"model.checkpoint: the backbone of run {run_dir}, {value}, is not on this machine "
                                  f"(looked for {', '.join(str(c) for c in candidates[1:])}); copy it into or beside "
                                  "the run directory, or name it: model.checkpoint=PATH")


LEGACY_SUFFIXES = ((".weight_delta", ".weight_delta.values"), (".bias_delta", ".bias_delta.values"))
"""SPT's δ moved into a module of its own (``spt.DeltaValues``, for FSDP2's fp32 groups): adapter files written
before name it without the ``.values``."""


def _model_name(key: str, params: dict) -> str:
    if key not in params:
        for old, new in LEGACY_SUFFIXES:
            if key.endswith(old) and key[:-len(old)] + new in params:
                return key[:-len(old)] + new
    return key


def load_adapters(model: nn.Module, path: str | Path) -> None:
    """Copy the tensors of an ``adapter.safetensors`` (trainable tensors + injected buffers such as SNELLA's learned
    sparsity) into the (method-applied) model; names must all exist."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"adapter file not found: {path}")
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    try:
        keys = _copy_adapters(path, params)
    except SafetensorError as e:  # a truncated or foreign file
        raise CheckpointError(f"cannot read adapter file {path}: {e} (truncated, or not a safetensors file)") \
            from None
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in keys]
    if missing:
        raise CheckpointError(f"adapter file {path} lacks trainable tensors {', '.join(missing[:4])}")


def _copy_adapters(path: Path, params: dict[str, torch.Tensor]) -> list[str]:
    """Copy every tensor of the file into ``params``; returns the model names it filled."""
    with safe_open(str(path), framework="pt") as f:
        names = {k: _model_name(k, params) for k in f.keys()}
        unknown = [k for k in names if names[k] not in params]
        if unknown:
            raise CheckpointError(f"adapter file {path} does not fit the model: unexpected tensors "
                                  f"{', '.join(unknown[:4])} (was it trained with another method or model?)")
        with torch.no_grad():
            for stored, k in names.items():
                t = f.get_tensor(stored)
                if t.shape != params[k].shape:
                    raise CheckpointError(f"adapter file {path}: {k} has shape {tuple(t.shape)}, "
                                          f"the model expects {tuple(params[k].shape)}")
                params[k].copy_(t)
    return list(names.values())


def restore_run(run_dir: str | Path, overrides: list[str] | None = None):
    """Rebuild the run's backbone + method and load its trained adapters."""
    from peft_dist.train.trainer import build_model

    cfg = load_run_config(run_dir, overrides)
    model, method = build_model(cfg)
    load_adapters(model, Path(run_dir) / "adapter.safetensors")
    return cfg, model, method


def export_merged(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Merge the run's adapters into the backbone and write a plain timm ``model.safetensors`` (+ ``model.json``
    with the timm name and kwargs to create it)."""
    import peft_dist

    out = Path(out) if out else Path(run_dir) / "model.safetensors"
    for path in (out, out.with_suffix(".json")):
        if path.is_dir():
            raise ConfigError(f"export --out: {path} is a directory; name the file to write, e.g. "
                              f"{out / 'model.safetensors'}")
    cfg, model, _ = restore_run(run_dir)
    plain = peft_dist.merge(model)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a parent directory should be, no permission
        raise ConfigError(f"export --out: cannot create the directory {out.parent} for {out.name}: "
                          f"{'a file of that name exists' if isinstance(e, FileExistsError) else e.strerror or e}") \
            from None
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(tmp),
                  metadata={"timm_model": cfg.model.name, "merged_method": cfg.method.name})
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves no half-written temporary behind
    create = {"model_name": cfg.model.name, "num_classes": cfg.model.num_classes, **cfg.model.kwargs}
    out.with_suffix(".json").write_text(json.dumps(create, indent=2) + "\n")
    return out


def export_run(run_dir: str | Path, export_format: str = "merged", out: str | Path | None = None) -> Path:
    """``peft-dist export``: ``merged`` (a plain timm ``model.safetensors``) or ``peft`` (a Hugging Face peft adapter
    directory, LoRA runs); a format the run's method has not is one line naming the formats it has."""
    from peft_dist.export_peft import check_export_format, export_peft

    check_export_format(load_run_config(run_dir).method.name, export_format, run_dir)
    return export_peft(run_dir, out) if export_format == "peft" else export_merged(run_dir, out)
