"""Streaming loaders (spec ecosystem §5): equal batch counts on every rank from unequal shards, per-epoch coverage
of the resampled stream, exactly-once eval over ranks and workers, seeded determinism independent of RANK /
WORLD_SIZE, corrupt samples (fail naming shard + key, or skip and count), no unpickling, clear errors for missing
data, and the synthetic source behind the same interface."""
import io
import json
import pathlib
import pickle
import random
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from peft_dist.config import DataConfig
from peft_dist.data import (Batch, CorruptSampleError, DataError, MissingDataError, build_eval_loader,
                            build_train_loader, write_shards)
from peft_dist.data.info import DatasetInfo, SplitInfo

N_SAMPLES, SHARD_SIZE = 250, 37  # → 7 shards: 6 x 37 + 28, as in the spec's hang example
HALF = (0.5, 0.5, 0.5)


def id_image(i: int) -> np.ndarray:
    """8x8 RGB: red = sample id everywhere (survives flips and crops), green = a left→right ramp (a flip shows)."""
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    img[..., 0] = i
    img[..., 1] = np.arange(8, dtype=np.uint8)[None, :] * 30
    return img


def ids_from_images(images: torch.Tensor) -> list[int]:
    """Invert ``id_image`` after normalisation with mean = std = 0.5 (red channel, averaged over pixels)."""
    red = (images[:, 0] * 0.5 + 0.5) * 255
    return red.mean(dim=(1, 2)).round().long().tolist()


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory):
    """250 samples whose label is their id (250 classes), in 7 shards of unequal size."""
    root = tmp_path_factory.mktemp("ids")
    (root / "img").mkdir()
    lines = []
    for i in range(N_SAMPLES):
        Image.fromarray(id_image(i)).save(root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png {i}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    info = write_shards(f"list:{root / 'list.txt'}", root / "shards", shard_size=SHARD_SIZE, seed=0)
    assert info["splits"]["train"]["shard_lengths"] == [37] * 6 + [28]
    shard_of = {}
    for s, name in enumerate(info["splits"]["train"]["filenames"]):
        with tarfile.open(root / "shards" / name) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".cls"):
                    shard_of[int(tar.extractfile(m).read())] = s
    return root / "shards", shard_of


def cfg_for(path, **kw) -> DataConfig:
    base = dict(path=str(path), img_size=8, batch_size=8, eval_batch_size=16, num_workers=0, mean=HALF, std=HALF)
    return DataConfig(**{**base, **kw})


def labels_of(batches) -> list[int]:
    out = []
    for b in batches:
        assert isinstance(b, Batch) and b.labels.dtype == torch.long and b.images.dtype == torch.float32
        assert ids_from_images(b.images) == b.labels.tolist()  # images and labels stay paired through the stream
        out += b.labels.tolist()
    return out


def test_resampled_unequal_shards_give_equal_batches_per_rank_and_cover_each_epoch(id_shards):
    """``data.sampling: resampled`` (streaming without an index): full batches on every rank, an epoch misses at
    most the one shard it reads partly."""
    path, shard_of = id_shards
    cfg = cfg_for(path, num_workers=2, sampling="resampled")
    loaders = [build_train_loader(cfg, rank=r, world_size=3, seed=0) for r in range(3)]
    assert [ld.batches_per_epoch for ld in loaders] == [11] * 3  # ceil(250 / (8 * 3))
    assert all(len(ld) == 11 and ld.num_samples == 250 and ld.info.num_classes == 250 for ld in loaders)
    union = set()
    for epoch in range(3):
        seen = []
        for ld in loaders:
            ld.set_epoch(epoch)
            batches = list(ld)
            assert len(batches) == 11 and all(b.images.shape == (8, 3, 8, 8) for b in batches)
            seen += labels_of(batches)
        assert len(seen) == 11 * 8 * 3 >= N_SAMPLES
        # Each of the 6 global workers yields >= 40 samples, more than any shard holds, so the first 6 shards of
        # the epoch's sequence are read whole: whatever an epoch misses lies in the one remaining shard.
        missed = set(range(N_SAMPLES)) - set(seen)
        assert len({shard_of[i] for i in missed}) <= 1, sorted(missed)
        assert len(set(seen)) >= N_SAMPLES - SHARD_SIZE
        union |= set(seen)
    assert union == set(range(N_SAMPLES))  # within three epochs every sample is drawn


