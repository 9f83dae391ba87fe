"""Summary arithmetic against hand-computed values, the report files, and task split checks."""
import json
import statistics

import pytest
import yaml

from peft_dist.config import ConfigError
from peft_dist.report import best_of, fgvc_mean, read_run, vtab_group_means, write_report
from peft_dist.tasks import TASKS, TaskError, get_task, task_split_lists

NATURAL = ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"]
SPECIALIZED = ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"]
STRUCTURED = ["clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
              "smallnorb_ele"]


def fixed_table():
    # natural 70..76 (mean 73), specialized 80, 82, 84, 86 (mean 83), structured 40..54 step 2 (mean 47)
    t = {f"vtab/{n}": 70.0 + i for i, n in enumerate(NATURAL)}
    t.update({f"vtab/{n}": 80.0 + 2 * i for i, n in enumerate(SPECIALIZED)})
    t.update({f"vtab/{n}": 40.0 + 2 * i for i, n in enumerate(STRUCTURED)})
    return t


def test_group_means_and_both_conventions():
    g = vtab_group_means(fixed_table())
    assert g["natural"] == 73.0 and g["specialized"] == 83.0 and g["structured"] == 47.0
    assert g["mean_groups"] == pytest.approx((73 + 83 + 47) / 3)  # 67.667
    # Mean19 weights tasks, not groups: (7*73 + 4*83 + 8*47) / 19 = 1219 / 19
    assert g["mean19"] == pytest.approx(1219 / 19)
    assert g["mean19"] != pytest.approx(g["mean_groups"])


def test_missing_task_leaves_aggregates_empty():
    t = fixed_table()
    del t["vtab/kitti"]
    g = vtab_group_means(t)
    assert g["natural"] == 73.0 and g["structured"] is None and g["mean_groups"] is None and g["mean19"] is None


def test_fgvc_mean():
    t = {k: v for k, v in zip([k for k in TASKS if k.startswith("fgvc/")], [88.0, 84.0, 99.0, 91.0, 86.0])}
    assert fgvc_mean(t) == pytest.approx(89.6)
    assert fgvc_mean({"fgvc/CUB_200_2011": 1.0}) is None


def test_task_table():
    assert sum(1 for t in TASKS.values() if t.benchmark == "vtab") == 19
    assert get_task("vtab/sun397").num_classes == 397 and get_task("smallnorb_ele").group == "structured"
    assert get_task("fgvc/Stanford-cars").name == "StanfordCars"
    with pytest.raises(TaskError, match="unknown task 'vtab/imagenet'; allowed: vtab/cifar"):
        get_task("vtab/imagenet")


def write_run(root, name, method, task, top1, params, seed, paper=None):
    d = root / f"{name}-s{seed}"
    d.mkdir(parents=True)
    s = {"top1": top1, "method": method["name"], "model": "vit_base_patch16_224", "task": task,
         "trainable_params": params + 1000, "trainable_params_without_head": params,
         "peak_memory_bytes_per_rank": [2**30, 2**29], "images_per_s": 100.0, "peak_memory_kind": "rss",
         "state_memory_bytes_per_rank": [3 * 2**19, 2**19]}
    if paper is not None:
        s["top1_paper_protocol"] = paper
    (d / "summary.json").write_text(json.dumps(s))
    (d / "config.yaml").write_text(yaml.safe_dump({"method": method}))
    return d


def test_report_files_and_seed_statistics(tmp_path):
    runs = []
    for seed, acc in enumerate([0.80, 0.84, 0.82]):
        runs.append(write_run(tmp_path, "lora", {"name": "lora", "rank": 8}, "vtab/cifar", acc, 294912, seed,
                              paper=acc + 0.01))
    runs.append(write_run(tmp_path, "linear", {"name": "linear"}, "vtab/cifar", 0.60, 0, 0))
    paths = write_report([read_run(r) for r in runs], tmp_path / "out")
    md = paths["markdown"].read_text()
    std = statistics.stdev([80.0, 84.0, 82.0])
    assert f"82.0 ± {std:.1f}" in md and "lora-8" in md and "standard protocol: last epoch" in md
    assert "295,912 | 294,912 | 1.5 | 1024 |" in md  # trainable params with and without the head, state, peak
    assert "peak RSS MiB" in md and "state MiB: parameters + buffers + gradients + optimizer state" in md
    rows = paths["csv"].read_text().splitlines()
    assert rows[0].startswith("method,vtab/cifar") and len(rows) == 3
    assert paths["png"].stat().st_size > 1000
    paper = write_report([read_run(r) for r in runs], tmp_path / "paper", paper_protocol=True)
    assert "83.0 ±" in paper["markdown"].read_text() and "best test epoch" in paper["markdown"].read_text()


