"""The papers' training protocol (issue 16): timm's per-epoch schedule, the official transforms, a global batch that
means the same run on any world size, the official evaluation epochs, and SPT allocations checked against their
task. References are built independently here, from timm and torchvision themselves."""
from __future__ import annotations

import json

import pytest
import torch

from launcher.env import DistEnv
from peft_dist.config import ConfigError, load_config
from peft_dist.train.trainer import Trainer
from test_baselines import fixed_batches, tiny_cfg

PAPER_SCHEDULE = ["optim.schedule=timm_epoch", "optim.warmup_epochs=10", "optim.warmup_start_lr=1e-6",
                  "optim.min_lr=1e-5", "optim.lr=1e-3"]
"""SNELL/SNELLA/SPT's settings (spec snell_snella §5.1, spt_arc_hta §1.6)."""


def official_epoch_lrs(epochs: int, lr: float = 1e-3, warmup_epochs: int = 10, warmup_lr: float = 1e-6,
                       min_lr: float = 1e-5) -> list[float]:
    """The lr each epoch trains at in the official scripts: timm's scheduler from ``create_scheduler``, and
    ``lr_scheduler.step(epoch)`` after training epoch ``epoch``."""
    from timm.scheduler import create_scheduler_v2

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=epochs, warmup_epochs=warmup_epochs,
                                       warmup_lr=warmup_lr, min_lr=min_lr)
    used = []
    for epoch in range(epochs):
        used.append(optimizer.param_groups[0]["lr"])  # train_one_epoch(...)
        scheduler.step(epoch)
    return used


def lrs_by_epoch(run_dir) -> dict[int, set[float]]:
    """The lr every logged step of a run trained at, grouped by its epoch (``metrics.jsonl``)."""
    by_epoch: dict[int, set[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_epoch.setdefault(record["epoch"], set()).add(record["lr"])
    return by_epoch


@pytest.mark.parametrize("epochs", [100, 12])
def test_timm_epoch_run_trains_each_epoch_at_timms_official_lr(tmp_path, epochs):
    batches = fixed_batches(n=2, bs=4)  # 2 optimizer steps per epoch: the lr must hold within an epoch
    cfg = tiny_cfg(tmp_path, "linear", *PAPER_SCHEDULE, f"train.epochs={epochs}", "train.log_every=1")
    Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches[:1]).fit()
    got = lrs_by_epoch(tmp_path / "linear")
    want = official_epoch_lrs(epochs)
    assert sorted(got) == list(range(epochs))
    for epoch in range(epochs):
        assert got[epoch] == {want[epoch]}, f"epoch {epoch}"  # one lr per epoch, bit-equal to timm's
    assert want[0] == want[1] == 1e-6  # the one-epoch lag the scripts have


def test_timm_epoch_state_is_plain_and_a_restored_schedule_continues_at_the_same_lr():
    from peft_dist.engines.engine import build_scheduler

    cfg = load_config(None, PAPER_SCHEDULE)

    def fresh():
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.optim.lr)
        return optimizer, build_scheduler(optimizer, cfg.optim, total_steps=3 * 40, warmup_steps=3 * 10)

    optimizer, scheduler = fresh()
    for _ in range(3 * 17 + 1):  # mid-epoch 17
        scheduler.step()
    saved = json.loads(json.dumps(scheduler.state_dict()))  # what the checkpoint's JSON manifest holds
    optimizer2, scheduler2 = fresh()
    optimizer2.param_groups[0]["lr"] = 123.0  # whatever the restored optimizer groups say
    scheduler2.load_state_dict(saved)
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(official_epoch_lrs(40)[17], rel=1e-12)
    for _ in range(3 * 40 - (3 * 17 + 1)):
        assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
        scheduler.step()
        scheduler2.step()


@pytest.mark.parametrize("warmup_epochs", [2.5, 0.0])
def test_timm_epoch_with_a_fractional_or_no_warmup_is_timms_scheduler_stepped_by_hand(tmp_path, warmup_epochs):
    """The trainer tells the engine the epoch length, so timm's ``warmup_t`` need not be a whole number of epochs
    (3 optimizer steps an epoch: a fractional warm-up no longer has to divide into steps)."""
    from timm.scheduler import CosineLRScheduler

    epochs, batches = 8, fixed_batches(n=3, bs=4)
    cfg = tiny_cfg(tmp_path, "linear", "optim.schedule=timm_epoch", f"optim.warmup_epochs={warmup_epochs}",
                   "optim.warmup_start_lr=1e-6", "optim.min_lr=1e-5", "optim.lr=1e-3", f"train.epochs={epochs}",
                   "train.log_every=1", "memory.enabled=false")
    Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches[:1]).fit()
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    timm = CosineLRScheduler(optimizer, t_initial=epochs, lr_min=1e-5, warmup_t=warmup_epochs, warmup_lr_init=1e-6)
    want = []
    for epoch in range(epochs):
        want.append(optimizer.param_groups[0]["lr"])
        timm.step(epoch)
    got = lrs_by_epoch(tmp_path / "linear")
    assert [got[e] for e in range(epochs)] == [{lr} for lr in want]
    assert (want[0] == 1e-6) == (warmup_epochs > 0)  # no warm-up: timm leaves epoch 0 at the base lr


