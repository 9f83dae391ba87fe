"""DeepSpeed started the way srun and a plain `peft-dist train` start it: no LOCAL_RANK in the environment
(DeepSpeed asserts on it and takes it for the GPU index); the engine sets it from the launch environment's local rank
(SLURM_LOCALID) and hands DeepSpeed the device the process picked, so both agree."""
import json
import os

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def train_without_local_rank(rank: int, world: int, port: int, out_dir: str, result_file: str) -> None:
    from dataclasses import replace

    from launcher.env import DistEnv
    from peft_dist.config import load_config
    from peft_dist.train.trainer import Trainer
    from test_ddp import overrides
    from test_resume_engines import global_batches

    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    batches = global_batches(2)
    cfg = load_config(None, overrides(out_dir, "deepspeed2", "lora") + ["train.steps=2"])
    # the second task of a node, as srun starts it with SLURM_LOCALID=1 (alone in its world here)
    env = replace(DistEnv(), local_rank=1, local_world_size=2)
    trainer = Trainer(cfg, env, torch.device("cpu"), batches, batches)
    summary = trainer.fit()
    ds = trainer.engine.model
    with open(result_file, "w") as f:
        json.dump({"status": summary["status"], "local_rank": os.environ.get("LOCAL_RANK"),
                   "deepspeed_local_rank": ds.local_rank, "deepspeed_device": str(ds.device)}, f)


def test_deepspeed_runs_without_local_rank_in_the_environment(tmp_path):
    from test_resume_engines import spawn

    spawn(1, train_without_local_rank, str(tmp_path / "run"), str(tmp_path / "result.json"))
    assert json.loads((tmp_path / "result.json").read_text()) == {
        "status": "finished", "local_rank": "1", "deepspeed_local_rank": 1, "deepspeed_device": "cpu"}
