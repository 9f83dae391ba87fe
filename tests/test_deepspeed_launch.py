"""DeepSpeed started the way srun and a plain `peft-dist train` start it: no LOCAL_RANK in the environment
(DeepSpeed reads its device from it; the engine hands it the device the process picked)."""
import json
import os

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def train_without_local_rank(rank: int, world: int, port: int, out_dir: str, result_file: str) -> None:
    from launcher.env import DistEnv
    from peft_dist.config import load_config
    from peft_dist.train.trainer import Trainer
    from test_ddp import overrides
    from test_resume_engines import global_batches

    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    batches = global_batches(2)
    cfg = load_config(None, overrides(out_dir, "deepspeed2", "lora") + ["train.steps=2"])
    summary = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches).fit()
    with open(result_file, "w") as f:
        json.dump({"status": summary["status"], "local_rank": os.environ.get("LOCAL_RANK")}, f)


def test_deepspeed_runs_without_local_rank_in_the_environment(tmp_path):
    from test_resume_engines import spawn

    spawn(1, train_without_local_rank, str(tmp_path / "run"), str(tmp_path / "result.json"))
    assert json.loads((tmp_path / "result.json").read_text()) == {"status": "finished", "local_rank": "0"}
