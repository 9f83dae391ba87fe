"""``peft-dist shards``: write an image data set as webdataset tar shards plus ``_info.json`` (spec ecosystem §5).

Sources (``--source``):

``folder:PATH``
    An image folder ``PATH/<class>/**/*.{jpg,jpeg,png}`` → one split, ``train``. When ``PATH/train`` is a folder
    of class folders, every sub-folder of ``PATH`` is a split instead (``PATH/train/<class>/``,
    ``PATH/test/<class>/``, ``PATH/val/<class>/`` ...). Class names are the union of the class folders over all
    splits, sorted; a label is the index of its folder name. (So a single-split data set must not name a class
    ``train`` *and* nest folders inside it.) JPEG and PNG bytes are stored as they are; BMP/GIF/WebP/TIFF/PPM/PGM
    are converted to PNG.
``list:FILE`` or ``list:SPLIT=FILE,SPLIT=FILE``
    The VTAB-1k / FGVC split-file format: one ``relative/path.jpg LABEL`` per line (``#`` comments and blank lines
    are ignored; the label is the last field, so paths may contain spaces). Paths resolve against the folder of
    the list file. A bare ``list:FILE`` is the ``train`` split; ``list:train=train800.txt,test=test.txt`` names
    several (file names in that form cannot contain ``,``). Classes are ``"0"`` .. ``str(max label)``.
``vtab:PATH/TASK`` / ``fgvc:PATH/DATASET``
    A VTAB-1k task folder (``train800.txt``, ``val200.txt``, ``train800val200.txt``, ``test.txt``) or an FGVC data
    set folder with VPT's ``train.json``/``val.json``/``test.json`` (:mod:`peft_dist.tasks`): every split of the
    task, with the task's class count, and the task recorded in ``_info.json``.
``digits``
    scikit-learn's 1,797 handwritten digits (:mod:`peft_dist.data.digits`): a stratified 80/20 ``train``/``test``
    split drawn from the seed, upscaled to ``digits_size`` pixels.

Output: ``{split}-000000.tar`` ... with ``shard_size`` samples each (the last may be shorter); a sample is
``{key}.jpg`` or ``{key}.png`` plus ``{key}.cls`` (the label in ASCII). ``_info.json`` holds the class names,
``num_classes`` and per split ``num_samples``, ``filenames`` and ``shard_lengths``; it is written last, so its
presence means the directory is complete. Rewriting a directory first removes its ``_info.json`` and the
``{split}-NNNNNN.tar`` files of the splits being written (nothing else).

Determinism: the same source and seed give byte-identical shards — listings are sorted, the sample order is a
shuffle seeded by ``(seed, split)``, and every tar member gets mtime 0 and fixed owner/mode. The shuffle matters:
the training loader reads whole shards one after another, so class-sorted shards would give class-sorted batches.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft_dist.data.info import (INFO_FILE, SPLIT_NAME, DataError, DatasetInfo, MissingDataError, SplitInfo)

STORED_AS_IS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}
CONVERTED_TO_PNG = {".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
IMAGE_SUFFIXES = set(STORED_AS_IS) | CONVERTED_TO_PNG
KEY_NAME_CHARS = 60
"""Keys are ``{index:06d}_{slug of the origin}``; USTAR caps a member name at 100 characters."""


@dataclass(frozen=True)
class PendingSample:
    """One sample before it is written: where it comes from, its label and (for files) its path."""

    origin: str
    """Human-readable and unique within the split: the relative path, or ``digits_0042``."""
    label: int
    path: Path | None = None
    data: bytes | None = None
    ext: str = "png"

    def encoded(self) -> tuple[str, bytes]:
        if self.data is not None:
            return self.ext, self.data
        assert self.path is not None
        suffix = self.path.suffix.lower()
        try:
            raw = self.path.read_bytes()
        except OSError as e:
            raise MissingDataError(f"cannot read image {self.path}: {e}") from None
        if suffix in STORED_AS_IS:
            return STORED_AS_IS[suffix], raw
        from PIL import Image

        try:
            with Image.open(io.BytesIO(raw)) as img:
                img.load()
                buf = io.BytesIO()
                img.save(buf, format="PNG")
        except Exception as e:  # PIL raises many types for undecodable files
            raise DataError(f"cannot convert {self.path} to PNG: {e}") from None
        return "png", buf.getvalue()


# ----------------------------------------------------------------------------------------------- sources
def folder_source(root: Path) -> tuple[list[str], dict[str, list[PendingSample]]]:
    """Split folders (when ``root/train`` holds class folders) or one ``train`` split of class folders."""
    if not root.is_dir():
        raise MissingDataError(f"image folder not found: {root}")
    train = root / "train"
    if train.is_dir() and any(c.is_dir() for c in train.iterdir()):
        split_dirs = {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    else:
        split_dirs = {"train": root}
    for name, d in split_dirs.items():
        if not SPLIT_NAME.match(name):
            raise DataError(f"split folder {d}: split names may use letters, digits and _ only")
    class_dirs = {name: {c.name: c for c in sorted(d.iterdir()) if c.is_dir() and not c.name.startswith(".")}
                  for name, d in split_dirs.items()}
    classes = sorted({c for per_split in class_dirs.values() for c in per_split})
    if not classes:
        raise DataError(f"no class folders in {root} (expected {root}/<class>/*.jpg or {root}/train/<class>/*.jpg)")
    label_of = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[PendingSample]] = {}
    for name, per_class in class_dirs.items():
        samples = []
        for cls, cdir in per_class.items():
            for f in sorted(cdir.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                    samples.append(PendingSample(f.relative_to(split_dirs[name]).as_posix(), label_of[cls], path=f))
        if not samples:
            raise DataError(f"no images (.jpg/.png/...) in the class folders of {split_dirs[name]}")
        splits[name] = samples
    return classes, splits


def parse_list_spec(spec: str) -> dict[str, Path]:
    """``FILE`` → ``{"train": FILE}``; ``train=F1,test=F2`` → ``{"train": F1, "test": F2}``."""
    items = spec.split(",")
    named = [re.fullmatch(r"([A-Za-z0-9_]+)=(.+)", item.strip()) for item in items]
    if all(named):
        out = {}
        for m in named:
            if m.group(1) in out:
                raise DataError(f"list source {spec!r}: split {m.group(1)!r} given twice")
            out[m.group(1)] = Path(m.group(2))
        return out
    return {"train": Path(spec)}


def read_list_file(path: Path) -> list[tuple[str, Path, int]]:
    """``(origin, resolved image path, label)`` per line of a ``path label`` list file."""
    if not path.is_file():
        raise MissingDataError(f"list file not found: {path}")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit(None, 1)
        if len(parts) != 2:
            raise DataError(f"{path}:{lineno}: expected 'relative/path.jpg LABEL', got {text!r}")
        rel, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise DataError(f"{path}:{lineno}: label {label_text!r} is not an integer") from None
        if label < 0:
            raise DataError(f"{path}:{lineno}: label {label} is negative")
        image = Path(rel) if Path(rel).is_absolute() else path.parent / rel
        if not image.is_file():
            raise MissingDataError(f"{path}:{lineno}: image not found: {image}")
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{path}:{lineno}: {image} is not a supported image "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        rows.append((rel, image, label))
    if not rows:
        raise DataError(f"list file {path} has no samples")
    return rows


def list_source(spec: str) -> tuple[list[str], dict[str, list[PendingSample]]]:
    splits = {name: [PendingSample(origin, label, path=image) for origin, image, label in read_list_file(f)]
              for name, f in parse_list_spec(spec).items()}
    top = max(s.label for samples in splits.values() for s in samples)
    return [str(i) for i in range(top + 1)], splits


def digits_source(seed: int, size: int) -> tuple[list[str], dict[str, list[PendingSample]]]:
    from peft_dist.data.digits import DIGITS_CLASSES, digits_splits

    return DIGITS_CLASSES, {name: [PendingSample(f"digits_{s.index:04d}", s.label, data=s.png, ext="png")
                                   for s in samples] for name, samples in digits_splits(seed, size).items()}


def task_source(benchmark: str, folder: str, work_dir: Path) -> tuple[list[str], dict[str, list[PendingSample]]]:
    from peft_dist.tasks import task_split_lists

    task, lists = task_split_lists(benchmark, Path(folder), work_dir)
    splits = {name: [PendingSample(origin, label, path=image) for origin, image, label in read_list_file(f)]
              for name, f in lists.items()}
    return [str(i) for i in range(task.num_classes)], splits


def source_task(source: str) -> str | None:
    """``vtab:/data/vtab-1k/cifar`` → ``vtab/cifar``; None for other sources."""
    kind, _, rest = source.partition(":")
    if kind not in ("vtab", "fgvc") or not rest:
        return None
    from peft_dist.tasks import get_task

    return get_task(f"{kind}/{Path(rest).name}").key


def resolve_source(source: str, seed: int, digits_size: int,
                   work_dir: Path | None = None) -> tuple[list[str], dict[str, list[PendingSample]]]:
    kind, sep, rest = source.partition(":")
    if kind == "digits" and not sep:
        return digits_source(seed, digits_size)
    if kind in ("vtab", "fgvc") and rest:
        return task_source(kind, rest, work_dir or Path(rest))
    if kind == "folder" and rest:
        return folder_source(Path(rest).expanduser())
    if kind == "list" and rest:
        return list_source(rest)
    raise DataError(f"--source {source!r}: expected folder:PATH, list:FILE, list:SPLIT=FILE,SPLIT=FILE, "
                    "vtab:PATH/TASK, fgvc:PATH/DATASET or digits")


# ----------------------------------------------------------------------------------------------- writing
def sample_key(index: int, origin: str) -> str:
    """A tar-safe key: webdataset cuts the key at the first ``.`` of a member name, so no dots survive."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(origin).with_suffix("").as_posix()).strip("_")
    return f"{index:06d}_{slug[-KEY_NAME_CHARS:]}" if slug else f"{index:06d}"


