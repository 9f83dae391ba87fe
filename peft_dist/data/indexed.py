"""Random access to the samples of a split by their index in file order (the order of ``_info.json``'s shards).

The offsets come from Python's own ``tarfile`` (it follows ustar, GNU and PAX headers), read once per shard when a
loader is built: each sample is the group of consecutive members sharing a webdataset key (the name up to the first
dot of its last path component), and only the image and ``.cls`` members are kept. Reading sample ``i`` is then a
seek and a read per member, with no tar parsing; a worker opens each shard once. Building the index also checks
every shard against ``_info.json``: a shard that holds fewer (or more) samples than listed is named.

webdataset's own indexed reader (``wids``) was considered and not used: it stores its index files with ``pickle``
and decodes ``.pkl`` members, and nothing here may ever unpickle data.
"""
from __future__ import annotations

import bisect
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any

from peft_dist.data.info import DataError
from peft_dist.data.transforms import KEPT_MEMBERS

_KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")
"""webdataset's split of a member name into sample key and suffix (``a/b.c.jpg`` → ``a/b``, ``c.jpg``)."""

Members = dict[str, tuple[int, int]]
"""suffix → (data offset, size) of one sample's kept members."""


def index_shard(path: str) -> list[tuple[str, Members]]:
    """``(key, members)`` of every sample of a tar shard, in file order."""
    samples: list[tuple[str, Members]] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                match = _KEY_AND_SUFFIX.match(member.name)
                if match is None:
                    continue
                key, suffix = match.group(1), match.group(2).lower()
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                if suffix in KEPT_MEMBERS:
                    if suffix in samples[-1][1]:
                        raise DataError(f"unreadable shard {path}: member {member.name} appears twice")
                    samples[-1][1][suffix] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"unreadable shard {path}: {e}") from None
    return samples


@dataclass
class IndexedSplit:
    """The samples of one split, addressable by index ``0 .. num_samples - 1`` in file order. Picklable (loader
    workers get a copy of the index; open files are per process and not copied)."""

    shards: list[str]
    lengths: list[int]
    index: list[list[tuple[str, Members]]] = field(default_factory=list)
    _starts: list[int] = field(default_factory=list)
    _open: dict[int, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, shards: list[str], lengths: list[int]) -> "IndexedSplit":
        index = []
        for path, listed in zip(shards, lengths):
            samples = index_shard(path)
            if len(samples) != listed:
                raise DataError(f"shard {path} holds {len(samples)} samples but _info.json lists {listed}; rewrite "
                                "the shards with `peft-dist shards`")
            index.append(samples)
        starts, total = [], 0
        for n in lengths:
            starts.append(total)
            total += n
        return cls(list(shards), list(lengths), index, starts)

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} of a split of {self.num_samples}")
        shard = bisect.bisect_right(self._starts, i) - 1
        return shard, i - self._starts[shard]

    def read(self, i: int) -> dict[str, Any]:
        """Sample ``i`` as webdataset's tar reader groups it: ``__key__``, ``__url__`` and the kept member bytes."""
        shard, local = self.locate(i)
        key, members = self.index[shard][local]
        stream = self._open.get(shard)
        if stream is None:
            stream = self._open[shard] = open(self.shards[shard], "rb")
        sample: dict[str, Any] = {"__key__": key, "__url__": self.shards[shard]}
        for suffix, (offset, size) in members.items():
            stream.seek(offset)
            data = stream.read(size)
            if len(data) != size:
                raise DataError(f"unreadable shard {self.shards[shard]}: member {key}.{suffix} is cut short")
            sample[suffix] = data
        return sample

    def close(self) -> None:
        for stream in self._open.values():
            stream.close()
        self._open.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}
        return state
