"""Resumable checkpoints: pickle-free, full (rank-independent), verified before use.

Layout under ``<out_dir>/checkpoints/``::

    step-00000120/              one checkpoint
        model.safetensors       trainable tensors + adapter buffers, full (unsharded), by FQN
        optimizer.safetensors   optimizer state, full, ``state/<fqn>/<name>`` (e.g. ``…/exp_avg``, ``…/step``)
        method.safetensors      the method's tensor state (SNELLA's statistics), when it has any
        ema.safetensors         the EMA of the trainable tensors, full, by FQN (``train.ema_decay``)
        rng-rank{r}.safetensors every rank's CPU (and CUDA) RNG state as tensors; Python's and NumPy's too
        manifest.json           step, scheduler, data position, optimizer hyper-parameters, the method's plain
                                state, the fp16 gradient scaler's state, what the run must match (model, method,
                                optimizer), sha256 of every file
        COMPLETE                written last: a directory without it is never picked
    .tmp-step-00000180/         an interrupted save: never picked, removed by the next save

Why not torch.distributed.checkpoint (the previous format): its ``.metadata`` is a pickle, so resuming from a
directory someone else could write into executes code. PEFT state is small (ViT-H/14 + SNELL-32 with Adam: see the
README's "Checkpoints" section), so every engine gathers it to full tensors and any world size, under any engine,
loads it back: the engine's own ``load_full_state`` reshards.

Choosing what to resume from happens on rank 0 only (a shared filesystem may show ranks different directory
listings while a save is being renamed): it walks the checkpoints newest first, names each one that fails to
verify, takes the first that verifies and broadcasts that step.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peft_dist.models.backbone import CheckpointError

FORMAT = "peft-dist-checkpoint/1"
COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
MODEL_FILE, OPTIMIZER_FILE, METHOD_FILE = "model.safetensors", "optimizer.safetensors", "method.safetensors"
EMA_FILE = "ema.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_MAX_MANIFEST_BYTES = 64 << 20


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoints marked complete, oldest first (not yet verified: see :func:`verify`)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


# ---------------------------------------------------------------------- what a run must match to resume
def fit_keys(cfg) -> dict[str, Any]:
    """The settings a checkpoint's tensors depend on: resuming under other values is refused, naming the key."""
    return {"model.name": cfg.model.name, "model.num_classes": cfg.model.num_classes,
            "model.kwargs": _plain(cfg.model.kwargs), "method.name": cfg.method.name,
            "method.options": _plain(cfg.method.options), "optim.name": cfg.optim.name}


def config_digest(cfg) -> str:
    return hashlib.sha256(json.dumps(_plain(cfg.to_dict()), sort_keys=True).encode()).hexdigest()


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples become lists), so a value compares equal after a round trip."""
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------- verification
@dataclass
class Verified:
    path: Path
    manifest: dict[str, Any]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint ``path``; a missing or malformed one is a :class:`CheckpointError` naming it."""
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    if file.stat().st_size > _MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{file} is {file.stat().st_size} bytes, not a manifest")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{file}: format {found!r}, expected {FORMAT!r}")
    for key in ("step", "files", "fit", "scheduler", "trainer", "optimizer_param_groups", "world_size"):
        if key not in manifest:
            raise CheckpointError(f"{file} lacks {key!r}")
    return manifest


def verify(path: Path) -> Verified:
    """Check that ``path`` is a complete checkpoint whose every file is the one the manifest lists (sha256).
    Reads no tensor and unpickles nothing."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    manifest = read_manifest(path)
    for name, expected in manifest["files"].items():
        file = path / name
        if "/" in name or name.startswith("."):
            raise CheckpointError(f"{path / MANIFEST} lists an unexpected file name {name!r}")
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"{file} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}")
        if sha256_file(file) != expected["sha256"]:
            raise CheckpointError(f"{file} does not match its sha256 in the manifest")
    return Verified(path, manifest)


def check_fit(verified: Verified, cfg) -> None:
    """One line naming each setting in which this run differs from the run that wrote the checkpoint."""
    saved, now = verified.manifest["fit"], fit_keys(cfg)
    differ = [f"{k}: checkpoint {saved.get(k)!r}, this run {now[k]!r}" for k in now if saved.get(k) != now[k]]
    if differ:
        raise CheckpointError(f"checkpoint {verified.path} does not fit this run ({'; '.join(differ)}); resume "
                              "with the settings that wrote it, or start anew with train.overwrite=true")


def _pick_newest_verified(out_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and one line for each newer one that did not."""
    damaged = []
    for path in reversed(list_checkpoints(out_dir)):
        try:
            verify(path)
        except CheckpointError as e:
            damaged.append(f"skipping damaged checkpoint {path.name}: {e}")
            continue
        return path, damaged
    return None, damaged


