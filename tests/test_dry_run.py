"""--dry-run: a 32-rank configuration checked on one CPU with a fake process group and meta weights."""
import subprocess

import pytest

from conftest import PYTHON, REPO
from launcher.dry_run import dry_run
from peft_dist.config import load_config

VIT_H_FROZEN = 630_764_800  # parameters of timm vit_huge_patch14_224 without its head


def test_cli_dry_run_vit_h_fsdp2_32_ranks():
    r = subprocess.run([PYTHON, "-m", "peft_dist.cli", "train", "--config", "configs/backbones/vit_h14.yaml",
                        "--config", "configs/methods/lora.yaml", "data.source=synthetic", "dist.engine=fsdp2",
                        "--dry-run", "--world-size", "32"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "world size 32" in r.stdout and "per-rank memory" in r.stdout
    assert f"frozen: {VIT_H_FROZEN:,}" in r.stdout


@pytest.mark.parametrize("engine, stage, frozen_divisor", [("fsdp2", 2, 32), ("ddp", 2, 1), ("deepspeed", 1, 1),
                                                           ("deepspeed", 3, 32)])
def test_per_rank_bytes_follow_the_sharding(engine, stage, frozen_divisor):
    cfg = load_config([REPO / "configs/backbones/vit_h14.yaml"], [
        "data.source=synthetic", "method.name=lora", "method.rank=8", f"dist.engine={engine}",
        f"dist.zero_stage={stage}"])
    report = dry_run(cfg, 32)
    b = report["per_rank_bytes"]
    # FSDP2 shards dim 0: rank 0 also holds tensors whose dim 0 is 1 (pos_embed, cls_token) whole, ~1.6 % extra
    assert abs(b["params_frozen"] - VIT_H_FROZEN * 4 / frozen_divisor) < 0.02 * VIT_H_FROZEN * 4 / frozen_divisor
    trainable = report["trainable_params"]
    if engine == "deepspeed":
        assert b["optimizer_state"] == 8 * -(-trainable // 32)
    elif engine == "fsdp2":
        # Adam state follows the trainable shards: 8 bytes per local fp32 element. Dim-0 sharding is uneven for
        # tensors with fewer rows than ranks (LoRA A is 8 x 1280): rank 0 holds a row of each, so it is the maximum.
        assert b["optimizer_state"] == 2 * b["params_trainable"]
        assert 8 * trainable / 32 <= b["optimizer_state"] < 8 * trainable / 2
    else:
        assert b["optimizer_state"] == 8 * trainable


def test_dry_run_names_a_missing_checkpoint(tmp_path):
    r = subprocess.run([PYTHON, "-m", "peft_dist.cli", "train", "--config", "configs/backbones/vit_b16.yaml",
                        "data.source=synthetic", f"model.checkpoint={tmp_path}/ViT-B_16.npz", "--dry-run"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == f"peft-dist: error: checkpoint not found: {tmp_path}/ViT-B_16.npz"


def test_shipped_vit_h_snell_config_dry_runs_on_32_ranks_in_under_a_minute():
    import time

    start = time.monotonic()
    r = subprocess.run([PYTHON, "-m", "peft_dist.cli", "train", "--config", "configs/vit_h_snell_fsdp2.yaml",
                        "--dry-run", "--world-size", "32"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert time.monotonic() - start < 60
    assert "vit_huge_patch14_224 + snell under fsdp2, world size 32" in r.stdout
    table = r.stdout[r.stdout.index("per-rank memory"):r.stdout.index("memory estimator")].splitlines()[2:]
    covered = []  # every rank appears in exactly one row
    for row in table:
        label = row.split()[0]
        first, _, last = label.partition("-")
        covered += range(int(first), int(last or first) + 1)
    assert covered == list(range(32))
    assert "peak allocated" in r.stdout


def test_fsdp2_spreads_adapters_with_few_rows_over_every_rank():
    """SNELL's factors are (2, d, r/2): sharded on dim 0 they would sit on ranks 0 and 1 only."""
    cfg = load_config([REPO / "configs/vit_h_snell_fsdp2.yaml"])
    report = dry_run(cfg, 32)
    frozen = [b["params_frozen"] for b in report["ranks"]]
    trainable = [b["params_trainable"] for b in report["ranks"]]
    assert sum(trainable) == 4 * report["trainable_params"] and sum(frozen) == 4 * report["frozen_params"]
    assert max(trainable) <= 1.05 * sum(trainable) / 32 and min(trainable) >= 0.9 * sum(trainable) / 32
    assert max(frozen) <= 1.01 * sum(frozen) / 32
    assert report["per_rank_bytes"] == max(report["ranks"], key=lambda b: b["total_static"])
