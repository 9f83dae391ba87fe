"""Resume under every engine, real process groups (gloo): an interrupted-and-resumed run ends with exactly the
checkpoint of an uninterrupted one (model and optimizer tensors, bitwise), and a checkpoint written at one world size
loads bitwise at another (2 → 1, 1 → 2), DeepSpeed's ZeRO partitions included.

Across world sizes only the restored state can be compared bitwise: the runs that continue from it add gradients
over another number of ranks, which rounds differently."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import _run_with_progress, free_port
from resume_workers import interrupted, resume_and_compare, straight_and_resumed
from test_ddp import overrides
from peft_dist.train import checkpoint as ckpt

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

ENGINES = ["ddp", "fsdp2", "deepspeed2", "deepspeed3", "fairscale_oss"]


def spawn(n: int, worker, *args) -> None:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="ranks-") as progress:
        mp.start_processes(_run_with_progress, args=(n, free_port(), progress, worker, *args), nprocs=n, join=True,
                           start_method="spawn")


def global_batches(n: int = 4, size: int = 8):
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 5, (size,), generator=g)) for _ in range(n)]


def run_overrides(out_dir, engine: str, *extra: str) -> list[str]:
    ov = overrides(out_dir, engine, "lora") + ["train.steps=4", "train.save_every_steps=2", "train.log_every=1",
                                               "train.keep_checkpoints=3", "method.dropout=0.1", *extra]
    return ov


def assert_same_checkpoint(a, b) -> None:
    for name in (ckpt.MODEL_FILE, ckpt.OPTIMIZER_FILE):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert sorted(x) == sorted(y), name
        differ = [k for k in x if not torch.equal(x[k], y[k])]
        assert not differ, f"{name}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    ma, mb = ckpt.read_manifest(a), ckpt.read_manifest(b)
    assert ma["scheduler"] == mb["scheduler"] and ma["trainer"] == mb["trainer"]


@pytest.mark.parametrize("engine", ["single"] + ENGINES)
def test_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path, engine):
    world = 1 if engine == "single" else 2
    batches = global_batches()
    straight = run_overrides(tmp_path / "straight", engine)
    resumed = run_overrides(tmp_path / "resumed", engine)
    spawn(world, straight_and_resumed, straight, resumed, batches, 3)
    final_a = tmp_path / "straight" / "checkpoints" / "step-00000004"
    final_b = tmp_path / "resumed" / "checkpoints" / "step-00000004"
    assert_same_checkpoint(final_a, final_b)
    manifest = ckpt.read_manifest(final_b)
    assert manifest["world_size"] == world and manifest["engine"] == ("deepspeed" if engine.startswith("deepspeed") else engine)
    # the resumed run's step 4 followed its own step 2, not a re-run of steps 1-2: metrics hold each step once
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("worlds", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_checkpoint_loads_bitwise_at_another_world_size(tmp_path, engine, worlds):
    saved_on, loaded_on = worlds
    batches = global_batches()
    ov = run_overrides(tmp_path / "run", engine)
    spawn(saved_on, interrupted, ov, batches, 3)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert ckpt.read_manifest(checkpoint)["world_size"] == saved_on
    result_file = tmp_path / "result.json"
    spawn(loaded_on, resume_and_compare, ov, batches, str(checkpoint), str(result_file))
    result = json.loads(result_file.read_text())
    assert result["start_step"] == 2
    assert result["model_keys_equal"] and result["optim_keys_equal"]
    assert result["model_differs"] == [] and result["optim_differs"] == []
    final = ckpt.read_manifest(tmp_path / "run" / "checkpoints" / "step-00000004")
    assert final["world_size"] == loaded_on
