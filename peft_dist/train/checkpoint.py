"""Resumable checkpoints, written atomically (design.md: "DCP, adapters only, atomic").

Layout under ``<out_dir>/checkpoints/``::

    step-00000120/            one complete checkpoint (renamed into place only once every rank has written)
        .metadata, __0_0.distcp ...   torch.distributed.checkpoint: trainable tensors + optimizer state, by FQN
        trainer.pt            step, scheduler, method state (rank 0; tensors and plain values only)
        rng-rank{r}.pt        each rank's RNG states
        COMPLETE              written last, inside the temporary directory, before the rename
    .tmp-step-00000180/       an interrupted save: never picked by resume

DCP stores each tensor by its fully qualified name and shards, so a checkpoint written by 2 ranks loads on 1
(or 8): the engine's current model/optimizer give the target layout. Frozen backbone weights are never saved
(``ignore_frozen_params``): the backbone comes from ``model.checkpoint`` again.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from peft_dist.models.backbone import CheckpointError

_STEP_DIR = re.compile(r"^step-(\d{8})$")
COMPLETE = "COMPLETE"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """``none`` → None; ``auto`` → newest complete checkpoint or None; a path → that checkpoint (must exist)."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"train.resume: checkpoint not found: {path}")
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"train.resume: {path} is not a complete checkpoint (no {COMPLETE} marker)")
    return path


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def save_checkpoint(engine, out_dir: str | Path, step: int, trainer_state: dict[str, Any], keep: int) -> Path:
    """Write a complete checkpoint for ``step`` (collective: every rank calls it)."""
    root = checkpoint_root(out_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    engine.save(tmp)
    torch.save(rng_state(), tmp / f"rng-rank{_rank()}.pt")
    if _rank() == 0:
        torch.save(trainer_state, tmp / "trainer.pt")
    _barrier()
    if _rank() == 0:
        (tmp / COMPLETE).write_text(f"step {step}\n")
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. preemption right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(engine, path: Path) -> dict[str, Any]:
    """Restore model/optimizer (any world size), this rank's RNG if it was saved, and return the trainer state."""
    engine.load(path)
    rng = path / f"rng-rank{_rank()}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    return torch.load(path / "trainer.pt", weights_only=True)


def _dcp_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Trainable tensors (+ optimizer state, unless the engine stores its own) keyed by FQN, frozen ones left out."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    opts = StateDictOptions(ignore_frozen_params=True)
    if optimizer is None:
        return {"model": get_model_state_dict(model, options=opts)}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    return {"model": model_sd, "optim": optim_sd}


def save_dcp(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, path: Path) -> None:
    dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(path), no_dist=not dist.is_initialized())


def load_dcp(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    state = _dcp_state(model, optimizer)  # the current layout is the target DCP reshards into
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except Exception as e:  # a checkpoint of another method/model: say which
        raise CheckpointError(f"checkpoint {path} does not fit this run: {type(e).__name__}: {e}") from None
    opts = StateDictOptions(ignore_frozen_params=True, strict=False)
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=opts)
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=opts)


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
