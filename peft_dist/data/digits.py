"""The built-in real data set: scikit-learn's handwritten digits (``load_digits``).

1,797 real 8x8 grey images of the digits 0-9 (UCI optical recognition data set, bundled with scikit-learn, so no
download). It is the demo's data: small enough to train a 2-block ViT with LoRA on a laptop CPU in minutes, real
enough that top-1 means something. Images are scaled 0..16 → 0..255, upscaled bilinearly (a clean, smooth glyph;
nearest would hand the ViT blocky 8x8 artefacts) to ``size`` and stored as RGB PNG (lossless: no JPEG ringing).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

DIGITS_CLASSES = [str(d) for d in range(10)]
DIGITS_SAMPLES = 1797
DIGITS_TEST_FRACTION = 0.2
"""The held-out share of the fixed stratified split: 1,437 train / 360 test samples."""


@dataclass(frozen=True)
class DigitsSample:
    index: int
    """Row of ``load_digits()``: stable across seeds, so it names the sample in keys and error messages."""
    label: int
    png: bytes


def digit_png(image_0_to_16, size: int) -> bytes:
    """One 8x8 digit (values 0..16) as an RGB PNG of ``size`` x ``size`` pixels."""
    import numpy as np
    from PIL import Image

    grey = np.clip(np.rint(np.asarray(image_0_to_16, dtype=np.float64) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    img = Image.fromarray(grey, mode="L")
    if size != grey.shape[0]:
        img = img.resize((size, size), resample=Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def digits_splits(seed: int = 0, size: int = 32) -> dict[str, list[DigitsSample]]:
    """``{"train": [...], "test": [...]}``: a stratified 80/20 split drawn from ``seed`` (same seed, same split),
    each list in the split's shuffled order."""
    if size < 8:
        raise ValueError(f"digits size must be >= 8 (the images are 8x8); got {size}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = list(range(len(digits.target)))
    train_idx, test_idx = train_test_split(indices, test_size=DIGITS_TEST_FRACTION, stratify=digits.target,
                                           random_state=seed, shuffle=True)
    return {split: [DigitsSample(i, int(digits.target[i]), digit_png(digits.images[i], size)) for i in idx]
            for split, idx in (("train", train_idx), ("test", test_idx))}


PRETRAIN_DIGITS = range(0, 5)
TRANSFER_DIGITS = range(5, 10)
"""The transfer setting of the demo and ``benchmarks/transfer_digits.py``: pre-train on 0-4, adapt to 5-9."""


def digits_subset_splits(classes: range, seed: int = 0, size: int = 32) -> dict[str, list[DigitsSample]]:
    """The samples of ``classes`` only, labels counted from 0 (digits 5-9 become 0-4). Taken from the stratified
    split of all ten digits, so each half is itself stratified and the two halves never share an image."""
    return {split: [DigitsSample(s.index, s.label - classes.start, s.png) for s in samples if s.label in classes]
            for split, samples in digits_splits(seed, size).items()}


def write_digits_subset_shards(out_dir, classes: range, seed: int = 0, size: int = 32) -> dict:
    """``classes`` of the digits as webdataset shards in ``out_dir`` (one shard per split), through the ``list:``
    source of ``peft-dist shards``: the PNGs and their list files stay beside the shards in ``_images``."""
    from pathlib import Path

    from peft_dist.data.shards import write_shards

    out = Path(out_dir)
    images = out / "_images"
    lists = []
    for split, samples in digits_subset_splits(classes, seed, size).items():
        (images / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for s in samples:
            name = f"{split}/digits_{s.index:04d}.png"
            (images / name).write_bytes(s.png)
            lines.append(f"{name} {s.label}")
        (images / f"{split}.txt").write_text("\n".join(lines) + "\n")
        lists.append(f"{split}={images / f'{split}.txt'}")
    return write_shards("list:" + ",".join(lists), out, shard_size=DIGITS_SAMPLES, seed=seed)  # one shard a split
