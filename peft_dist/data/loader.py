"""Loaders over the tar shards of ``peft-dist shards`` (spec ecosystem §5, webdataset 1.0.2 traps).

Training, ``data.sampling: exact`` (the default) — every sample once per epoch
    Each epoch is a permutation of all sample indices of the split, seeded by ``(seed, epoch)`` and dealt over the
    ranks as torch's ``DistributedSampler`` deals it (``epoch_indices``: padded with the permutation's first indices,
    or its tail dropped, so that every rank gets the same count and the same number of batches — no collective can
    hang). Samples are read by index (``peft_dist.data.indexed``), so one shard or thousands, any world size and any
    worker count give the same epoch; batch ``b`` of a rank is a function of ``(seed, epoch, rank, b)`` alone, and
    a resumed epoch starts at its batch without reading the ones before. The last batch of an epoch may be short.

Training, ``data.sampling: resampled`` — streaming, equal batch counts on every rank, whatever the shard sizes
    ``split_by_node`` over 7 unequal shards gives ranks 14/10/10 batches and a collective-based trainer hangs
    (spec §5). So every loader worker reads an *endless* shard stream and ``WebLoader(...).with_epoch(n)`` cuts the
    rank's epoch at ``n = batches_per_epoch = ceil(num_train_samples / (batch_size * world_size))`` batches
    (counted on the loader, not per worker — spec §5 / webdataset FAQ). One epoch thus yields
    ``n * batch_size * world_size >= num_train_samples`` samples over all ranks. The loader takes batches from its
    workers round-robin, so worker ``w`` of ``W`` contributes ``len(range(w, n, W))`` of them; each worker stops
    there, which ends the DataLoader at exactly ``n`` without decoding prefetched batches only to drop them.

    The endless stream is our own rather than webdataset's ``ResampledShards``: that one draws shards with
    replacement, independently per worker, and reads rank/world from ``RANK``/``WORLD_SIZE`` (spec §5). Here one
    shard sequence per epoch — shuffled passes over all shards, seeded by ``(seed, epoch)`` and shared by every
    rank — is dealt round-robin to the ``world_size * num_workers`` global workers (worker ``g`` reads sequence
    positions ``g, g + G, g + 2G, ...``; the timm ``reader_wds`` split by global worker id). The epoch's reads
    then form one contiguous stretch of that sequence, so an epoch touches every shard once before any shard twice:
    every sample is visited once per epoch in expectation, and all but the last partly-read shards surely.
    Rank and world are passed in explicitly; the environment is never consulted.

    Each worker shuffles its samples in chunks of ``min(shuffle_buffer, samples it yields per epoch)`` with a
    generator seeded by ``(seed, epoch, rank, worker)``, then decodes, augments (its own torch/python/NumPy RNGs
    from the same tuple, swapped in around each batch so the training process's RNG is untouched with
    ``num_workers=0``) and batches. ``set_epoch(e)`` before iterating re-seeds all of it: a run is reproducible and
    a resumed run can skip exactly the batches it already consumed.

Evaluation — every sample exactly once over all ranks
    Not resampled. The split's samples, in shard order, are cut into ``world_size * num_workers`` contiguous
    ranges (sizes differ by at most one); global worker ``g`` reads only the shards overlapping its range and keeps
    the samples whose index falls in it, using ``shard_lengths`` from ``_info.json``. Exact for any number of
    shards, ranks and workers. Ranks may get different batch counts (at most one more per worker, as each worker's
    last batch may be short); the trainer only reduces totals.

Corrupt samples (bad image bytes, no image, no/unparsable ``.cls``, label out of range) raise an error naming the
shard and the key, or with ``skip_corrupt`` are dropped and counted: each :class:`Batch` carries how many samples
its worker dropped since that worker's previous batch. Only ``.jpg/.jpeg/.png`` and ``.cls`` members are kept
from a tar, decoded by PIL / ``int``; nothing is ever unpickled.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from launcher.preemption import ignore_in_worker
from peft_dist.data.indexed import IndexedSplit
from peft_dist.data.info import CorruptSampleError, DataError, DatasetInfo, read_info
from peft_dist.data.transforms import KEPT_MEMBERS, build_transform, decode_sample

log = logging.getLogger(__name__)


class Batch(NamedTuple):
    images: torch.Tensor
    """``FloatTensor[N, 3, img_size, img_size]``, normalised."""
    labels: torch.Tensor
    """``LongTensor[N]``."""
    skipped: tuple[int, ...]
    """Ids (``sample_id``) of the corrupt samples the producing worker dropped since its previous batch (none
    unless ``skip_corrupt``): ids, so that a sample met in several epochs or evaluations is counted once."""


# ----------------------------------------------------------------------------------------------- helpers
def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from a tuple (seed, epoch, rank, worker, ...): stable across processes and Python runs,
    unlike ``hash``, and well mixed, unlike ``seed + epoch + rank``."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_id(shard: str, key: str) -> int:
    """A stable 63-bit id of one sample (its shard's file name and its key), the same in every loader."""
    return derive_seed("sample", os.path.basename(shard), key)


def worker_slot() -> tuple[int, int]:
    """``(worker id, workers)`` of the DataLoader worker running us; ``(0, 1)`` in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def read_shard(path: str) -> Iterator[dict[str, Any]]:
    """Samples of one tar shard as webdataset groups them (``__key__``, ``__url__``, member bytes), keeping only
    image and ``.cls`` members. The file is opened here, not through webdataset's ``gopen`` (no ``pipe:``, no
    ``GOPEN_REWRITE``)."""
    from peft_dist.compat import private_attr

    group_by_keys = private_attr("webdataset.tariterators", "group_by_keys", "reading tar shards", "webdataset 1.0")
    tar_file_expander = private_attr("webdataset.tariterators", "tar_file_expander", "reading tar shards",
                                     "webdataset 1.0")

    with open(path, "rb") as stream:
        try:
            yield from group_by_keys(tar_file_expander([{"url": path, "stream": stream}]), suffixes=KEPT_MEMBERS)
        except Exception as e:  # tarfile.ReadError, a duplicate member (ValueError), I/O errors
            reason = e.args[0] if e.args else type(e).__name__
            raise DataError(f"unreadable shard {path}: {reason}") from None


def shard_sequence(num_shards: int, seed: int, epoch: int) -> Iterator[int]:
    """Endless shard indices: pass after pass, each pass a permutation seeded by ``(seed, epoch, pass)``."""
    for pass_index in itertools.count():
        order = list(range(num_shards))
        random.Random(derive_seed("shards", seed, epoch, pass_index)).shuffle(order)
        yield from order


def chunk_shuffled(samples: Iterator[Any], chunk: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle consecutive chunks of ``chunk`` samples. Unlike a reservoir buffer, every sample read is yielded
    before the next chunk is read, so what an epoch yields is exactly a prefix of the worker's shard sequence
    (the coverage argument of the module doc)."""
    if chunk <= 1:
        yield from samples
        return
    buf: list[Any] = []
    for s in samples:
        buf.append(s)
        if len(buf) == chunk:
            rng.shuffle(buf)
            yield from buf
            buf = []
    rng.shuffle(buf)
    yield from buf