def write_split(out_dir: Path, split: str, samples: list[PendingSample], shard_size: int, seed: int) -> SplitInfo:
    import webdataset as wds

    canonical = sorted(samples, key=lambda s: (s.origin, s.label))
    order = list(range(len(canonical)))
    random.Random(f"peft-dist-shards:{seed}:{split}").shuffle(order)

    # Open and close the files ourselves instead of through webdataset's gopen, which honours GOPEN_REWRITE and
    # refuses local paths under WDS_SECURE; ``post`` runs after the tar stream is closed.
    open_files: dict[str, Any] = {}

    def opener(fname: str):
        open_files[fname] = open(fname, "wb")
        return open_files[fname]

    def close(fname: str) -> None:
        open_files.pop(fname).close()

    pattern = str(out_dir).replace("%", "%%") + f"/{split}-%06d.tar"  # ShardWriter %-formats the whole path
    with wds.ShardWriter(pattern, maxcount=shard_size, maxsize=float("inf"), verbose=0, opener=opener, post=close,
                         encoder=False, mtime=0.0, user="peft-dist", group="peft-dist", mode=0o444) as writer:
        for index in order:
            s = canonical[index]
            ext, data = s.encoded()
            writer.write({"__key__": sample_key(index, s.origin), ext: data, "cls": str(s.label).encode("ascii")})
    lengths = [min(shard_size, len(order) - start) for start in range(0, len(order), shard_size)]
    return SplitInfo(split, len(order), [f"{split}-{i:06d}.tar" for i in range(len(lengths))], lengths)