@pytest.mark.parametrize("sampling", ["exact", "resampled"])
def test_train_stream_is_seeded_and_ignores_rank_environment(id_shards, monkeypatch, sampling):
    path, _ = id_shards
    cfg = cfg_for(path, num_workers=2, sampling=sampling)

    def epoch_of(rank, epoch, seed=3):
        loader = build_train_loader(cfg, rank=rank, world_size=3, seed=seed)
        loader.set_epoch(epoch)
        return list(loader)

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    first = epoch_of(1, 2)
    # srun-style env that webdataset's own splitters would read: it must change nothing
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    again = epoch_of(1, 2)
    assert all(torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) for a, b in zip(first, again))
    assert labels_of(epoch_of(1, 3)) != labels_of(first)  # set_epoch re-seeds
    assert labels_of(epoch_of(2, 2)) != labels_of(first)  # another rank, another stream
    assert labels_of(epoch_of(1, 2, seed=4)) != labels_of(first)


@pytest.mark.parametrize("augment", ["flip", "randaug"])
def test_augmentation_is_seeded_and_leaves_the_callers_rng_alone(id_shards, augment):
    path, _ = id_shards
    cfg = cfg_for(path, augment=augment, num_workers=0)
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    torch_before, python_before, numpy_before = torch.get_rng_state(), random.getstate(), np.random.rand()
    np.random.seed(11)

    def epoch_images(epoch):
        loader = build_train_loader(cfg, rank=0, world_size=1, seed=0)
        loader.set_epoch(epoch)
        return torch.cat([b.images for b in loader])

    a, b, c = epoch_images(0), epoch_images(0), epoch_images(1)
    assert torch.equal(torch.get_rng_state(), torch_before) and random.getstate() == python_before
    assert np.random.rand() == numpy_before
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    if augment == "flip":  # (RandAugment's colour ops would scramble the ramp)
        ramp = (a[:, 1, 0] * 0.5 + 0.5) * 255  # green ramp of the first row: flipped samples run right→left
        rising = (ramp[:, -1] > ramp[:, 0]).float().mean().item()
        assert 0.3 < rising < 0.7, rising  # about half the samples flipped


def test_randaugment_ops_survive_their_strongest_magnitude():
    """timm's PosterizeIncreasing at magnitude 10 asks Pillow for 0 bits and raises; our policy caps it."""
    from timm.data.auto_augment import RandAugment

    from peft_dist.data.transforms import build_transform

    transform = build_transform(DataConfig(img_size=8, augment="randaug"), train=True)
    (randaug,) = [t for t in transform.transforms if isinstance(t, RandAugment)]
    image = Image.fromarray(id_image(77))
    names = []
    for op in randaug.ops:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 100.0, 0.0  # clamped to the policy's upper bound
        op(image)
        names.append(op.name)
    assert "PosterizeIncreasing" in names


def test_eval_resize_squashes_the_whole_image_into_view():
    """augment none / eval: resize to img_size x img_size without cropping (VTAB-1k), so no border is lost."""
    from peft_dist.data.transforms import build_transform

    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, :10] = 255  # the left quarter is white: a centre crop of a short-side resize would cut it away
    out = build_transform(DataConfig(img_size=8, mean=(0, 0, 0), std=(1, 1, 1)), train=False)(Image.fromarray(wide))
    assert out.shape == (3, 8, 8)
    column_means = out.mean(dim=(0, 1))
    assert column_means[0] > 0.95 and column_means[1] > 0.9 and column_means[3:].max() < 0.05


def test_eval_batches_are_the_normalised_images(id_shards):
    path, _ = id_shards
    cfg = cfg_for(path, eval_split="train", mean=(0.2, 0.4, 0.6), std=(0.3, 0.5, 0.7))
    batch = next(iter(build_eval_loader(cfg, rank=0, world_size=1)))
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    expected = torch.stack([torch.from_numpy(id_image(i)).permute(2, 0, 1) for i in batch.labels.tolist()])
    torch.testing.assert_close(batch.images, (expected.float() / 255 - mean) / std, rtol=0, atol=1e-6)


