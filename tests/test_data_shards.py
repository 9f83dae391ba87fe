"""Shard writer (spec ecosystem §5): digits counts/labels/split, folder and list sources, byte-level determinism
from the seed, stale-shard clean-up, the CLI entry and its error paths."""
import io
import json
import re
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from peft_dist.data.digits import digit_png, digits_splits
from peft_dist.data.info import DataError, MissingDataError, read_info
from peft_dist.data.shards import main as shards_main
from peft_dist.data.shards import write_shards


def tar_samples(path):
    """{key: {ext: bytes}} of one tar, in stored order."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def split_samples(out, split):
    info = json.loads((out / "_info.json").read_text())
    merged = {}
    for name in info["splits"][split]["filenames"]:
        merged.update(tar_samples(out / name))
    return merged


def solid_image(path, rgb, size=8, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path, format=fmt)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    info = write_shards("digits", out, shard_size=256, seed=0)
    return out, info


def test_digits_shards_counts_split_and_labels(digits_dir):
    out, info = digits_dir
    digits = load_digits()
    assert info["num_classes"] == 10 and info["classes"] == [str(d) for d in range(10)]
    assert info["splits"]["train"]["num_samples"] == 1437 and info["splits"]["test"]["num_samples"] == 360
    assert info["splits"]["train"]["shard_lengths"] == [256] * 5 + [157]
    assert info["splits"]["test"]["filenames"] == ["test-000000.tar", "test-000001.tar"]
    assert read_info(out).num_samples == {"train": 1437, "test": 360}  # the file reads back through the loader's path

    rows = {}
    for split in ("train", "test"):
        samples = split_samples(out, split)
        assert len(samples) == info["splits"][split]["num_samples"]
        for key, members in samples.items():
            assert set(members) == {"png", "cls"}
            row = int(re.fullmatch(r"\d{6}_digits_(\d{4})", key).group(1))
            assert int(members["cls"]) == digits.target[row], key  # the label of that very scikit-learn row
            rows[row] = split
    assert sorted(rows) == list(range(1797))  # train and test are disjoint and cover the data set
    per_class_test = Counter(digits.target[r] for r, s in rows.items() if s == "test")
    per_class_all = Counter(digits.target)
    for c in range(10):  # stratified: each class keeps its 20 % share (rounding aside)
        assert abs(per_class_test[c] - 0.2 * per_class_all[c]) <= 1, (c, per_class_test[c], per_class_all[c])


def test_digit_images_are_clean_rgb():
    digits = load_digits()
    exact = np.asarray(Image.open(io.BytesIO(digit_png(digits.images[5], 8))))
    assert exact.shape == (8, 8, 3)
    assert (exact[..., 0] == exact[..., 1]).all() and (exact[..., 1] == exact[..., 2]).all()  # grey as RGB
    np.testing.assert_array_equal(exact[..., 0], np.rint(digits.images[5] * 255 / 16).astype(np.uint8))
    big = np.asarray(Image.open(io.BytesIO(digit_png(digits.images[5], 32))).convert("L"), dtype=np.float64)
    assert big.shape == (32, 32)
    # 4x4 block means of the upscaled glyph track the 8x8 original (bilinear: no new structure, no ringing)
    blocks = big.reshape(8, 4, 8, 4).mean(axis=(1, 3))
    assert np.corrcoef(blocks.ravel(), exact[..., 0].ravel())[0, 1] > 0.95


def test_digits_split_follows_the_seed():
    a, b, c = digits_splits(seed=0, size=8), digits_splits(seed=0, size=8), digits_splits(seed=1, size=8)
    assert [s.index for s in a["test"]] == [s.index for s in b["test"]]
    assert {s.index for s in a["test"]} != {s.index for s in c["test"]}


def make_folder(root, per_class=5, classes=("cat", "dog", "owl"), splits=None):
    """Solid-colour images whose red channel encodes the class index, so labels can be checked from pixels."""
    for split in splits or [None]:
        for ci, cls in enumerate(classes):
            for j in range(per_class):
                base = root / split if split else root
                fmt = "JPEG" if j % 2 else "PNG"
                solid_image(base / cls / f"img {j}.{'jpg' if j % 2 else 'png'}", (60 * ci + 30, 10 * j, 0), fmt=fmt)


def test_folder_with_split_folders(tmp_path):
    make_folder(tmp_path / "src", splits=["train", "test"])
    (tmp_path / "src" / "test" / "owl" / "notes.txt").write_text("not an image")
    info = write_shards(f"folder:{tmp_path / 'src'}", tmp_path / "out", shard_size=4)
    assert info["classes"] == ["cat", "dog", "owl"]
    assert list(info["splits"]) == ["train", "test"]
    assert info["splits"]["train"]["shard_lengths"] == [4, 4, 4, 3]
    for split in ("train", "test"):
        samples = split_samples(tmp_path / "out", split)
        assert len(samples) == 15
        for key, members in samples.items():
            ext = "jpg" if "jpg" in members else "png"
            label = int(members["cls"])
            red = np.asarray(Image.open(io.BytesIO(members[ext])))[0, 0, 0]
            assert abs(int(red) - (60 * label + 30)) <= 3, (key, label, red)  # JPEG may shift a colour a little
            assert "." not in key  # webdataset would cut the key at a dot
        assert Counter(m.keys().__contains__("jpg") for m in samples.values()) == {True: 6, False: 9}


def test_folder_without_split_folders_is_one_train_split(tmp_path):
    make_folder(tmp_path / "src", per_class=2, classes=("a", "b"))
    solid_image(tmp_path / "src" / "b" / "deep" / "x.bmp", (90, 0, 0), fmt="BMP")  # nested + converted to PNG
    info = write_shards(f"folder:{tmp_path / 'src'}", tmp_path / "out")
    assert list(info["splits"]) == ["train"] and info["splits"]["train"]["num_samples"] == 5
    members = [m for m in split_samples(tmp_path / "out", "train").values() if "png" in m]
    assert any(np.asarray(Image.open(io.BytesIO(m["png"])))[0, 0, 0] == 90 for m in members)


def test_list_files_for_several_splits(tmp_path):
    for i in range(6):
        solid_image(tmp_path / "images" / f"im{i}.png", (i * 40, 0, 0), fmt="PNG")
    (tmp_path / "train.txt").write_text("# VTAB-1k style\nimages/im0.png 0\nimages/im1.png 4\n\nimages/im2.png 2\n"
                                        "images/im3.png 4\n")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "test.txt").write_text("../images/im4.png 1\n../images/im5.png 3\n")
    info = write_shards(f"list:train={tmp_path / 'train.txt'},test={tmp_path / 'lists' / 'test.txt'}",
                        tmp_path / "out", shard_size=3)
    assert info["classes"] == ["0", "1", "2", "3", "4"] and info["num_classes"] == 5
    assert {s: v["num_samples"] for s, v in info["splits"].items()} == {"train": 4, "test": 2}
    expected = {0: 0, 1: 4, 2: 2, 3: 4, 4: 1, 5: 3}
    for split in ("train", "test"):
        for members in split_samples(tmp_path / "out", split).values():
            image_id = np.asarray(Image.open(io.BytesIO(members["png"])))[0, 0, 0] // 40
            assert int(members["cls"]) == expected[image_id]
    single = write_shards(f"list:{tmp_path / 'train.txt'}", tmp_path / "single")
    assert list(single["splits"]) == ["train"]


def test_same_seed_same_bytes_other_seed_other_order(tmp_path):
    make_folder(tmp_path / "src", per_class=4)
    outs = {name: tmp_path / name for name in ("a", "b", "c")}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        write_shards(f"folder:{tmp_path / 'src'}", outs[name], shard_size=5, seed=seed)
    files = sorted(p.name for p in outs["a"].iterdir())
    assert files == sorted(p.name for p in outs["b"].iterdir()) and len(files) == 4  # 3 shards + _info.json
    for name in files:
        assert (outs["a"] / name).read_bytes() == (outs["b"] / name).read_bytes(), name
    assert (outs["a"] / "train-000000.tar").read_bytes() != (outs["c"] / "train-000000.tar").read_bytes()
    a_all, c_all = split_samples(outs["a"], "train"), split_samples(outs["c"], "train")
    assert a_all == c_all  # the same samples under the same keys, only their order differs
    with tarfile.open(outs["a"] / "train-000000.tar") as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}


def test_rewriting_removes_stale_shards(tmp_path):
    make_folder(tmp_path / "src", per_class=3)
    write_shards(f"folder:{tmp_path / 'src'}", tmp_path / "out", shard_size=2)
    assert (tmp_path / "out" / "train-000004.tar").is_file()
    (tmp_path / "out" / "keep.txt").write_text("user file")
    info = write_shards(f"folder:{tmp_path / 'src'}", tmp_path / "out", shard_size=100)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_info.json", "keep.txt", "train-000000.tar"]
    assert info["splits"]["train"]["filenames"] == ["train-000000.tar"]


@pytest.mark.parametrize("source, error, pattern", [
    ("folder:{tmp}/missing", MissingDataError, r"image folder not found: .*missing"),
    ("list:{tmp}/nope.txt", MissingDataError, r"list file not found: .*nope\.txt"),
    ("list:{tmp}/bad.txt", DataError, r"bad\.txt:2: label 'x' is not an integer"),
    ("list:{tmp}/gone.txt", MissingDataError, r"gone\.txt:1: image not found: .*absent\.png"),
    ("imagenet", DataError, r"--source 'imagenet': expected folder:PATH, list:FILE"),
    ("folder:{tmp}/empty", DataError, r"no class folders in .*empty"),
])
def test_bad_sources_name_the_file(tmp_path, source, error, pattern):
    solid_image(tmp_path / "ok.png", (1, 2, 3), fmt="PNG")
    (tmp_path / "bad.txt").write_text("ok.png 0\nok.png x\n")
    (tmp_path / "gone.txt").write_text("absent.png 0\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(error, match=pattern):
        write_shards(source.format(tmp=tmp_path), tmp_path / "out")


def test_cli_entry(tmp_path, capsys):
    from peft_dist.cli import main as cli_main

    make_folder(tmp_path / "src", per_class=2, classes=("a", "b"))
    assert cli_main(["shards", "--source", f"folder:{tmp_path / 'src'}", "--out", str(tmp_path / "out"),
                     "--shard-size", "3", "--seed", "1"]) == 0
    assert "train: 4 samples in 2 shard(s)" in capsys.readouterr().out
    assert read_info(tmp_path / "out").num_samples == {"train": 4}
    assert shards_main(["--source", "list:train=", "--out", str(tmp_path / "x")]) == 2
    assert "peft-dist: error: list file not found" in capsys.readouterr().err