def resolve_resume(resume: str, out_dir: str | Path, device: torch.device | None = None) -> Verified | None:
    """``none`` → None; ``auto`` → the newest checkpoint that verifies (damaged ones named on stderr), or None
    when there is none at all; a path → that checkpoint, which must verify. Rank 0 decides and broadcasts."""
    if resume == "none":
        return None
    out_dir = Path(out_dir)
    explicit = None if resume == "auto" else Path(resume)
    decision, error = "", None
    if _rank() == 0:
        try:
            if explicit is not None:
                decision = str(verify(explicit).path)
            else:
                chosen, damaged = _pick_newest_verified(out_dir)
                for line in damaged:
                    print(f"warning: {line}", file=sys.stderr, flush=True)
                if chosen is None and damaged:
                    raise CheckpointError(f"train.resume=auto: no checkpoint in {checkpoint_root(out_dir)} "
                                          f"verifies ({len(damaged)} damaged); nothing was changed")
                decision = "" if chosen is None else str(chosen)
        except CheckpointError as e:
            error = e
    decision = _broadcast_text("\0error" if error else decision, device)
    if error is not None:
        raise CheckpointError(f"train.resume: {error}")
    if decision == "\0error":
        raise CheckpointError("train.resume: rank 0 could not pick a checkpoint (its message says why)")
    if not decision:
        return None
    return Verified(Path(decision), read_manifest(Path(decision)))


def _broadcast_text(text: str, device: torch.device | None) -> str:
    """Rank 0's string on every rank, as a byte tensor (no object pickling)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return text
    device = device or torch.device("cpu")
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    dist.broadcast(size, 0)
    if _rank() != 0:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    if data.numel():
        dist.broadcast(data, 0)
    return bytes(data.cpu().tolist()).decode()


# ---------------------------------------------------------------------- RNG states as tensors
def rng_tensors() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's RNG states: tensors for safetensors, small scalars as its string metadata."""
    py_version, py_state, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(),
               "python": torch.tensor(py_state, dtype=torch.int64),
               "numpy": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    metadata = {"python_version": str(py_version), "python_gauss": json.dumps(py_gauss),
                "numpy_pos": str(int(np_pos)), "numpy_has_gauss": str(int(np_has_gauss)),
                "numpy_gauss": repr(float(np_gauss))}
    return tensors, metadata


def set_rng_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    random.setstate((int(metadata["python_version"]), tuple(tensors["python"].tolist()),
                     json.loads(metadata["python_gauss"])))
    np.random.set_state(("MT19937", tensors["numpy"].numpy().astype(np.uint32), int(metadata["numpy_pos"]),
                         int(metadata["numpy_has_gauss"]), float(metadata["numpy_gauss"])))


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