class RngScope:
    """A private torch + ``random`` + NumPy RNG stream (timm's RandAugment draws from NumPy's global RNG), swapped
    in only while the scope is active: augmentation in the main process (``num_workers=0``) must not shift the
    training process's own random numbers, and forked workers must not share NumPy's inherited state."""

    def __init__(self, seed: int):
        self.torch_state = torch.Generator().manual_seed(seed).get_state()
        self.python_state = random.Random(seed).getstate()
        self.numpy_state = np.random.RandomState(seed % 2**32).get_state()

    @contextlib.contextmanager
    def active(self):
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.set_rng_state(self.torch_state)
        random.setstate(self.python_state)
        np.random.set_state(self.numpy_state)
        try:
            yield
        finally:
            self.torch_state, self.python_state, self.numpy_state = \
                torch.get_rng_state(), random.getstate(), np.random.get_state()
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


@dataclass
class SampleDecoder:
    """Raw grouped sample → ``(image tensor, label)``; picklable, so it travels to spawned workers too."""

    num_classes: int
    transform: Callable
    skip_corrupt: bool
    image_shape: tuple[int, int, int]
    """``(3, img_size, img_size)``: the shape of an empty batch's images."""

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        image, label = decode_sample(sample, self.num_classes)
        return self.transform(image), label


