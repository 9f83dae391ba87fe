"""Sample decoding (our own, never webdataset's pickle-capable decoders) and timm image transforms.

Spec ecosystem §5 / design "Conventions": webdataset never decodes pickles. A sample here is the dict webdataset's
tar reader groups (``__key__``, ``__url__`` and raw member bytes); we read only the image member and ``.cls``, and
the tar reader is told to keep nothing else, so a ``.pyd``/``.pickle`` member is never even held, let alone loaded.
"""
from __future__ import annotations

import io
from typing import Any, Callable

from peft_dist.data.info import CorruptSampleError

IMAGE_MEMBERS = ("jpg", "jpeg", "png")
KEPT_MEMBERS = frozenset(IMAGE_MEMBERS + ("cls",))
RANDAUGMENT = "rand-m9-mstd0.5-inc1-mmax9"
"""timm's RandAugment policy for ``augment: randaug``: the DeiT / timm ImageNet recipe ``rand-m9-mstd0.5-inc1`` with
the magnitude capped at 9 instead of 10. At magnitude 10 (reached by the 0.5-std noise ~2 % of the time) timm
1.0.31's PosterizeIncreasing keeps 0 bits, which Pillow 13 rejects (``ValueError: bits must be between or equal to
1 and 8``): a long run would crash at random. At 9 it keeps 1 bit."""


def decode_sample(sample: dict[str, Any], num_classes: int):
    """``(PIL RGB image, label)`` of one grouped tar sample, or :class:`CorruptSampleError` naming shard and key."""
    from PIL import Image

    shard, key = str(sample.get("__url__", "?")), str(sample.get("__key__", "?"))
    image_member = next((m for m in IMAGE_MEMBERS if m in sample), None)
    if image_member is None:
        raise CorruptSampleError.of(shard, key, "no .jpg/.jpeg/.png member")
    if "cls" not in sample:
        raise CorruptSampleError.of(shard, key, "no .cls member (the label)")
    raw_label = sample["cls"]
    try:
        label = int(bytes(raw_label).decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        reason = f".cls {bytes(raw_label)[:32]!r} is not an integer label"
        raise CorruptSampleError.of(shard, key, reason) from None
    if not 0 <= label < num_classes:
        raise CorruptSampleError.of(shard, key, f"label {label} is outside 0..{num_classes - 1}")
    try:
        with Image.open(io.BytesIO(sample[image_member])) as img:
            img.load()  # decode now: a truncated file fails here, not later inside a transform
            rgb = img.convert("RGB")
    except Exception as e:  # PIL signals bad bytes with OSError, SyntaxError, ValueError, DecompressionBombError...
        reason = f".{image_member} is not a decodable image ({type(e).__name__}: {e})"
        raise CorruptSampleError.of(shard, key, reason) from None
    return rgb, label


def build_transform(cfg, train: bool) -> Callable:
    """PIL image → normalised ``FloatTensor[3, img_size, img_size]`` via ``timm.data.create_transform``.

    ``augment`` (train only; eval always uses ``none``):
      * ``none``    — resize (squash, no crop) to ``img_size``: the VTAB-1k protocol;
      * ``flip``    — random resized crop + horizontal flip, no colour jitter: the FGVC recipes;
      * ``randaug`` — random resized crop + flip + RandAugment (:data:`RANDAUGMENT`).
    Normalisation uses ``cfg.mean`` / ``cfg.std`` (ImageNet's by default; 0.5/0.5 for the IN-21k ViTs).
    """
    from timm.data import create_transform

    common = dict(input_size=cfg.img_size, mean=tuple(cfg.mean), std=tuple(cfg.std), interpolation=cfg.interpolation)
    if not train or cfg.augment == "none":
        return create_transform(is_training=False, crop_pct=1.0, crop_mode="squash", **common)
    if cfg.augment == "flip":
        return create_transform(is_training=True, hflip=0.5, color_jitter=None, **common)
    if cfg.augment == "randaug":
        return create_transform(is_training=True, hflip=0.5, auto_augment=RANDAUGMENT, **common)
    raise ValueError(f"data.augment: got {cfg.augment!r}; allowed: none, flip, randaug")
