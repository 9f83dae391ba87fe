"""The ``_info.json`` written beside the shards, and the errors of the data package.

The file follows the shape timm's webdataset reader expects (``splits.<name>.num_samples / filenames /
shard_lengths``, spec ecosystem §5 "reference implementation"), plus the class names, so the loader can size an
epoch (``num_samples``) and split the eval set exactly (``shard_lengths``) without opening a tar.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INFO_FILE = "_info.json"
INFO_FORMAT = "peft-dist-shards"
INFO_VERSION = 1
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
"""Split names become file-name prefixes (``{split}-000000.tar``): letters, digits and underscores only."""
SHARD_NAME = re.compile(r"^[A-Za-z0-9_]+-[0-9]{6}\.tar$")


class DataError(ValueError):
    """A problem with the data the user pointed us at; the message names the file (and key) at fault."""


class MissingDataError(DataError, FileNotFoundError):
    """A shard directory, ``_info.json``, shard file or split that does not exist."""


class CorruptSampleError(DataError):
    """One sample cannot be decoded: bad image bytes, no image, no ``.cls`` or an unusable label.

    Built with :meth:`of`. The constructor takes the bare message as well because a DataLoader worker's exception
    is re-created in the main process as ``type(message_with_worker_traceback)``, which keeps the type."""

    def __init__(self, message: str, shard: str | None = None, key: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.shard, self.key, self.reason = shard, key, reason

    @classmethod
    def of(cls, shard: str, key: str, reason: str) -> "CorruptSampleError":
        return cls(f"corrupt sample {key!r} in shard {shard}: {reason} "
                   "(set data.skip_corrupt=true to skip and count such samples)", shard, key, reason)


@dataclass
class SplitInfo:
    name: str
    num_samples: int
    filenames: list[str]
    shard_lengths: list[int]


@dataclass
class DatasetInfo:
    """What the loader knows about a shard directory (or the synthetic source)."""

    classes: list[str]
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    root: Path | None = None
    source: str = ""
    task: str | None = None
    """The benchmark task the shards were written from (``vtab/cifar``; peft_dist.tasks), if any."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_samples(self) -> dict[str, int]:
        """Samples per split, e.g. ``{"train": 1437, "test": 360}``."""
        return {name: s.num_samples for name, s in self.splits.items()}

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            where = self.root / INFO_FILE if self.root else self.source
            raise MissingDataError(f"split {name!r} not found in {where}; available splits: "
                                   f"{', '.join(sorted(self.splits)) or 'none'}")
        return self.splits[name]

    def shard_paths(self, name: str) -> list[Path]:
        assert self.root is not None, "shard paths exist only for shard directories"
        return [self.root / f for f in self.split(name).filenames]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INFO_FORMAT, "version": INFO_VERSION, "source": self.source, "task": self.task,
            "num_classes": self.num_classes, "classes": list(self.classes),
            "splits": {name: {"num_samples": s.num_samples, "filenames": list(s.filenames),
                              "shard_lengths": list(s.shard_lengths)} for name, s in self.splits.items()},
        }


def read_info(shard_dir: str | Path) -> DatasetInfo:
    """Read and check ``shard_dir/_info.json``; every listed shard must exist in ``shard_dir``."""
    root = Path(shard_dir)
    if not root.is_dir():
        raise MissingDataError(f"shard directory not found: {root} (write one with `peft-dist shards`)")
    path = root / INFO_FILE
    if not path.is_file():
        raise MissingDataError(f"{path} not found: {root} is not a shard directory written by `peft-dist shards`")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None

    def bad(why: str) -> DataError:
        return DataError(f"{path}: {why}")

    if not isinstance(raw, dict) or not isinstance(raw.get("splits"), dict):
        raise bad("expected an object with a 'splits' mapping")
    classes = raw.get("classes")
    if not isinstance(classes, list) or not classes:
        raise bad("expected a non-empty 'classes' list")
    if raw.get("num_classes", len(classes)) != len(classes):
        raise bad(f"num_classes={raw.get('num_classes')} but {len(classes)} class names")
    splits = {}
    for name, entry in raw["splits"].items():
        if not SPLIT_NAME.match(name) or not isinstance(entry, dict):
            raise bad(f"split {name!r}: expected a name of letters/digits/_ mapping to an object")
        files, lengths = entry.get("filenames"), entry.get("shard_lengths")
        if not isinstance(files, list) or not isinstance(lengths, list) or len(files) != len(lengths):
            raise bad(f"split {name!r}: 'filenames' and 'shard_lengths' must be lists of equal length")
        for f in files:
            # Names only, never paths or URLs: a shard list must not be able to reach outside the directory
            # (or into webdataset's pipe: protocol).
            if not isinstance(f, str) or not SHARD_NAME.match(f):
                raise bad(f"split {name!r}: bad shard file name {f!r} (expected like {name}-000000.tar)")
            if not (root / f).is_file():
                raise MissingDataError(f"shard file listed in {path} not found: {root / f}")
        if not all(isinstance(n, int) and n >= 0 for n in lengths) or entry.get("num_samples") != sum(lengths):
            raise bad(f"split {name!r}: num_samples={entry.get('num_samples')!r} does not equal the sum of "
                      f"shard_lengths {lengths}")
        splits[name] = SplitInfo(name, int(entry["num_samples"]), list(files), [int(n) for n in lengths])
    return DatasetInfo(classes=[str(c) for c in classes], splits=splits, root=root,
                       source=str(raw.get("source", "")), task=raw.get("task") or None)