def test_timm_epoch_refuses_a_warmup_in_steps_in_one_line():
    with pytest.raises(ConfigError, match=r"^optim\.warmup_steps: got 30; allowed with optim\.schedule=timm_epoch: 0"
                       ) as err:
        load_config(None, ["optim.schedule=timm_epoch", "optim.warmup_steps=30"])
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------- transforms
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def photo(width: int = 317, height: int = 263):
    """A non-square RGB image with structure at every scale (a resize or crop that differs shows)."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(7)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) % 97 * 2.6], axis=-1)
    return Image.fromarray(np.clip(base + g.normal(0, 20, base.shape), 0, 255).astype("uint8"), "RGB")


def official_pipeline(preset: str, train: bool):
    """Each family's pipeline, written out from timm's and torchvision's classes as the official code composes
    them (spec snell_snella §5.1, spt_arc_hta §1.2/§2.3)."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms as T

    tail = [T.ToTensor(), T.Normalize(**IMAGENET)]
    if preset == "vtab":  # --direct_resize: Resize((224, 224), interpolation=3) + CenterCrop(224)
        return T.Compose([T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), *tail])
    if preset == "fgvc_snell" and train:  # timm create_transform(is_training=True): its transforms_imagenet_train
        return T.Compose([RandomResizedCropAndInterpolation(224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                                            interpolation="bicubic"),
                          T.RandomHorizontalFlip(0.5), T.ColorJitter(0.4, 0.4, 0.4), *tail])
    if preset == "fgvc_snell":
        return T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(224), *tail])
    if train:  # fgvc_spt_arc
        return T.Compose([T.Resize(256), T.RandomCrop(224), T.RandomHorizontalFlip(), *tail])
    return T.Compose([T.Resize(256), T.CenterCrop(224), *tail])


def seeded(transform, image, seed: int):
    """Apply ``transform`` with torch's and Python's RNGs (timm's crop draws from ``random``) fixed to ``seed``."""
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    return transform(image)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("preset", ["vtab", "fgvc_snell", "fgvc_spt_arc"])
def test_transform_preset_gives_the_official_pipelines_tensor(preset, train):
    from peft_dist.data.transforms import build_transform

    cfg = load_config(None, [f"data.transform={preset}", "data.augment=randaug"])  # a preset ignores augment
    ours, reference, image = build_transform(cfg.data, train=train), official_pipeline(preset, train), photo()
    outputs = set()
    for seed in range(6):
        got = seeded(ours, image, seed)
        assert got.shape == (3, 224, 224) and got.dtype == torch.float32
        assert torch.equal(got, seeded(reference, image, seed)), f"{preset} seed {seed}"
        outputs.add(got.numpy().tobytes())
    random_pipeline = train and preset != "vtab"
    assert len(outputs) == (6 if random_pipeline else 1)  # the random ones really draw; eval and VTAB do not


def test_custom_transform_is_unchanged_by_the_presets():
    """``data.transform: custom`` (the default) still squashes bicubic with ``augment: none``: the same tensor as
    the ``vtab`` preset, whose CenterCrop after the squash is a no-op."""
    from peft_dist.data.transforms import build_transform

    image = photo()
    custom = build_transform(load_config(None, []).data, train=False)(image)
    vtab = build_transform(load_config(None, ["data.transform=vtab"]).data, train=False)(image)
    torch.testing.assert_close(custom, vtab, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------- global batch
RECIPE = "configs/recipes/snell/snell32/vtab/cifar.yaml"
"""A paper recipe (global batch 16, timm_epoch schedule), shrunk to a tiny ViT on synthetic data below."""


def recipe_argv(out_dir, engine: str) -> list[str]:
    from conftest import REPO, TINY_VIT

    kw = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()) + "}"
    return ["train", "--config", str(REPO / RECIPE), "model.name=vit_tiny_patch16_224", f"model.kwargs={kw}",
            "model.num_classes=5", "data.source=synthetic", "data.synthetic_classes=5", "data.synthetic_samples=64",
            "data.batch_size=4", "data.img_size=32", "data.num_workers=0", "method.rank=4", "train.epochs=3", "train.log_every=1",
            "train.progress=false", "tracking.enabled=false", f"train.out_dir={out_dir}", f"dist.engine={engine}"]