def batches_of(samples: Iterator[dict[str, Any]], decoder: SampleDecoder, batch_size: int, split_samples: int,
               rng: RngScope | None = None, finite: bool = False) -> Iterator[Batch]:
    """Decode and collate ``batch_size`` samples at a time (the last batch may be short when ``samples`` ends).

    With ``skip_corrupt`` a corrupt sample is logged and counted into the next batch's ``skipped``; if more than a
    whole split's worth of samples in a row is corrupt no batch can ever form, which is an error, not a hang.
    ``finite`` (eval) keeps the count exact to the end: each batch is held back until the next one is formed, so
    corrupt samples after the last good one join the final batch's count, and a worker whose samples are all
    corrupt yields one empty batch carrying it."""
    scope = rng.active if rng is not None else contextlib.nullcontext
    skipped: list[int] = []
    corrupt_in_a_row = 0
    held: Batch | None = None
    while True:
        images: list[torch.Tensor] = []
        labels: list[int] = []
        with scope():
            for sample in samples:
                try:
                    image, label = decoder(sample)
                except CorruptSampleError as e:
                    if not decoder.skip_corrupt:
                        raise
                    log.warning("skipping corrupt sample %r in shard %s: %s", e.key, e.shard, e.reason)
                    skipped.append(sample_id(str(e.shard), str(e.key)))
                    corrupt_in_a_row += 1
                    if corrupt_in_a_row > split_samples:
                        raise DataError(f"no decodable sample among {corrupt_in_a_row} in a row; last: {e}") from None
                    continue
                corrupt_in_a_row = 0
                images.append(image)
                labels.append(label)
                if len(images) == batch_size:
                    break
        ended = len(images) < batch_size
        if images:
            batch = Batch(torch.stack(images), torch.tensor(labels, dtype=torch.long), tuple(skipped))
            skipped = []
            if not finite:
                yield batch
            else:
                if held is not None:
                    yield held
                held = batch
        if ended:
            if held is not None:
                yield held._replace(skipped=held.skipped + tuple(skipped))
            elif skipped:
                yield Batch(torch.empty(0, *decoder.image_shape), torch.empty(0, dtype=torch.long), tuple(skipped))
            return


# ----------------------------------------------------------------------------------------------- streams
class TrainStream(IterableDataset):
    """One rank's epoch of training batches, read from an endless epoch-seeded shard stream (per loader worker);
    see the module doc."""

    def __init__(self, shards: list[str], num_samples: int, decoder: SampleDecoder, batch_size: int,
                 batches_per_epoch: int, rank: int, world_size: int, seed: int, shuffle_buffer: int,
                 shard_lengths: list[int] | None = None):
        super().__init__()
        self.shards, self.num_samples, self.decoder = shards, num_samples, decoder
        self.shard_lengths = shard_lengths
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, shuffle_buffer
        self.epoch = 0

    def raw_samples(self, global_worker: int, global_workers: int) -> Iterator[dict[str, Any]]:
        shards_without_samples = 0
        positions = shard_sequence(len(self.shards), self.seed, self.epoch)
        for position, shard in enumerate(positions):
            if position % global_workers != global_worker:
                continue
            count = 0
            for sample in read_shard(self.shards[shard]):
                count += 1
                yield sample
            if self.shard_lengths is not None and count != self.shard_lengths[shard]:
                raise DataError(f"shard {self.shards[shard]} holds {count} samples but _info.json lists "
                                f"{self.shard_lengths[shard]}; rewrite the shards with `peft-dist shards`")
            shards_without_samples = 0 if count else shards_without_samples + 1
            if shards_without_samples > len(self.shards):
                raise DataError(f"the training shards hold no samples ({self.shards[0]} ...)")

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = worker_slot()
        my_batches = len(range(worker, self.batches_per_epoch, workers))  # the loader takes batches round-robin
        chunk = min(self.shuffle_buffer, max(1, my_batches) * self.batch_size)
        key = (self.seed, self.epoch, self.rank, worker)
        order_rng = random.Random(derive_seed("order", *key))
        samples = chunk_shuffled(self.raw_samples(self.rank * workers + worker, self.world_size * workers),
                                 chunk, order_rng)
        batches = batches_of(samples, self.decoder, self.batch_size, self.num_samples,
                             RngScope(derive_seed("augment", *key)))
        # Stop at this worker's share of the epoch: the workers' shares add up to batches_per_epoch, so the
        # DataLoader ends exactly there and no worker decodes prefetched batches that with_epoch would discard.
        # with_epoch stays as the guarantee of the count.
        yield from itertools.islice(batches, my_batches)


