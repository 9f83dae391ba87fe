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


TRANSFORM_PRESETS = ("vtab", "fgvc_snell", "fgvc_spt_arc")
"""``data.transform`` values that name an official pipeline (``custom`` builds from ``data.augment``)."""


def build_preset_transform(preset: str, train: bool, img_size: int, mean: tuple[float, ...],
                           std: tuple[float, ...]) -> Callable:
    """The official pipeline of a recipe family, built from timm / torchvision as those scripts build it.

    * ``vtab`` — SNELL/SNELLA ``--no_aug --direct_resize``, SPT, ARC and HTA: ``Resize((224, 224), bicubic)`` +
      ``CenterCrop(224)`` (a no-op after the squash, kept as the scripts have it) for train and eval (spec
      snell_snella §5.1, spt_arc_hta §1.2/§2.3).
    * ``fgvc_snell`` — SNELL/SNELLA FGVC: train is timm ``create_transform(is_training=True)`` with timm's defaults
      (random-resized crop scale 0.08-1, flip 0.5, colour jitter 0.4, no auto-augment, no random erasing) and bicubic
      resampling (the scripts' train interpolation); eval ``Resize(256)`` (bilinear, shorter side) +
      ``CenterCrop(224)`` (spec snell_snella §5.1).
    * ``fgvc_spt_arc`` — ARC's ``Data_process/tranforms.py`` (SPT's FGVC code is unreleased; SNELL reports it
      "following SPT"): train ``Resize(256)`` → ``RandomCrop(224)`` → ``RandomHorizontalFlip``; eval ``Resize(256)``
      → ``CenterCrop(224)``, torchvision's default (bilinear) resampling (spec spt_arc_hta §2.3).
    256 scales with ``img_size`` as 256/224 (DeiT's rule the scripts inherit). All end in ToTensor + Normalize."""
    from torchvision import transforms as T

    InterpolationMode = T.InterpolationMode
    tail = [T.ToTensor(), T.Normalize(mean=mean, std=std)]
    resize_size = int(256 / 224 * img_size)
    if preset == "vtab":
        return T.Compose([T.Resize((img_size, img_size), interpolation=InterpolationMode.BICUBIC),
                          T.CenterCrop(img_size), *tail])
    if preset == "fgvc_snell":
        if train:
            from timm.data import create_transform

            return create_transform(input_size=img_size, is_training=True, color_jitter=0.4, auto_augment=None,
                                    interpolation="bicubic", re_prob=0.0, mean=mean, std=std)
        return T.Compose([T.Resize(resize_size, interpolation=InterpolationMode.BILINEAR),
                          T.CenterCrop(img_size), *tail])
    if preset == "fgvc_spt_arc":
        if train:
            return T.Compose([T.Resize(resize_size), T.RandomCrop(img_size), T.RandomHorizontalFlip(), *tail])
        return T.Compose([T.Resize(resize_size), T.CenterCrop(img_size), *tail])
    raise ValueError(f"data.transform: got {preset!r}; allowed: custom, {', '.join(TRANSFORM_PRESETS)}")


def build_transform(cfg, train: bool) -> Callable:
    """PIL image → normalised ``FloatTensor[3, img_size, img_size]``: the ``data.transform`` preset
    (:func:`build_preset_transform`), or with ``custom`` via ``timm.data.create_transform`` as below.

    ``augment`` (train only; eval always uses ``none``):
      * ``none``    — resize (squash, no crop) to ``img_size``: the VTAB-1k protocol;
      * ``flip``    — random resized crop + horizontal flip, no colour jitter: the FGVC recipes;
      * ``randaug`` — random resized crop + flip + RandAugment (:data:`RANDAUGMENT`).
    Normalisation uses ``cfg.mean`` / ``cfg.std`` (ImageNet's by default; 0.5/0.5 for the IN-21k ViTs).
    """
    preset = getattr(cfg, "transform", "custom")
    if preset != "custom":
        return build_preset_transform(preset, train, cfg.img_size, tuple(cfg.mean), tuple(cfg.std))
    from timm.data import create_transform

    common = dict(input_size=cfg.img_size, mean=tuple(cfg.mean), std=tuple(cfg.std), interpolation=cfg.interpolation)
    if not train or cfg.augment == "none":
        return create_transform(is_training=False, crop_pct=1.0, crop_mode="squash", **common)
    if cfg.augment == "flip":
        return create_transform(is_training=True, hflip=0.5, color_jitter=None, **common)
    if cfg.augment == "randaug":
        return create_transform(is_training=True, hflip=0.5, auto_augment=RANDAUGMENT, **common)
    raise ValueError(f"data.augment: got {cfg.augment!r}; allowed: none, flip, randaug")