def cli_train_as_rank(rank: int, world: int, port: int, argv: list[str]) -> None:
    """One rank of ``torchrun peft-dist train ...``: the launcher's variables, then the CLI itself."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from peft_dist.cli import main

    assert main(argv) == 0


def run_record(out_dir) -> dict:
    import yaml

    cfg = yaml.safe_load((out_dir / "config.yaml").read_text())
    summary = json.loads((out_dir / "summary.json").read_text())
    lrs = [json.loads(line)["lr"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {"world": summary["world_size"], "steps": summary["steps"], "lrs": lrs,
            "per_rank": cfg["data"]["batch_size"], "accum": cfg["train"]["grad_accum"],
            "global": cfg["data"]["batch_size"] * summary["world_size"] * cfg["train"]["grad_accum"]}


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_recipe_on_one_and_two_ranks_trains_the_same_global_batch_and_lr(tmp_path, monkeypatch):
    from conftest import spawn_two_ranks
    from peft_dist.cli import main

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert main(recipe_argv(tmp_path / "one", "single")) == 0
    spawn_two_ranks(cli_train_as_rank, recipe_argv(tmp_path / "two", "ddp"))
    one, two = run_record(tmp_path / "one"), run_record(tmp_path / "two")
    assert (one["world"], two["world"]) == (1, 2)
    assert one["global"] == two["global"] == 16  # the recipe's data.global_batch_size
    assert (one["per_rank"], one["accum"]) == (4, 4) and (two["per_rank"], two["accum"]) == (4, 2)
    assert one["steps"] == two["steps"] == 3 * 64 // 16
    assert one["lrs"] == two["lrs"] and len(one["lrs"]) == 12
    assert one["lrs"][::4] == official_epoch_lrs(3)  # 4 steps an epoch, each epoch at timm's official lr


def test_global_batch_that_does_not_divide_is_one_line_naming_the_keys():
    from peft_dist.config import resolve_global_batch

    cfg = load_config(None, ["data.global_batch_size=64", "data.batch_size=16"])
    assert (resolve_global_batch(cfg, 8).data.batch_size, cfg.train.grad_accum) == (8, 1)
    assert (resolve_global_batch(cfg, 8).data.batch_size, cfg.train.grad_accum) == (8, 1)  # idempotent
    cfg = load_config(None, ["data.global_batch_size=64", "data.batch_size=5"])
    assert (resolve_global_batch(cfg, 2).data.batch_size, cfg.train.grad_accum) == (4, 8)  # 32 = 8 x 4 <= 5
    with pytest.raises(ConfigError, match=r"^data\.global_batch_size: 64 images do not divide over 3 ranks") as e:
        resolve_global_batch(load_config(None, ["data.global_batch_size=64"]), 3)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------- SPT allocations
def spt_sensitivity(out_pattern: str) -> None:
    """``peft-dist sensitivity`` on the tiny ViT (seed 0, 5 classes), one file per budget."""
    import argparse

    from conftest import TINY_VIT
    from peft_dist.methods.spt_sensitivity import add_sensitivity_arguments, run_sensitivity

    kw = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()) + "}"
    cfg = load_config(None, ["model.name=vit_tiny_patch16_224", "model.num_classes=5", f"model.kwargs={kw}",
                             "data.source=synthetic", "data.batch_size=6", "train.seed=0"])
    parser = argparse.ArgumentParser()
    add_sensitivity_arguments(parser)
    args = parser.parse_args(["--out", out_pattern, "--structured-type", "lora", "--num-batches", "2", "--rank", "2",
                              "--tau-step", "500", "--tau-count", "60", "--budgets", "0.002", "0.005"])
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(2)]
    assert run_sensitivity(cfg, args, batches=data) == 0


def test_spt_allocation_files_per_budget_and_a_mismatched_file_is_refused_in_one_line(tmp_path):
    import shutil

    import peft_dist
    from conftest import tiny_vit
    from peft_dist.methods.spt_sensitivity import AllocationError, read_allocation, write_allocation

    spt_sensitivity(str(tmp_path / "plain" / "spt_lora_{budget}.json"))
    per_budget = {b: read_allocation(tmp_path / "plain" / f"spt_lora_{b}.json") for b in ("0.002", "0.005")}
    assert [[e["budget_m"] for e in doc["budgets"]] for doc in per_budget.values()] == [[0.002], [0.005]]
    doc = per_budget["0.002"]
    assert doc["metadata"]["num_classes"] == 5 and len(doc["metadata"]["backbone_sha256"]) == 64

    # the sensitivity pass's data recorded no task: give the file one, as a VTAB task's shards would
    doc["metadata"]["task"] = "vtab/dtd"
    write_allocation(tmp_path / "vtab" / "dtd" / "spt_lora_0.002.json", doc)
    pattern = str(tmp_path / "{task}" / "spt_lora_{budget}.json")
    options = dict(allocation=pattern, budget=0.002, task="vtab/dtd")
    peft_dist.apply_method(tiny_vit(num_classes=5, seed=0), "spt_lora", **options)  # the matching run

    def refusal(model, **changes) -> str:
        with pytest.raises(AllocationError) as err:
            peft_dist.apply_method(model, "spt_lora", **{**options, **changes})
        message = str(err.value)
        assert "\n" not in message and message.startswith("method.allocation: ")
        return message

    def seven_classes():  # the same backbone weights, another head
        model = tiny_vit(num_classes=5, seed=0)
        model.reset_classifier(7)
        return model

    message = refusal(seven_classes())
    assert "num_classes 5 in the file, 7 in this run" in message
    assert "task '" not in message and "backbone weights" not in message
    message = refusal(tiny_vit(num_classes=5, seed=1))  # another backbone (here: other random weights)
    assert "backbone weights differ" in message and "num_classes" not in message
    shutil.copytree(tmp_path / "vtab" / "dtd", tmp_path / "vtab" / "cifar")  # dtd's file where cifar's belongs
    message = refusal(seven_classes(), task="vtab/cifar")
    assert "task 'vtab/dtd' in the file, 'vtab/cifar' in this run" in message and "num_classes 5" in message
    with pytest.raises(AllocationError, match=r"allocation file not found: .*vtab/svhn/spt_lora_0\.002\.json"):
        load_config(None, ["method.name=spt_lora", f"method.allocation={pattern}", "method.budget=0.002",
                           "method.task=vtab/svhn"])
    with pytest.raises(AllocationError, match=r"not found: .*\{task\}/spt_lora_0\.002\.json.*set method\.task"):
        load_config(None, ["method.name=spt_lora", f"method.allocation={pattern}", "method.budget=0.002"])


# ----------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("decay_vectors", [False, True])
def test_hta_weight_decay_scope(decay_vectors):
    """HTA's AdamW decays every trainable tensor with ``decay_vectors`` (ARC's code), else only >= 2-D ones."""
    import peft_dist
    from conftest import tiny_vit
    from peft_dist.engines.engine import build_optimizer

    model = tiny_vit()
    method = peft_dist.apply_method(model, "hta", rank=1, decay_vectors=decay_vectors)
    optimizer = build_optimizer(method.param_groups(model, 0.05), load_config(None, []).optim)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay_of) == {id(p) for p in trainable.values()}
    vectors = [n for n, p in trainable.items() if p.ndim == 1]
    assert any(".v_left." in n for n in vectors) and any(".diag." in n for n in vectors)
    for name, p in trainable.items():
        assert decay_of[id(p)] == (0.05 if decay_vectors or p.ndim >= 2 else 0.0), name


def test_spt_norm_entries_counted_not_trained_is_the_official_option(tmp_path):
    """The official code counts LayerNorm entries picked one by one but never trains them (spec spt_arc_hta §1.5)."""
    import peft_dist
    from conftest import tiny_vit
    from peft_dist.methods.base import count_trainable
    from test_spt import mixed_allocation

    path, entry = mixed_allocation(tmp_path, "lora")
    norm_entries = len(entry["unstructured"]["blocks.1.norm1.weight"])
    counts, summaries = {}, {}
    for train_norm in (True, False):
        model = tiny_vit()
        method = peft_dist.apply_method(model, "spt_lora", allocation=str(path), budget=0.004,
                                        train_norm_entries=train_norm)
        counts[train_norm] = count_trainable(model)["trainable_params_without_head"]
        summaries[train_norm] = method.summary(model)
        assert (type(model.blocks[1].norm1).__name__ == "SPTLayerNorm") is train_norm
    assert counts[True] == entry["total"] and counts[False] == entry["total"] - norm_entries > 0
    assert summaries[False]["unstructured_norm_entries_counted_not_trained"] == norm_entries
    assert summaries[False]["allocation_total"] == entry["total"]  # still counted in the budget


# ----------------------------------------------------------------------------------------------- recipes
PER_TASK = {"spt/spt_lora/vtab": "spt/vtab_lora.yaml", "spt/spt_adapter/vtab": "spt/vtab_adapter.yaml",
            "arc/vtab": "arc/vtab.yaml", "hta/vtab": "hta/vtab.yaml"}
"""Per-task VTAB recipe folders and the family recipe each task's file specialises."""
TASK_KEYS = {"model.name", "model.checkpoint", "model.num_classes", "data.source", "data.path", "method.task",
             "train.out_dir", "train.eval_every_epochs"}