def write_shards(source: str, out_dir: str | Path, shard_size: int = 1000, seed: int = 0,
                 digits_size: int = 32) -> dict[str, Any]:
    """Write ``source`` (``folder:PATH``, ``list:...`` or ``digits``; see the module doc) as tar shards of
    ``shard_size`` samples into ``out_dir`` and return the ``_info.json`` content (spec ecosystem §5)."""
    if shard_size < 1:
        raise DataError(f"shard size must be >= 1; got {shard_size}")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise DataError(f"--out: {out} is a file, not a directory (shards and _info.json go into a directory)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that is a file, no permission, a read-only file system
        raise DataError(f"--out: cannot create the directory {out}: {e.strerror or e}") from None
    classes, splits = resolve_source(source, seed, digits_size, work_dir=out / "_lists")
    (out / INFO_FILE).unlink(missing_ok=True)
    for split in splits:
        for stale in out.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
            stale.unlink()
    info = DatasetInfo(classes=classes, root=out, source=source, task=source_task(source))
    for split in sorted(splits, key=lambda name: (name != "train", name)):
        for s in splits[split]:
            if not 0 <= s.label < len(classes):  # a source bug, not a user error
                raise AssertionError(f"{s.origin}: label {s.label} outside 0..{len(classes) - 1}")
        info.splits[split] = write_split(out, split, splits[split], shard_size, seed)
    tmp = out / f".{INFO_FILE}.tmp"
    tmp.write_text(json.dumps(info.to_json(), indent=2) + "\n")
    tmp.replace(out / INFO_FILE)
    return info.to_json()


# ----------------------------------------------------------------------------------------------- command line
def add_shards_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True,
                        help="folder:PATH (PATH/<class>/*.jpg, or PATH/<split>/<class>/*.jpg), "
                             "list:FILE or list:train=F1,test=F2 ('path label' lines), or digits")
    parser.add_argument("--out", required=True, help="output directory for {split}-NNNNNN.tar and _info.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sample order (and the digits split)")
    parser.add_argument("--digits-size", type=int, default=32, help="digits only: image side in pixels")


def run_shards(args: argparse.Namespace) -> int:
    from peft_dist.tasks import TaskError

    try:
        info = write_shards(args.source, args.out, shard_size=args.shard_size, seed=args.seed,
                            digits_size=args.digits_size)
    except (DataError, TaskError) as e:
        print(f"peft-dist: error: {e}", file=sys.stderr)
        return 2
    for name, split in info["splits"].items():
        print(f"{name}: {split['num_samples']} samples in {len(split['filenames'])} shard(s)")
    print(f"{info['num_classes']} classes; wrote {Path(args.out) / INFO_FILE}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peft-dist shards", description=__doc__.splitlines()[0])
    add_shards_arguments(parser)
    return run_shards(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
