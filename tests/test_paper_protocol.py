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


def test_timm_epoch_needs_whole_warmup_epochs():
    with pytest.raises(ConfigError, match=r"optim\.warmup_epochs.*timm_epoch") as err:
        load_config(None, ["optim.schedule=timm_epoch", "optim.warmup_epochs=2.5"])
    assert "\n" not in str(err.value)