@pytest.mark.parametrize("world_size, workers", [(1, 0), (3, 2), (4, 2)])  # 1, 6 and 8 global workers, 7 shards
def test_eval_visits_every_sample_exactly_once(id_shards, world_size, workers):
    path, _ = id_shards
    cfg = cfg_for(path, eval_split="train", num_workers=workers)
    seen, per_rank = [], []
    for rank in range(world_size):
        loader = build_eval_loader(cfg, rank=rank, world_size=world_size)
        batches = list(loader)
        labels = labels_of(batches)
        assert len(labels) == loader.num_samples and len(batches) == loader.num_batches
        per_rank.append(len(labels))
        seen += labels
    assert sorted(seen) == list(range(N_SAMPLES))
    assert max(per_rank) - min(per_rank) <= max(1, workers)


@pytest.fixture
def jpeg_folder(tmp_path):
    """12 JPEGs in 2 classes; ``b/img 3.jpg`` cut to half its bytes (a truncated download)."""
    for cls in ("a", "b"):
        for j in range(6):
            (tmp_path / "src" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(id_image(40 * j + (cls == "b"))).save(tmp_path / "src" / cls / f"img {j}.jpg", quality=95)
    broken = tmp_path / "src" / "b" / "img 3.jpg"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    return tmp_path


CORRUPT = r"corrupt sample '\d{6}_b_img_3' in shard \S*/train-00000\d\.tar: \.jpg is not a decodable image"


def test_truncated_jpeg_fails_naming_shard_and_key(jpeg_folder):
    write_shards(f"folder:{jpeg_folder / 'src'}", jpeg_folder / "shards", shard_size=5)
    cfg = cfg_for(jpeg_folder / "shards", eval_split="train", batch_size=4)
    with pytest.raises(CorruptSampleError, match=CORRUPT):
        list(build_eval_loader(cfg, 0, 1))
    cfg.num_workers = 1  # raised in a worker process: the type and the message survive the trip
    with pytest.raises(CorruptSampleError, match=CORRUPT):
        for epoch in range(3):
            loader = build_train_loader(cfg, 0, 1, seed=0)
            loader.set_epoch(epoch)
            list(loader)


def test_skip_corrupt_counts_the_truncated_jpeg(jpeg_folder):
    write_shards(f"folder:{jpeg_folder / 'src'}", jpeg_folder / "shards", shard_size=5)
    cfg = cfg_for(jpeg_folder / "shards", eval_split="train", batch_size=4, skip_corrupt=True, num_workers=1)
    batches = list(build_eval_loader(cfg, 0, 1))
    assert sum(len(b.skipped) for b in batches) == 1
    assert sum(len(b.labels) for b in batches) == 11

    # one shard, read in stored order, one 12-sample batch: the stream reads all 12 (11 good), then the next pass
    # from the top; it meets the broken sample once more only if that sample is stored first.
    write_shards(f"folder:{jpeg_folder / 'src'}", jpeg_folder / "one", shard_size=12)
    with tarfile.open(jpeg_folder / "one" / "train-000000.tar") as tar:
        keys = [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".cls")]
    position = next(i for i, k in enumerate(keys) if k.endswith("_b_img_3"))
    cfg = cfg_for(jpeg_folder / "one", batch_size=12, skip_corrupt=True, shuffle_buffer=0, sampling="resampled")
    (batch,) = list(build_train_loader(cfg, 0, 1, seed=0))
    assert len(batch.labels) == 12 and len(batch.skipped) == 1 + (position == 0)
    assert len(set(batch.skipped)) == 1  # the same sample met twice has one id: the trainer counts it once

    # exact sampling: one epoch, each sample once, the broken one skipped and counted once
    cfg = cfg_for(jpeg_folder / "one", batch_size=12, skip_corrupt=True)
    (batch,) = list(build_train_loader(cfg, 0, 1, seed=0))
    assert len(batch.labels) == 11 and len(batch.skipped) == 1