def test_split_files_checked(tmp_path):
    task_dir = tmp_path / "eurosat"
    task_dir.mkdir()
    for split in ("train800", "val200", "train800val200"):
        (task_dir / f"{split}.txt").write_text("images/a.jpg 3\n")
    with pytest.raises(TaskError, match=f"vtab/eurosat: split file not found: {task_dir}/test.txt"):
        task_split_lists("vtab", task_dir, tmp_path / "work")
    (task_dir / "test.txt").write_text("images/a.jpg 12\n")
    with pytest.raises(TaskError, match=r"test.txt:1: label 12 outside 0..9 of vtab/eurosat"):
        task_split_lists("vtab", task_dir, tmp_path / "work")
    (task_dir / "test.txt").write_text("images/a.jpg\n")
    with pytest.raises(TaskError, match="malformed line"):
        task_split_lists("vtab", task_dir, tmp_path / "work")
    cars = tmp_path / "StanfordCars"
    cars.mkdir()
    for split in ("train", "val"):
        (cars / f"{split}.json").write_text(json.dumps({"a.jpg": 1}))
    (cars / "test.json").write_text("{not json")
    with pytest.raises(TaskError, match="test.json: malformed json split"):
        task_split_lists("fgvc", cars, tmp_path / "work")


def test_vtab_task_folder_becomes_shards_with_task_recorded(tmp_path):
    from PIL import Image

    from peft_dist.data import read_info, write_shards

    task_dir = tmp_path / "vtab-1k" / "eurosat"
    (task_dir / "images").mkdir(parents=True)
    lines = []
    for i in range(12):
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(task_dir / "images" / f"{i}.jpg")
        lines.append(f"images/{i}.jpg {i % 10}")
    (task_dir / "train800.txt").write_text("\n".join(lines[:8]) + "\n")
    (task_dir / "val200.txt").write_text("\n".join(lines[8:]) + "\n")
    (task_dir / "train800val200.txt").write_text("\n".join(lines) + "\n")
    (task_dir / "test.txt").write_text("\n".join(lines[:3]) + "\n")
    info = write_shards(f"vtab:{task_dir}", tmp_path / "shards", shard_size=5)
    assert info["task"] == "vtab/eurosat" and info["num_classes"] == 10  # the task's count, not max label + 1
    back = read_info(tmp_path / "shards")
    assert back.task == "vtab/eurosat"
    assert back.num_samples == {"train800": 8, "val200": 4, "train800val200": 12, "test": 3}


def test_best_of_a_budget_sweep_keeps_each_tasks_best_run(tmp_path):
    """SPT's protocol: every task trained at each budget, the best reported per task (and per seed), labelled."""
    runs = []
    for budget, cifar, dtd in ((0.2, 0.70, 0.55), (0.6, 0.74, 0.52), (1.0, 0.72, 0.50)):
        method = {"name": "spt_lora", "budget": budget}
        runs.append(write_run(tmp_path / f"b{budget}", "spt", method, "vtab/cifar", cifar, int(budget * 1e6), 0))
        runs.append(write_run(tmp_path / f"b{budget}", "spt-dtd", method, "vtab/dtd", dtd, int(budget * 1e6), 0))
    chosen = best_of([read_run(r) for r in runs], "method.budget")
    assert {(r.task, r.setting("method.budget"), round(r.top1, 6)) for r in chosen} == {("vtab/cifar", 0.6, 74.0),
                                                                                      ("vtab/dtd", 0.2, 55.0)}
    assert {r.label for r in chosen} == {"spt_lora (best method.budget per task)"}
    md = write_report(chosen, tmp_path / "out")["markdown"].read_text()
    assert "spt_lora (best method.budget per task)" in md and "74.0" in md and "55.0" in md
    with pytest.raises(ConfigError, match=r"^--best-of method\.rank: run .* has no method\.rank in its config"):
        best_of([read_run(r) for r in runs], "method.rank")