def epoch_indices(num_samples: int, seed: int, epoch: int, rank: int, world_size: int, remainder: str) -> list[int]:
    """This rank's sample indices for one epoch, as torch's ``DistributedSampler`` deals them: a permutation of all
    ``num_samples`` seeded by ``(seed, epoch)``, made divisible by the world size (``pad``: the first indices of the
    permutation repeated; ``drop``: its tail left out), then every ``world_size``-th index from ``rank``."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(derive_seed("exact", seed, epoch)))
    order = order.tolist()
    if remainder == "pad":
        total = math.ceil(num_samples / world_size) * world_size
        while len(order) < total:
            order += order[:total - len(order)]
    else:
        total = num_samples // world_size * world_size
        order = order[:total]
    return order[rank:total:world_size]


def padded_per_epoch(num_samples: int, world_size: int, remainder: str) -> int:
    """Samples drawn twice (``pad``) or not at all (``drop``, negative) in each epoch over all ranks."""
    per_rank = math.ceil(num_samples / world_size) if remainder == "pad" else num_samples // world_size
    return per_rank * world_size - num_samples


class ExactTrainStream(IterableDataset):
    """One rank's epoch under ``data.sampling: exact``: the rank's share of the epoch's permutation, read by index
    (``IndexedSplit``), cut into batches ``0 .. batches_per_epoch - 1``. Batch ``b`` goes to loader worker
    ``b mod W``, the order in which the DataLoader takes them, so the stream is the same for any worker count; its
    augmentation RNG is seeded by ``(seed, epoch, rank, b)`` for the same reason. ``start_batch`` resumes an epoch
    without reading what came before."""

    def __init__(self, split: IndexedSplit, decoder: SampleDecoder, batch_size: int, rank: int, world_size: int,
                 seed: int, remainder: str):
        super().__init__()
        self.split, self.decoder, self.batch_size = split, decoder, batch_size
        self.rank, self.world_size, self.seed, self.remainder = rank, world_size, seed, remainder
        self.num_samples = split.num_samples
        self.epoch = self.start_batch = 0
        per_rank = len(self.rank_indices())
        if per_rank == 0:
            raise DataError(f"data.remainder=drop leaves no sample per rank: {self.num_samples} samples over "
                            f"{world_size} ranks")
        self.batches_per_epoch = math.ceil(per_rank / batch_size)
        self.padded_samples_per_epoch = padded_per_epoch(self.num_samples, world_size, remainder)

    def rank_indices(self) -> list[int]:
        """This rank's sample indices of the current epoch, in the order they are batched."""
        return epoch_indices(self.num_samples, self.seed, self.epoch, self.rank, self.world_size, self.remainder)

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = worker_slot()
        indices = self.rank_indices()
        try:
            for b in range(self.start_batch + worker, self.batches_per_epoch, workers):
                chunk = indices[b * self.batch_size:(b + 1) * self.batch_size]
                rng = RngScope(derive_seed("augment", self.seed, self.epoch, self.rank, b))
                # finite: a chunk whose samples are all corrupt (and skipped) still yields its empty, counted batch
                yield next(batches_of((self.split.read(i) for i in chunk), self.decoder, len(chunk),
                                      self.num_samples, rng, finite=True))
        finally:
            self.split.close()


class OrderedStream(ExactTrainStream):
    """The first ``num_batches`` global batches of a split in file order (``build_ordered_loader``)."""

    def __init__(self, split: IndexedSplit, decoder: SampleDecoder, batch_size: int, rank: int, world_size: int,
                 num_batches: int):
        self.num_batches = num_batches
        super().__init__(split, decoder, batch_size, rank, world_size, seed=0, remainder="drop")
        self.padded_samples_per_epoch = 0

    def rank_indices(self) -> list[int]:
        first, stride = self.rank * self.batch_size, self.batch_size * self.world_size
        return [b * stride + first + i for b in range(self.num_batches) for i in range(self.batch_size)]


def global_range(global_worker: int, global_workers: int, total: int) -> tuple[int, int]:
    """The contiguous ``[start, stop)`` of ``total`` sample indices owned by one of ``global_workers``."""
    return global_worker * total // global_workers, (global_worker + 1) * total // global_workers


