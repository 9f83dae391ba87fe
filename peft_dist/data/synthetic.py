"""``data.source: synthetic`` — the loader interface over generated tensors, for tests and dry runs.

Sample ``i`` of a split is a pure function of ``(data.synthetic_seed, split, i)``: a label drawn from
``synthetic_classes`` and an image ``0.5 * pattern[label] + N(0, 1)`` noise, where each class has a fixed random
pattern. So the data can be learned (a trainer test can watch the loss fall), train and eval share the patterns
but not the samples, and which rank reads a sample never changes what the sample is.

Batching follows the shard loader's contract (``peft_dist.data.loader``, spec ecosystem §5): training yields exactly
``batches_per_epoch = ceil(synthetic_samples / (batch_size * world_size))`` batches on every rank, from a
permutation seeded by ``(seed, epoch)`` that wraps around to fill the last global batch; eval (a quarter as many
samples) yields every sample exactly once over the ranks. Generation is cheap, so no worker processes are used.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from peft_dist.data.info import DatasetInfo, SplitInfo
from peft_dist.data.loader import Batch, derive_seed, global_range

SIGNAL = 0.5
"""Scale of the class pattern against unit noise: learnable by a tiny ViT in a few steps, not trivially."""


class SyntheticData:
    def __init__(self, cfg):
        self.seed, self.classes, self.size = cfg.synthetic_seed, cfg.synthetic_classes, cfg.img_size
        g = torch.Generator().manual_seed(derive_seed("synthetic-patterns", self.seed))
        self.patterns = torch.randn(self.classes, 3, self.size, self.size, generator=g)

    def sample(self, split: str, index: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(derive_seed("synthetic-sample", self.seed, split, index))
        label = int(torch.randint(self.classes, (1,), generator=g))
        noise = torch.randn(3, self.size, self.size, generator=g)
        return SIGNAL * self.patterns[label] + noise, label

    def batch(self, split: str, indices: list[int]) -> Batch:
        pairs = [self.sample(split, i) for i in indices]
        return Batch(torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs], dtype=torch.long), ())


def synthetic_info(cfg) -> DatasetInfo:
    splits = {cfg.train_split: SplitInfo(cfg.train_split, cfg.synthetic_samples, [], []),
              cfg.eval_split: SplitInfo(cfg.eval_split, max(1, cfg.synthetic_samples // 4), [], [])}
    return DatasetInfo(classes=[str(c) for c in range(cfg.synthetic_classes)], splits=splits, source="synthetic")


class SyntheticTrainLoader:
    def __init__(self, cfg, rank: int, world_size: int, seed: int):
        self.data, self.info, self.split = SyntheticData(cfg), synthetic_info(cfg), cfg.train_split
        self.rank, self.world_size, self.seed, self.batch_size = rank, world_size, seed, cfg.batch_size
        self.num_samples = cfg.synthetic_samples
        self.batches_per_epoch = math.ceil(self.num_samples / (self.batch_size * world_size))
        self.epoch = self.start_batch = 0
        self.sampling = "synthetic"

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(derive_seed("synthetic-order", self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=g).tolist()
        for b in range(self.start_batch, self.batches_per_epoch):
            first = (b * self.world_size + self.rank) * self.batch_size
            yield self.data.batch(self.split, [order[i % self.num_samples]
                                               for i in range(first, first + self.batch_size)])


class SyntheticEvalLoader:
    def __init__(self, cfg, rank: int, world_size: int):
        self.data, self.info, self.split = SyntheticData(cfg), synthetic_info(cfg), cfg.eval_split
        self.total_samples = self.info.split(cfg.eval_split).num_samples
        self.start, self.stop = global_range(rank, world_size, self.total_samples)
        self.num_samples = self.stop - self.start
        self.batch_size = cfg.eval_batch_size
        self.num_batches = math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for first in range(self.start, self.stop, self.batch_size):
            yield self.data.batch(self.split, list(range(first, min(first + self.batch_size, self.stop))))
