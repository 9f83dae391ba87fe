"""A local checkpoint read one tensor at a time, or one rank's slice of a tensor (sharded initialization).

``.safetensors``: ``safe_open(...).get_slice(name)[index]`` reads only the slice's bytes. ``.pth``/``.pt``/``.bin``:
``torch.load(mmap=True, weights_only=True)`` maps the file, so slicing touches only the slice's pages (an old,
non-zip ``.pth`` cannot be mapped and is read whole). ``.npz``: timm's loader run on a meta model, each array it
copies in caught as it arrives (NumPy reads one array at a time), converted names and layout included.

Tensors whose name and shape already fit the model are read lazily; any other goes through the timm family's
checkpoint filter one tensor at a time (a position embedding resized, a foreign name converted) and is held whole.
Nothing is ever unpickled.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from peft_dist.models.backbone import (CHECKPOINT_SUFFIXES, CheckpointError, filter_for_model, fitting_keys,
                                       head_keys, unwrap_state_dict)


class CheckpointReader:
    """``loads``: the plain backbone's state-dict names the checkpoint fills; ``read(name, index)``."""

    def __init__(self, path: str | Path, plain_model: nn.Module, slice_of=None):
        """``plain_model``: the backbone as timm builds it (on meta), before any method is applied; ``slice_of``:
        name -> this rank's index, so that converted (``.npz``) tensors are held as that slice only."""
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint not found: {self.path}")
        suffix = self.path.suffix.lower()
        if suffix not in CHECKPOINT_SUFFIXES:
            raise CheckpointError(f"checkpoint {self.path}: unsupported file type {suffix!r}; allowed: "
                                  f"{', '.join(CHECKPOINT_SUFFIXES)}")
        own = {k: tuple(v.shape) for k, v in plain_model.state_dict().items()}
        self._lazy: dict[str, object] = {}  # name -> handle the slice is read from
        self._held: dict[str, torch.Tensor] = {}  # converted tensors, whole (or this rank's slice)
        self._held_sliced = False
        try:
            if suffix == ".npz":
                self._held = _npz_tensors(plain_model, self.path, slice_of)
                self._held_sliced = slice_of is not None
            else:
                raw = self._open(suffix)
                self._sort(raw, own, plain_model)
        except CheckpointError:
            raise
        except Exception as e:  # corrupt or foreign file: say which file
            raise CheckpointError(f"cannot read checkpoint {self.path}: {type(e).__name__}: {e}") from None
        shapes = {k: tuple(v.shape) for k, v in self._held.items()} if not self._held_sliced else \
            {k: own.get(k, ()) for k in self._held}
        shapes.update({k: self._shape(k) for k in self._lazy})
        self.loads = fitting_keys(own, shapes, head_keys(plain_model), str(self.path))

    def _open(self, suffix: str) -> dict[str, object]:
        if suffix == ".safetensors":
            return SafetensorsFile(self.path).tensors()
        try:
            sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(self.path, map_location="cpu", weights_only=True)  # legacy format: read whole
        return unwrap_state_dict(sd, self.path)

    def _sort(self, raw: dict[str, object], own: dict[str, tuple[int, ...]], plain_model: nn.Module) -> None:
        for name, handle in raw.items():
            shape = tuple(handle.shape)
            if own.get(name) == shape:
                self._lazy[name] = handle
                continue
            # one tensor through the family's filter: what it returns is what the plain build would load
            whole = handle.read(None) if isinstance(handle, _StoredTensor) else handle
            self._held.update(filter_for_model(plain_model, {name: whole}))

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._lazy[name].shape)

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The tensor ``name`` (the plain backbone's state-dict name), or its ``index`` slice, as a new tensor."""
        if name in self._held:
            whole = self._held[name]
            if self._held_sliced:
                if index is None:
                    raise CheckpointError(f"checkpoint {self.path}: {name} is read whole after loading (the method "
                                          "reads it); set dist.init=full for .npz checkpoints")
                return whole.clone()
            return (whole if index is None else whole[index]).clone()
        handle = self._lazy[name]
        if isinstance(handle, _StoredTensor):  # reads only the rows asked for
            return handle.read(index)
        return (handle if index is None else handle[index]).clone()


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


class SafetensorsFile:
    """The tensors of a ``.safetensors`` file, read with plain file reads. safetensors' own ``get_slice`` maps the
    file, and every page a slice touches then counts in the process's RSS for as long as the file stays open; a
    read copies the slice's bytes once and leaves nothing mapped. Layout (the format's documentation): an 8-byte
    little-endian header length, a JSON header naming each tensor's dtype, shape and byte range, then the data."""

    def __init__(self, path: Path):
        import json
        import struct

        self.path = path
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(length))
        self.data_start = 8 + length

    def tensors(self) -> dict[str, "_StoredTensor"]:
        out = {}
        for name, entry in self.header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"checkpoint {self.path}: {name} has dtype {entry['dtype']}; allowed: "
                                      f"{', '.join(SAFETENSORS_DTYPES)}")
            begin, _ = entry["data_offsets"]
            out[name] = _StoredTensor(self.path, self.data_start + begin, SAFETENSORS_DTYPES[entry["dtype"]],
                                      tuple(entry["shape"]))
        return out


class _StoredTensor:
    """One tensor at a byte offset of a file; :meth:`read` reads the rows an index selects along dim 0."""

    def __init__(self, path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...]):
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, shape

    def read(self, index: tuple[slice, ...] | None) -> torch.Tensor:
        index = tuple(index or ())
        rows = index[0].indices(self.shape[0]) if index and self.shape else (0, self.shape[0] if self.shape else 1, 1)
        start, stop = rows[0], max(rows[0], rows[1])
        row_numel = 1
        for n in self.shape[1:]:
            row_numel *= n
        row_bytes = row_numel * torch.empty((), dtype=self.dtype).element_size()
        buffer = bytearray((stop - start) * row_bytes)
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * row_bytes)
            f.readinto(buffer)
        shape = ((stop - start), *self.shape[1:]) if self.shape else ()
        block = torch.frombuffer(buffer, dtype=self.dtype).view(shape) if buffer else torch.empty(shape, dtype=self.dtype)
        rest = (slice(None),) + index[1:] if index else ()
        return block[rest].clone() if rest and any(s != slice(None) for s in index[1:]) else block


def _npz_tensors(plain_model: nn.Module, path: Path, slice_of=None) -> dict[str, torch.Tensor]:
    """The tensors timm's ``.npz`` loader copies into ``plain_model`` (on meta), keyed by state-dict name: the
    loader runs on meta tensors, and each ``copy_`` it makes hands over one converted array."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from peft_dist.models.backbone import _load_npz

    by_storage = {t.untyped_storage()._cdata: (name, t) for name, t in plain_model.state_dict(keep_vars=True).items()}
    caught: dict[str, torch.Tensor] = {}

    class CatchCopies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.copy_.default and args[0].device.type == "meta":
                entry = by_storage.get(args[0].untyped_storage()._cdata)
                if entry is None or tuple(args[0].shape) != tuple(entry[1].shape):
                    raise CheckpointError(f"checkpoint {path}: timm's .npz loader writes part of a tensor; "
                                          "set dist.init=full to load it")
                value = args[1].detach().to(entry[1].dtype).expand(entry[1].shape)
                caught[entry[0]] = (value if slice_of is None else value[slice_of(entry[0])]).clone()
                return args[0]
            return func(*args, **(kwargs or {}))

    with CatchCopies():
        _load_npz(plain_model, path)
    return caught
