"""``data.sampling: exact`` (the default): every epoch draws every training sample exactly once over all ranks (plus
the documented padding), for 1, 2 or 7 shards, 1–4 ranks, 0–2 loader workers and batch sizes that do not divide
the split; the order changes between epochs and not between runs; a resumed epoch yields exactly the samples not yet
drawn; a short shard is named; SPT's sensitivity subset is the split's first samples in file order."""
import collections
import io
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from peft_dist.config import DataConfig
from peft_dist.data import DataError, build_train_loader, write_shards
from peft_dist.data.loader import build_ordered_loader

N = 50
HALF = (0.5, 0.5, 0.5)
LAYOUTS = {1: 50, 2: 25, 7: 8}  # shards -> shard_size (7 shards: 6 x 8 + 2)


def ids_of(batch) -> list[int]:
    """Labels are sample ids; the red channel carries the id as well, so images and labels must stay paired."""
    red = ((batch.images[:, 0] * 0.5 + 0.5) * 255).mean(dim=(1, 2)).round().long().tolist()
    assert red == batch.labels.tolist()
    return batch.labels.tolist()


@pytest.fixture(scope="module")
def split_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    (root / "img").mkdir()
    lines = []
    for i in range(N):
        img = np.zeros((8, 8, 3), dtype=np.uint8)
        img[..., 0] = i
        Image.fromarray(img).save(root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png {i}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    dirs = {}
    for shards, size in LAYOUTS.items():
        info = write_shards(f"list:{root / 'list.txt'}", root / f"s{shards}", shard_size=size, seed=0)
        assert len(info["splits"]["train"]["filenames"]) == shards
        dirs[shards] = root / f"s{shards}"
    return dirs


def cfg_for(path, **kw) -> DataConfig:
    base = dict(path=str(path), img_size=8, batch_size=3, num_workers=0, mean=HALF, std=HALF)
    return DataConfig(**{**base, **kw})


def epoch_ids(cfg, world: int, epoch: int, seed: int = 0, start_batch: int = 0) -> list[list[int]]:
    """Per rank, the ids each batch of one epoch holds, in order (rank-major)."""
    out = []
    for rank in range(world):
        loader = build_train_loader(cfg, rank, world, seed)
        loader.set_epoch(epoch, start_batch=start_batch)
        batches = list(loader)
        assert len(batches) == loader.batches_per_epoch - start_batch
        out.append([ids_of(b) for b in batches])
    return out


@pytest.mark.parametrize("shards", sorted(LAYOUTS))
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_every_sample_once_per_epoch_plus_padding(split_dirs, shards, world, workers):
    batch = 3 + (world + workers + shards) % 3  # 3, 4 or 5: none divides 50 / world evenly for all worlds
    cfg = cfg_for(split_dirs[shards], batch_size=batch, num_workers=workers)
    per_rank = -(-N // world)
    loaders = [build_train_loader(cfg, r, world, seed=0) for r in range(world)]
    assert {ld.batches_per_epoch for ld in loaders} == {-(-per_rank // batch)}  # equal on every rank
    assert loaders[0].sampling == "exact" and loaders[0].padded_samples_per_epoch == per_rank * world - N
    orders = []
    for epoch in range(2):
        ranks = epoch_ids(cfg, world, epoch)
        drawn = [i for rank in ranks for b in rank for i in b]
        counts = collections.Counter(drawn)
        assert set(counts) == set(range(N))
        assert sum(c - 1 for c in counts.values()) == per_rank * world - N  # only the documented padding repeats
        orders.append(drawn)
    assert orders[0] != orders[1]  # a new permutation each epoch


def test_drop_remainder_leaves_out_the_tail_of_each_epoch(split_dirs):
    cfg = cfg_for(split_dirs[2], remainder="drop", batch_size=4)
    ranks = epoch_ids(cfg, 3, epoch=0)
    drawn = [i for rank in ranks for b in rank for i in b]
    assert len(drawn) == len(set(drawn)) == 48  # 50 // 3 * 3
    assert build_train_loader(cfg, 0, 3, seed=0).padded_samples_per_epoch == -2


def test_same_seed_same_batches_whatever_the_worker_count(split_dirs):
    """Batch b is a function of (seed, epoch, rank, b): 0, 1 or 2 workers give the same images, augmented alike."""
    runs = []
    for workers in (0, 1, 2):
        loader = build_train_loader(cfg_for(split_dirs[7], num_workers=workers, augment="flip"), 1, 2, seed=5)
        loader.set_epoch(3)
        runs.append(list(loader))
    for other in runs[1:]:
        assert all(torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) for a, b in zip(runs[0], other))
    again = build_train_loader(cfg_for(split_dirs[7], augment="flip"), 1, 2, seed=6)
    again.set_epoch(3)
    assert [b.labels.tolist() for b in again] != [b.labels.tolist() for b in runs[0]]  # another seed, another order


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_yields_exactly_what_was_not_yet_drawn(split_dirs, workers):
    cfg = cfg_for(split_dirs[7], num_workers=workers)
    full = epoch_ids(cfg, 2, epoch=1)
    resumed = epoch_ids(cfg, 2, epoch=1, start_batch=3)
    assert resumed == [rank[3:] for rank in full]


def test_resume_does_not_read_the_skipped_batches(split_dirs, monkeypatch):
    from peft_dist.data.indexed import IndexedSplit

    reads = []
    original = IndexedSplit.read
    monkeypatch.setattr(IndexedSplit, "read", lambda self, i: reads.append(i) or original(self, i))
    loader = build_train_loader(cfg_for(split_dirs[1]), 0, 1, seed=0)
    loader.set_epoch(0, start_batch=loader.batches_per_epoch - 1)
    (last,) = list(loader)
    skipped = (loader.batches_per_epoch - 1) * 3
    assert reads == loader.stream.rank_indices()[skipped:] and len(reads) == len(last.labels) == N - skipped


def test_a_short_shard_is_named_before_training(split_dirs, tmp_path):
    """A shard truncated on a sample boundary (tar members of the first 5 samples only) against _info.json."""
    copy = tmp_path / "short"
    shutil.copytree(split_dirs[2], copy)
    shard = copy / "train-000001.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()][:10]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(DataError, match=r"shard .*train-000001.tar holds 5 samples but _info.json lists 25"):
        build_train_loader(cfg_for(copy), 0, 1, seed=0)
    with pytest.raises(DataError, match=r"train-000001.tar holds 5 samples but _info.json lists 25"):
        list(build_train_loader(cfg_for(copy, sampling="resampled"), 0, 1, seed=0))


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (4, 1)])
def test_sensitivity_subset_is_the_first_samples_in_file_order(split_dirs, world, workers):
    """Global batch b holds samples b·G .. (b+1)·G − 1 of the split in file order (G = 8 here), each rank its
    contiguous slice, for any world size and worker count (spec spt_arc_hta.md §1.2)."""
    from peft_dist.data.indexed import IndexedSplit
    from peft_dist.data.info import read_info

    info = read_info(split_dirs[7])
    split = IndexedSplit.build([str(p) for p in info.shard_paths("train")], info.split("train").shard_lengths)
    file_order = [int(split.read(i)["cls"]) for i in range(N)]
    cfg = cfg_for(split_dirs[7], batch_size=8 // world, num_workers=workers)
    per_rank = [[ids_of(b) for b in build_ordered_loader(cfg, r, world, num_batches=3)] for r in range(world)]
    global_batches = [[i for r in range(world) for i in per_rank[r][b]] for b in range(3)]
    assert global_batches == [file_order[0:8], file_order[8:16], file_order[16:24]]
    with pytest.raises(DataError, match=r"holds 50 samples; 7 batches of 8 need 56"):
        build_ordered_loader(cfg, 0, world, num_batches=7)


def trainer_on(path, out, *extra):
    from launcher.env import DistEnv
    from peft_dist.train.trainer import Trainer
    from test_baselines import tiny_cfg

    cfg = tiny_cfg(out, "lora", "data.source=shards", f"data.path={path}", "data.img_size=32", "data.batch_size=8",
                   "data.eval_batch_size=25", "data.eval_split=train", "data.num_workers=0", "model.num_classes=50", "method.dropout=0.1",
                   "train.log_every=1", *extra)
    return Trainer(cfg, DistEnv(), torch.device("cpu"))


def test_trainer_resume_on_shards_equals_the_uninterrupted_run(split_dirs, tmp_path):
    """7 batches per epoch; interrupted before step 9, resumed from the step-8 checkpoint in the middle of the
    second epoch: the data position is sought, and the adapters end bitwise equal."""
    straight = trainer_on(split_dirs[7], tmp_path / "a", "train.steps=12")
    straight.fit()
    interrupted = trainer_on(split_dirs[7], tmp_path / "b", "train.steps=12", "train.save_every_steps=4")
    original = interrupted.train_step

    def train_step(step, stream):
        if step == 9:
            raise KeyboardInterrupt
        return original(step, stream)

    interrupted.train_step = train_step
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    resumed = trainer_on(split_dirs[7], tmp_path / "b", "train.steps=12", "train.save_every_steps=4",
                         "train.resume=auto")
    assert resumed.start_step == 8
    resumed.fit()
    reference, got = straight.engine.state_dict(), resumed.engine.state_dict()
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in reference)


def test_a_corrupt_sample_met_every_epoch_is_counted_once(split_dirs, tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(split_dirs[1].parent / "img", copy / "img")
    (copy / "img" / "7.png").write_bytes(b"not a png")
    (copy / "list.txt").write_text("".join(f"img/{i}.png {i}\n" for i in range(N)))
    write_shards(f"list:{copy / 'list.txt'}", copy / "shards", shard_size=20, seed=0)
    trainer = trainer_on(copy / "shards", tmp_path / "run", "train.steps=21", "data.skip_corrupt=true",
                         "train.eval_every_epochs=1")
    summary = trainer.fit()
    assert summary["skipped_samples"] == 1  # met in 3 training epochs and 3 evaluations (eval reads train here)
    assert summary["sampling"] == "exact" and summary["padded_samples_per_epoch"] == 0