class EvalStream(IterableDataset):
    """One rank's single pass over its exact share of the eval split; see the module doc."""

    def __init__(self, shards: list[str], shard_lengths: list[int], decoder: SampleDecoder, batch_size: int,
                 rank: int, world_size: int):
        super().__init__()
        self.shards, self.shard_lengths, self.decoder = shards, shard_lengths, decoder
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def samples(self, start: int, stop: int) -> Iterator[dict[str, Any]]:
        offset = 0
        for shard, length in zip(self.shards, self.shard_lengths):
            first, offset = offset, offset + length
            if offset <= start or first >= stop:
                continue
            count = 0
            with contextlib.closing(read_shard(shard)) as members:
                for index, sample in enumerate(members, start=first):
                    count += 1
                    if index >= stop:
                        break
                    if index >= start:
                        yield sample
                else:
                    if count != length:
                        raise DataError(f"shard {shard} holds {count} samples but _info.json lists {length}; "
                                        "rewrite the shards with `peft-dist shards`")

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = worker_slot()
        total = sum(self.shard_lengths)
        start, stop = global_range(self.rank * workers + worker, self.world_size * workers, total)
        yield from batches_of(self.samples(start, stop), self.decoder, self.batch_size, max(total, 1), finite=True)


# ----------------------------------------------------------------------------------------------- loaders
class WorkerFailure(NamedTuple):
    """A :class:`DataError` raised in a DataLoader worker, carried to the training process as an item: raised there,
    DataLoader would re-create it with the worker's whole traceback glued into its message."""

    error: DataError


class CarryDataErrors(IterableDataset):
    """``stream``'s batches; in a loader worker, a :class:`DataError` ends that worker's stream as a
    :class:`WorkerFailure` item, which :func:`raise_worker_failures` raises again, unchanged, in the training
    process. Any other exception is a bug and keeps DataLoader's traceback."""

    def __init__(self, stream: IterableDataset):
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[Batch | WorkerFailure]:
        try:
            yield from self.stream
        except DataError as e:
            if get_worker_info() is None:
                raise
            yield WorkerFailure(e)


def raise_worker_failures(batches: Iterator[Batch | WorkerFailure]) -> Iterator[Batch]:
    for batch in batches:
        if isinstance(batch, WorkerFailure):
            raise batch.error
        yield batch


class TrainLoader:
    """Iterate for one epoch of exactly ``batches_per_epoch`` :class:`Batch` es; call ``set_epoch(e)`` first
    (``set_epoch(e, start_batch=k)`` resumes at batch ``k``)."""

    def __init__(self, stream: TrainStream | ExactTrainStream, num_workers: int, info: DatasetInfo, split: str):
        import webdataset as wds

        self.stream, self.info, self.split = stream, info, split
        self.num_workers = num_workers
        self.batches_per_epoch = stream.batches_per_epoch
        self.num_samples = stream.num_samples
        self.sampling = "exact" if isinstance(stream, ExactTrainStream) else "resampled"
        self.padded_samples_per_epoch = getattr(stream, "padded_samples_per_epoch", 0)
        self.start_batch = 0
        # batch_size=None: the stream already batches; persistent_workers=False so each epoch's workers are
        # started with the epoch set by set_epoch (persistent ones would keep the first epoch's seed). A private
        # generator: DataLoader otherwise draws its workers' base seed from the caller's global torch RNG.
        private = torch.Generator().manual_seed(derive_seed("loader", stream.seed))
        self.loader = wds.WebLoader(CarryDataErrors(stream), batch_size=None, num_workers=num_workers,
                                    persistent_workers=False, shuffle=False, generator=private,
                                    worker_init_fn=ignore_in_worker).with_epoch(self.batches_per_epoch)

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Exact sampling seeks to ``start_batch`` without reading the batches before it; resampled streaming
        has no index to seek by, so it decodes and drops them (the same batches follow either way)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        self.stream.epoch = int(epoch)
        self.start_batch = int(start_batch)
        if isinstance(self.stream, ExactTrainStream):
            self.stream.start_batch = self.start_batch

    def __iter__(self) -> Iterator[Batch]:
        batches = raise_worker_failures(iter(self.loader))
        if isinstance(self.stream, ExactTrainStream):
            return itertools.islice(batches, self.batches_per_epoch - self.start_batch)
        return itertools.islice(batches, self.start_batch, None)

    def __len__(self) -> int:
        return self.batches_per_epoch


class EvalLoader:
    """One pass over this rank's share of the eval split (``num_samples`` of ``total_samples``)."""

    def __init__(self, stream: EvalStream, num_workers: int, info: DatasetInfo, split: str):
        import webdataset as wds

        self.stream, self.info, self.split = stream, info, split
        self.num_workers = num_workers
        workers = max(1, num_workers)
        self.total_samples = sum(stream.shard_lengths)
        ranges = [global_range(stream.rank * workers + w, stream.world_size * workers, self.total_samples)
                  for w in range(workers)]
        self.num_samples = sum(stop - start for start, stop in ranges)
        self.num_batches = sum(math.ceil((stop - start) / stream.batch_size) for start, stop in ranges)
        """Batches of this rank when no sample is skipped."""
        self.loader = wds.WebLoader(CarryDataErrors(stream), batch_size=None, num_workers=num_workers,
                                    persistent_workers=False, shuffle=False, generator=torch.Generator().manual_seed(0),
                                    worker_init_fn=ignore_in_worker)

    def __iter__(self) -> Iterator[Batch]:
        return raise_worker_failures(iter(self.loader))


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size")