"""What a per-task file may add to or change in its family recipe."""


def flat_yaml(path) -> dict:
    import yaml

    return {f"{section}.{k}": v for section, values in yaml.safe_load(path.read_text()).items()
            for k, v in values.items()}


def test_per_task_vtab_recipes_are_their_family_recipe_with_the_tasks_classes_and_shards():
    from conftest import REPO
    from peft_dist.tasks import TASKS, VTAB_SPLITS, get_task

    recipes = REPO / "configs" / "recipes"
    keys = {p.stem: flat_yaml(p)["method.task"] for p in (recipes / "spt/spt_lora/vtab").glob("*.yaml")}
    assert sorted(get_task(k).key for k in keys.values()) == sorted(t for t in TASKS if t.startswith("vtab/"))
    for folder, family in PER_TASK.items():
        base = flat_yaml(recipes / family)
        files = sorted((recipes / folder).glob("*.yaml"))
        assert [p.stem for p in files] == sorted(keys), folder
        for path in files:
            recipe, task = flat_yaml(path), get_task(keys[path.stem])
            assert recipe["model.num_classes"] == task.num_classes, path
            assert recipe["data.path"] == f"data/vtab-1k/{path.stem}" and recipe["data.train_split"] in VTAB_SPLITS
            assert recipe.get("method.task", task.key) == task.key, path
            assert {k: v for k, v in recipe.items() if k not in TASK_KEYS} == \
                {k: v for k, v in base.items() if k not in TASK_KEYS}, path
            assert recipe["train.out_dir"] == f"runs/{folder.split('/')[-2]}/vtab/{path.stem}", path
            if not folder.startswith("spt/"):  # SPT's need their sensitivity file first (tests/test_config.py)
                cfg = load_config(path, ["data.source=synthetic"])
                assert cfg.model.num_classes == task.num_classes


