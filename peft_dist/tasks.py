"""Benchmark task definitions: the 19 VTAB-1k tasks and the 5 FGVC data sets (spec spt_arc_hta.md §4,
snell_snella.md §5.1).

VTAB-1k comes as the NOAH/SPT release lays it out: one folder per task holding ``train800.txt``, ``val200.txt``,
``train800val200.txt`` and ``test.txt`` (``relative/path.jpg LABEL`` lines, paths relative to the task folder).
FGVC comes with VPT's json splits: ``train.json``, ``val.json``, ``test.json`` mapping an image path (relative to
the data set folder, or its ``images/`` sub-folder) to a label. ``peft-dist shards --source vtab:PATH/TASK`` and
``--source fgvc:PATH/DATASET`` turn a local copy into shards; the task is recorded in ``_info.json`` so summaries
and ``peft-dist report`` know which table cell a run fills.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class TaskError(ValueError):
    """A task name is unknown, or a split file is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Task:
    benchmark: str  # "vtab" or "fgvc"
    name: str
    group: str  # natural / specialized / structured for VTAB; fgvc
    num_classes: int
    splits: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.benchmark}/{self.name}"


VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
FGVC_SPLITS = ("train", "val", "test")

_VTAB = {
    "natural": [("cifar", 100), ("caltech101", 102), ("dtd", 47), ("oxford_flowers102", 102),
                ("oxford_iiit_pet", 37), ("svhn", 10), ("sun397", 397)],
    "specialized": [("patch_camelyon", 2), ("eurosat", 10), ("resisc45", 45), ("diabetic_retinopathy", 5)],
    "structured": [("clevr_count", 8), ("clevr_dist", 6), ("dmlab", 6), ("kitti", 4), ("dsprites_loc", 16),
                   ("dsprites_ori", 16), ("smallnorb_azi", 18), ("smallnorb_ele", 9)],
}
_FGVC = [("CUB_200_2011", 200), ("nabirds", 555), ("OxfordFlower", 102), ("StanfordDogs", 120),
         ("StanfordCars", 196)]

TASKS: dict[str, Task] = {}
for _group, _tasks in _VTAB.items():
    for _name, _n in _tasks:
        TASKS[f"vtab/{_name}"] = Task("vtab", _name, _group, _n, VTAB_SPLITS)
for _name, _n in _FGVC:
    TASKS[f"fgvc/{_name}"] = Task("fgvc", _name, "fgvc", _n, FGVC_SPLITS)

VTAB_GROUPS = tuple(_VTAB)
assert sum(len(v) for v in _VTAB.values()) == 19


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


_ALIASES = {"cub": "CUB_200_2011", "cub2002011": "CUB_200_2011", "oxfordflowers": "OxfordFlower",
            "stanforddogs": "StanfordDogs", "stanfordcars": "StanfordCars", "cifar100": "cifar"}


def get_task(key: str) -> Task:
    """``vtab/cifar``, ``fgvc/StanfordCars``; a bare name works when it is unambiguous. Folder-name spellings of
    the releases (``Stanford-cars``, ``CUB_200_2011``, ``OxfordFlowers``...) are accepted."""
    if key in TASKS:
        return TASKS[key]
    benchmark, _, name = key.rpartition("/")
    wanted = _norm(_ALIASES.get(_norm(name), name))
    matches = [t for t in TASKS.values() if _norm(t.name) == wanted and benchmark in ("", t.benchmark)]
    if len(matches) == 1:
        return matches[0]
    raise TaskError(f"unknown task {key!r}; allowed: {', '.join(TASKS)}")


def task_split_lists(benchmark: str, folder: Path, work_dir: Path) -> tuple[Task, dict[str, Path]]:
    """Check a task folder and return its split list files (``path label`` lines with absolute paths).

    VTAB's ``.txt`` files are used as they are; FGVC's json splits are converted into ``work_dir``."""
    folder = Path(folder).expanduser()
    task = get_task(f"{benchmark}/{folder.name}")
    if not folder.is_dir():
        raise TaskError(f"{task.key}: data folder not found: {folder}")
    lists: dict[str, Path] = {}
    for split in task.splits:
        if benchmark == "vtab":
            path = folder / f"{split}.txt"
            if not path.is_file():
                raise TaskError(f"{task.key}: split file not found: {path}")
            _check_list_labels(path, task)
            lists[split] = path
        else:
            path = folder / f"{split}.json"
            if not path.is_file():
                raise TaskError(f"{task.key}: split file not found: {path}")
            lists[split] = _fgvc_json_to_list(path, folder, task, work_dir)
    return task, lists


def _check_list_labels(path: Path, task: Task) -> None:
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise TaskError(f"{path}:{lineno}: malformed line {text!r} (expected 'relative/path.jpg LABEL')")
        if not 0 <= int(parts[1]) < task.num_classes:
            raise TaskError(f"{path}:{lineno}: label {parts[1]} outside 0..{task.num_classes - 1} of {task.key}")


def _fgvc_json_to_list(path: Path, folder: Path, task: Task, work_dir: Path) -> Path:
    try:
        mapping = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TaskError(f"{path}: malformed json split: {e}") from None
    if not isinstance(mapping, dict) or not mapping:
        raise TaskError(f"{path}: expected a non-empty json object mapping image paths to labels")
    base = folder / "images" if (folder / "images").is_dir() else folder
    work_dir.mkdir(parents=True, exist_ok=True)
    out = work_dir / f"{task.name}-{path.stem}.txt"
    lines = []
    for rel, label in sorted(mapping.items()):
        if not isinstance(label, int) or not 0 <= label < task.num_classes:
            raise TaskError(f"{path}: {rel!r} has label {label!r}; expected an integer in 0..{task.num_classes - 1}")
        lines.append(f"{(base / rel).resolve()} {label}")
    out.write_text("\n".join(lines) + "\n")
    return out