def build_train_loader(cfg, rank: int, world_size: int, seed: int):
    """The training loader of ``cfg`` (a ``DataConfig``) for one rank: a :class:`TrainLoader`, or the synthetic
    equivalent for ``source: synthetic``. Both have ``batches_per_epoch``, ``set_epoch``, ``info``,
    ``num_samples`` and yield :class:`Batch`."""
    check_rank(rank, world_size)
    if cfg.source == "synthetic":
        from peft_dist.data.synthetic import SyntheticTrainLoader

        return SyntheticTrainLoader(cfg, rank, world_size, seed)
    cfg.require_path()
    info = read_info(cfg.path)
    split = info.split(cfg.train_split)
    if split.num_samples == 0:
        raise DataError(f"split {cfg.train_split!r} of {cfg.path} has no samples")
    decoder = SampleDecoder(info.num_classes, build_transform(cfg, train=True), cfg.skip_corrupt,
                            (3, cfg.img_size, cfg.img_size))
    shards = [str(p) for p in info.shard_paths(cfg.train_split)]
    if cfg.sampling == "resampled":
        batches = math.ceil(split.num_samples / (cfg.batch_size * world_size))
        stream = TrainStream(shards, split.num_samples, decoder, cfg.batch_size, batches, rank, world_size, seed,
                             cfg.shuffle_buffer, split.shard_lengths)
    else:  # exact (also auto: our shards always list their sample counts)
        stream = ExactTrainStream(IndexedSplit.build(shards, split.shard_lengths), decoder, cfg.batch_size, rank,
                                  world_size, seed, cfg.remainder)
    return TrainLoader(stream, cfg.num_workers, info, cfg.train_split)


def build_ordered_loader(cfg, rank: int, world_size: int, num_batches: int):
    """The first ``num_batches`` global batches of the train split in file order (SPT's sensitivity pass, spec
    spt_arc_hta.md §1.2: the first 16 × 32 images): global batch ``b`` holds samples ``b·G .. (b+1)·G − 1`` with
    ``G = batch_size × world_size``, and this rank takes its contiguous ``batch_size`` of them, whatever the world
    size and worker count."""
    check_rank(rank, world_size)
    cfg.require_path()
    info = read_info(cfg.path)
    split = info.split(cfg.train_split)
    global_batch = cfg.batch_size * world_size
    if num_batches * global_batch > split.num_samples:
        raise DataError(f"split {cfg.train_split!r} of {cfg.path} holds {split.num_samples} samples; "
                        f"{num_batches} batches of {global_batch} need {num_batches * global_batch}")
    decoder = SampleDecoder(info.num_classes, build_transform(cfg, train=True), cfg.skip_corrupt,
                            (3, cfg.img_size, cfg.img_size))
    indexed = IndexedSplit.build([str(p) for p in info.shard_paths(cfg.train_split)], split.shard_lengths)
    stream = OrderedStream(indexed, decoder, cfg.batch_size, rank, world_size, num_batches)
    return TrainLoader(stream, cfg.num_workers, info, cfg.train_split)


def build_eval_loader(cfg, rank: int, world_size: int):
    """The eval loader of ``cfg`` for one rank: every eval sample is yielded exactly once over all ranks."""
    check_rank(rank, world_size)
    if cfg.source == "synthetic":
        from peft_dist.data.synthetic import SyntheticEvalLoader

        return SyntheticEvalLoader(cfg, rank, world_size)
    cfg.require_path()
    info = read_info(cfg.path)
    split = info.split(cfg.eval_split)
    decoder = SampleDecoder(info.num_classes, build_transform(cfg, train=False), cfg.skip_corrupt,
                            (3, cfg.img_size, cfg.img_size))
    stream = EvalStream([str(p) for p in info.shard_paths(cfg.eval_split)], split.shard_lengths, decoder,
                        cfg.eval_batch_size, rank, world_size)
    return EvalLoader(stream, cfg.num_workers, info, cfg.eval_split)