def test_snella_recipes_train_with_the_official_precision_and_ema():
    """fp16 where the SNELLA-32 VTAB scripts pass --amp (spec snell_snella §5.1), fp32 elsewhere; the model EMA
    (0.9999) on every SNELLA FGVC recipe (train_alloc_ema.py, §4.6) and on no other recipe."""
    from conftest import REPO

    amp = {"cifar", "camelyon", "pets"}
    for path in sorted((REPO / "configs" / "recipes").rglob("*.yaml")):
        recipe = flat_yaml(path)
        snella = "snella32" in path.parts
        if snella and path.parent.name == "vtab":
            assert recipe["train.precision"] == ("fp16" if path.stem in amp else "fp32"), path
        elif "train.precision" in recipe:
            assert recipe["train.precision"] == "fp32", path
        ema = snella and path.parent.name == "fgvc"
        assert recipe.get("train.ema_decay") == (0.9999 if ema else None), path
        if ema or recipe.get("train.precision") == "fp16":
            load_config(path, ["data.source=synthetic"])  # validates


def test_every_recipe_names_splits_its_benchmarks_shards_hold():
    """``peft-dist shards vtab:…`` writes VTAB-1k's own split names (train800val200, test, …) and ``fgvc:…``
    VPT's (train, val, test): a recipe naming another split would stop at its first epoch."""
    import yaml

    from conftest import REPO
    from peft_dist.tasks import FGVC_SPLITS, VTAB_SPLITS

    checked = 0
    for path in sorted((REPO / "configs" / "recipes").rglob("*.yaml")):
        data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
        where = str(data.get("path") or path.relative_to(REPO))
        splits = VTAB_SPLITS if "vtab" in where else FGVC_SPLITS if "fgvc" in where else None
        assert splits is not None, f"{path}: which benchmark?"
        for key in ("train_split", "eval_split"):
            if key in data:
                assert data[key] in splits, f"{path}: data.{key}: {data[key]!r} is not one of {splits}"
                checked += 1
    assert checked > 200