class TouchOnUnpickle:
    """Unpickling this creates a file: the proof that a loader unpickled something."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def png_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(id_image(i)).save(buf, format="PNG")
    return buf.getvalue()


def write_raw_shard(shards, samples: list[dict], num_classes: int):
    """One hand-made ``train-000000.tar`` (members exactly as given) plus a matching ``_info.json``."""
    import webdataset as wds

    shards.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(shards / "train-000000.tar"), encoder=False) as tar:
        for sample in samples:
            tar.write(sample)
    info = DatasetInfo(classes=[str(c) for c in range(num_classes)],
                       splits={"train": SplitInfo("train", len(samples), ["train-000000.tar"], [len(samples)])})
    (shards / "_info.json").write_text(json.dumps(info.to_json()))


def test_pickle_members_are_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(TouchOnUnpickle(marker))
    pickle.loads(payload)
    assert marker.exists()  # the payload is live
    marker.unlink()
    write_raw_shard(tmp_path / "shards", [{"__key__": f"s{i}", "png": png_bytes(i), "cls": str(i).encode(),
                                           "pyd": payload, "pickle": payload} for i in range(3)], num_classes=3)
    cfg = cfg_for(tmp_path / "shards", eval_split="train", batch_size=3)
    assert labels_of(build_eval_loader(cfg, 0, 1)) == [0, 1, 2]
    assert sorted(labels_of(build_train_loader(cfg, 0, 1, seed=0))) == [0, 1, 2]
    assert not marker.exists()


def test_eval_counts_corrupt_samples_after_the_last_good_one(tmp_path):
    good = [{"__key__": f"s{i}", "png": png_bytes(i), "cls": str(i).encode()} for i in range(5)]
    bad = [{"__key__": "no_label", "png": png_bytes(9)}, {"__key__": "bad_label", "png": png_bytes(9), "cls": b"x"},
           {"__key__": "out_of_range", "png": png_bytes(9), "cls": b"99"}]
    write_raw_shard(tmp_path / "shards", good + bad, num_classes=10)
    cfg = cfg_for(tmp_path / "shards", eval_split="train", eval_batch_size=2, skip_corrupt=True)
    batches = list(build_eval_loader(cfg, 0, 1))
    assert [len(b.labels) for b in batches] == [2, 2, 1] and [len(b.skipped) for b in batches] == [0, 0, 3]
    # two ranks over [no_label, bad_label, out_of_range, s0]: rank 0 owns the first two (both corrupt), rank 1 the rest
    write_raw_shard(tmp_path / "rev", bad + good[:1], num_classes=10)
    cfg = cfg_for(tmp_path / "rev", eval_split="train", eval_batch_size=2, skip_corrupt=True)
    rank0, rank1 = (list(build_eval_loader(cfg, r, 2)) for r in range(2))
    assert [len(b.skipped) for b in rank0] == [2] and rank0[0].images.shape == (0, 3, 8, 8)  # all corrupt: empty
    assert [len(b.skipped) for b in rank1] == [1] and rank1[0].labels.tolist() == [0]
    cfg.skip_corrupt = False
    with pytest.raises(CorruptSampleError, match=r"corrupt sample 'no_label' in shard .*: no \.cls member"):
        list(build_eval_loader(cfg, 0, 1))


def test_shards_write_and_read_under_webdataset_secure_mode(tmp_path, monkeypatch):
    """WDS_SECURE=1 makes webdataset's gopen refuse local paths; we open files ourselves, so it costs us nothing."""
    import webdataset as wds

    monkeypatch.setattr(wds.utils, "enforce_security", True)
    with pytest.raises(ValueError, match="cannot open local files"):
        wds.gopen(str(tmp_path / "probe.tar"), "wb")  # the switch is live
    for i in range(4):
        (tmp_path / "src" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(id_image(i)).save(tmp_path / "src" / f"c{i % 2}" / f"{i}.png")
    write_shards(f"folder:{tmp_path / 'src'}", tmp_path / "shards", shard_size=3)
    cfg = cfg_for(tmp_path / "shards", eval_split="train", batch_size=2)
    batches = list(build_eval_loader(cfg, 0, 1))
    assert sorted(ids_from_images(torch.cat([b.images for b in batches]))) == [0, 1, 2, 3]
    assert sum(len(b.labels) for b in build_train_loader(cfg, 0, 1, seed=0)) == 4


def test_missing_data_errors_name_the_path(id_shards, tmp_path):
    path, _ = id_shards
    with pytest.raises(MissingDataError, match=f"shard directory not found: {tmp_path / 'nowhere'}"):
        build_train_loader(cfg_for(tmp_path / "nowhere"), 0, 1, seed=0)
    with pytest.raises(MissingDataError, match=rf"{tmp_path}/_info\.json not found"):
        build_train_loader(cfg_for(tmp_path), 0, 1, seed=0)
    with pytest.raises(MissingDataError, match=r"split 'val' not found in .*_info\.json; available splits: train"):
        build_eval_loader(cfg_for(path, eval_split="val"), 0, 1)
    with pytest.raises(ValueError, match="rank 3 / world_size 3"):
        build_train_loader(cfg_for(path), 3, 3, seed=0)

    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    info = json.loads((copy / "_info.json").read_text())
    (copy / "train-000003.tar").unlink()
    with pytest.raises(MissingDataError, match=r"shard file listed in .*_info\.json not found: .*train-000003\.tar"):
        build_train_loader(cfg_for(copy), 0, 1, seed=0)
    info["splits"]["train"]["filenames"][3] = "../../etc/passwd"
    (copy / "_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"bad shard file name '\.\./\.\./etc/passwd'"):
        build_train_loader(cfg_for(copy), 0, 1, seed=0)


def test_shard_lengths_that_disagree_with_the_tar_are_reported(id_shards, tmp_path):
    path, _ = id_shards
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    info = json.loads((copy / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"][0] -= 1
    info["splits"]["train"]["num_samples"] -= 1
    (copy / "_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"train-000000\.tar holds 37 samples but _info\.json lists 36"):
        list(build_eval_loader(cfg_for(copy, eval_split="train"), 0, 1))


def test_synthetic_source_has_the_same_contract():
    cfg = DataConfig(source="synthetic", synthetic_samples=50, synthetic_classes=3, batch_size=4,
                     eval_batch_size=5, img_size=8)
    loaders = [build_train_loader(cfg, rank=r, world_size=3, seed=0) for r in range(3)]
    assert loaders[0].info.num_classes == 3 and loaders[0].info.num_samples == {"train": 50, "test": 12}
    epoch = [list(ld) for ld in loaders]
    assert [len(b) for b in epoch] == [5] * 3 and all(ld.batches_per_epoch == 5 for ld in loaders)
    images = torch.cat([b.images for batches in epoch for b in batches])
    labels = torch.cat([b.labels for batches in epoch for b in batches])
    assert images.shape == (60, 3, 8, 8) and 0 <= labels.min() and labels.max() < 3
    assert len({x.numpy().tobytes() for x in images}) == 50  # every sample once, 10 wrapped around
    assert torch.equal(torch.cat([b.images for b in loaders[0]]), torch.cat([b.images for b in epoch[0]]))
    loaders[0].set_epoch(1)
    assert not torch.equal(torch.cat([b.images for b in loaders[0]]), torch.cat([b.images for b in epoch[0]]))

    single = torch.cat([b.images for b in build_eval_loader(cfg, 0, 1)])
    split = torch.cat([b.images for r in range(3) for b in build_eval_loader(cfg, r, 3)])
    assert single.shape[0] == 12 and torch.equal(single, split)
    # the class pattern is learnable signal: samples sit closer to their own class mean than to the others
    means = torch.stack([images[labels == c].mean(0) for c in range(3)])
    nearest = torch.cdist(images.flatten(1), means.flatten(1)).argmin(1)
    assert (nearest == labels).float().mean() > 0.9


def test_loader_benchmark_quick_run_ends_with_json(capsys):
    import importlib.util

    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "loader_throughput.py"
    spec = importlib.util.spec_from_file_location("loader_throughput", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--quick"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == result
    assert set(result["images_per_s"]) == {"exact_1w", "exact_2w", "resampled_1w", "stock_webdataset_1w"}
    assert result["exact_images_per_s_per_worker"] == result["images_per_s"]["exact_1w"]
    assert result["exact_over_stock_webdataset"] == pytest.approx(
        result["images_per_s"]["exact_1w"] / result["images_per_s"]["stock_webdataset_1w"])


def test_normalisation_fields_parse_and_validate():
    from peft_dist.config import ConfigError, load_config

    cfg = load_config(None, ["data.source=synthetic", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.5, 0.5, 0.5]",
                             "data.synthetic_classes=4"])
    assert cfg.data.mean == (0.5, 0.5, 0.5) and cfg.data.std == (0.5, 0.5, 0.5)
    assert build_train_loader(cfg.data, 0, 1, seed=0).info.num_classes == 4
    with pytest.raises(ConfigError, match=r"data\.std\[1\]: got 0\.0; allowed: > 0\.0"):
        load_config(None, ["data.source=synthetic", "data.std=[0.5, 0, 0.5]"])
    with pytest.raises(ConfigError, match=r"data\.mean: got 2 values; expected 3"):
        load_config(None, ["data.source=synthetic", "data.mean=[0.5, 0.5]"])
    with pytest.raises(ConfigError, match=r"data\.synthetic_classes: got 0; allowed: >= 1"):
        load_config(None, ["data.source=synthetic", "data.synthetic_classes=0"])
