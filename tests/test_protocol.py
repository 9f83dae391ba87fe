"""Evaluation protocol: the default reports the last epoch; --paper-protocol adds the best test epoch, labelled."""
import json

import torch

from launcher.env import DistEnv
from peft_dist.train.trainer import PAPER_PROTOCOL_LABEL, Trainer
from test_baselines import fixed_batches, tiny_cfg


def test_standard_protocol_reports_last_epoch_only(tmp_path):
    batches = fixed_batches(n=2)
    cfg = tiny_cfg(tmp_path, "lora", "train.epochs=3")
    s = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches).fit()
    assert s["protocol"] == "standard (last epoch)" and "top1_paper_protocol" not in s
    assert [e["epoch"] for e in s["eval_history"]] == [3.0]


def test_paper_protocol_evaluates_on_the_official_epochs(tmp_path):
    """The scripts evaluate after 0-based epoch e when ``e % val_interval == 0 or e >= epochs - 10``: for 25
    epochs after e = 0, 10 and 15-24, i.e. after 1, 11 and 16-25 completed epochs (eval_history counts those)."""
    batches = fixed_batches(n=1)
    cfg = tiny_cfg(tmp_path, "linear", "train.epochs=25", "train.protocol=paper", "tracking.enabled=true")
    s = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches).fit()
    epochs = [e["epoch"] for e in s["eval_history"]]
    official = [e for e in range(25) if e % 10 == 0 or e >= 25 - 10]
    assert epochs == [float(e + 1) for e in official] == [1.0, 11.0] + [float(e) for e in range(16, 26)]
    # one outcome each: the headline top-1 stays the last evaluation's; the paper figure is the highest top-1 with
    # the first epoch that reached it (here 0.75 from epoch 16 on, so a "last epoch" figure would say 25)
    history = s["eval_history"]
    assert s["top1"] == history[-1]["top1"]
    top = max(e["top1"] for e in history)
    first_best = next(e for e in history if e["top1"] == top)
    assert (s["top1_paper_protocol"], s["top1_paper_protocol_epoch"]) == (top, first_best["epoch"])
    assert s["protocol"] == PAPER_PROTOCOL_LABEL and "test split" in s["protocol"]
    saved = json.loads((tmp_path / "linear" / "summary.json").read_text())
    assert saved["protocol"] == PAPER_PROTOCOL_LABEL

    import mlflow

    mlflow.set_tracking_uri(s["mlflow_tracking_uri"])
    run = mlflow.get_run(s["mlflow_run_id"])
    assert run.data.tags["protocol"] == PAPER_PROTOCOL_LABEL
    assert run.data.metrics["eval_top1_paper_protocol"] == s["top1_paper_protocol"]


def test_paper_protocol_val_interval_and_standard_interval(tmp_path):
    batches = fixed_batches(n=2, bs=4)  # 2 steps per epoch: evaluations happen at epoch ends only
    cfg = tiny_cfg(tmp_path / "paper", "linear", "train.epochs=14", "train.protocol=paper",
                   "train.eval_every_epochs=3")
    s = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches).fit()
    assert [e["epoch"] for e in s["eval_history"]] == [1.0, 4.0] + [float(e) for e in range(5, 15)]
    cfg = tiny_cfg(tmp_path / "standard", "linear", "train.epochs=7", "train.eval_every_epochs=3")
    s = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches).fit()
    assert [e["epoch"] for e in s["eval_history"]] == [3.0, 6.0, 7.0]