# ---------------------------------------------------------------------- optimizer state ⇄ flat tensors
def flatten_optimizer_state(state: dict[str, dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``{fqn: {name: value}}`` → safetensors entries ``state/<fqn>/<name>`` for tensors; plain values (rare,
    e.g. a Python int step) go to the manifest."""
    tensors, plain = {}, {}
    for fqn, entry in state.items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{fqn}/{name}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(fqn, {})[name] = value
    return tensors, plain


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, dict[str, Any]]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        fqn, name = key[len("state/"):].rsplit("/", 1)
        state.setdefault(fqn, {})[name] = value
    for fqn, entry in plain.items():
        state.setdefault(fqn, {}).update(entry)
    return state


def split_plain(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A state dict of tensors and plain values → (tensors, JSON values); anything else is a bug, said so."""
    tensors, plain = {}, {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous().clone()
        else:
            try:
                plain[key] = json.loads(json.dumps(value))
            except TypeError:
                raise TypeError(f"state entry {key!r} is a {type(value).__name__}: only tensors and JSON values "
                                "are checkpointed") from None
    return tensors, plain


# ---------------------------------------------------------------------- save
@dataclass
class FullState:
    """What an engine hands the checkpoint (on rank 0; empty elsewhere): full tensors keyed by FQN."""
    model: dict[str, torch.Tensor]
    optimizer_state: dict[str, dict[str, Any]]
    """``{fqn: {"exp_avg": tensor, ...}}``"""
    param_groups: list[dict[str, Any]]
    """The optimizer's groups: hyper-parameters and ``params`` as FQNs."""


def save_checkpoint(engine, cfg, out_dir: str | Path, step: int, trainer_state: dict[str, Any],
                    scheduler_state: dict[str, Any], method_state: dict[str, Any], keep: int,
                    scaler_state: dict[str, Any] | None = None, ema: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint for ``step`` (collective: every rank calls it); returns its final path. ``scaler_state``:
    the fp16 gradient scaler's plain state; ``ema``: the full EMA tensors (rank 0's are written)."""
    root = checkpoint_root(out_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # interrupted saves: never complete, never picked
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    rng, rng_meta = rng_tensors()
    _write_safetensors(tmp / _rng_file(_rank()), rng, rng_meta)
    full = engine.full_state()  # collective
    _barrier()
    if _rank() == 0:
        optim_tensors, optim_plain = flatten_optimizer_state(full.optimizer_state)
        method_tensors, method_plain = split_plain(method_state)
        _write_safetensors(tmp / MODEL_FILE, {k: v.detach().cpu().contiguous() for k, v in full.model.items()})
        _write_safetensors(tmp / OPTIMIZER_FILE, optim_tensors)
        if method_tensors:
            _write_safetensors(tmp / METHOD_FILE, method_tensors)
        if ema is not None:
            _write_safetensors(tmp / EMA_FILE, {k: v.detach().cpu().contiguous() for k, v in ema.items()})
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {
            "format": FORMAT, "step": step, "world_size": _world(), "engine": engine.name,
            "fit": fit_keys(cfg), "config_sha256": config_digest(cfg),
            "scheduler": _json_checked("scheduler", scheduler_state),
            "trainer": _json_checked("trainer", trainer_state),
            "method": method_plain,
            "scaler": _json_checked("gradient scaler", scaler_state),
            "optimizer_param_groups": _json_checked("optimizer param groups", full.param_groups),
            "optimizer_plain_state": _json_checked("optimizer state", optim_plain),
            "rng_ranks": _world(),
            "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                      for name in files},
        }
        _write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. preemption right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text(final / COMPLETE, f"step {step}\n")
        _fsync_dir(final)
        _fsync_dir(root)
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _json_checked(what: str, value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except TypeError as e:
        raise TypeError(f"checkpoint: the {what} is not plain JSON ({e})") from None


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    save_file(tensors, str(path), metadata=metadata)
    _fsync_file(path)


def _write_text(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------- load
@dataclass
class LoadedState:
    step: int
    scheduler: dict[str, Any]
    trainer: dict[str, Any]
    method: dict[str, Any]
    rng_restored: bool
    scaler: dict[str, Any] | None = None
    """The fp16 gradient scaler's state; None when the run that wrote it had none."""
    ema: dict[str, torch.Tensor] | None = None
    """The EMA of the trainable tensors (full); None when the run that wrote it kept none."""


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({e})") from None


def load_checkpoint(engine, verified: Verified, cfg) -> LoadedState:
    """Restore the engine's model and optimizer (any world size, any engine), this rank's RNG when the checkpoint
    has one for it, and return the rest of the state. Loads safetensors and JSON only."""
    check_fit(verified, cfg)
    path, manifest = verified.path, verified.manifest
    model, _ = _load_tensors(path / MODEL_FILE)
    optim_tensors, _ = _load_tensors(path / OPTIMIZER_FILE)
    full = FullState(model, unflatten_optimizer_state(optim_tensors, manifest.get("optimizer_plain_state", {})),
                     manifest["optimizer_param_groups"])
    check_tensors_fit(engine, full, path)
    engine.load_full_state(full)
    method_state = dict(manifest.get("method", {}))
    if (path / METHOD_FILE).is_file():
        method_state.update(_load_tensors(path / METHOD_FILE)[0])
    rng_file = path / _rng_file(_rank())
    restored = rng_file.is_file() and int(manifest["rng_ranks"]) == _world()
    if restored:  # at another world size the ranks draw other samples anyway; they keep their seeded RNG
        set_rng_tensors(*_load_tensors(rng_file))
    ema = _load_tensors(path / EMA_FILE)[0] if (path / EMA_FILE).is_file() else None
    return LoadedState(int(manifest["step"]), manifest["scheduler"], manifest["trainer"], method_state, restored,
                       manifest.get("scaler"), ema)


def check_tensors_fit(engine, full: FullState, path: Path) -> None:
    """Every saved tensor exists in this model with the same shape, and every trainable one was saved."""
    expected = engine.full_shapes()
    missing = sorted(set(expected) - set(full.model))
    unknown = sorted(set(full.model) - set(expected))
    if missing or unknown:
        parts = ([f"this run trains {len(missing)} tensor(s) it lacks, e.g. {missing[0]}"] if missing else []) + \
                ([f"it holds {len(unknown)} this model does not have, e.g. {unknown[0]}"] if unknown else [])
        raise CheckpointError(f"checkpoint {path} does not fit this run: {'; '.join(parts)}")
    for name, shape in expected.items():
        if tuple(full.model[name].shape) != tuple(shape):
            raise CheckpointError(f"checkpoint {path} does not fit this run: {name} is "
                                  f"{tuple(full.model[name].shape)} there, {tuple(shape)} here")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
