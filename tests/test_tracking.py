"""MLflow: the run is read back from the default SQLite store with its params, metrics, tags and artifacts."""
import json

import mlflow
import torch

from launcher.env import DistEnv
from test_baselines import fixed_batches, tiny_cfg
from peft_dist.train.trainer import Trainer


def test_run_is_logged_to_sqlite(tmp_path):
    batches = fixed_batches()
    cfg = tiny_cfg(tmp_path, "lora", "tracking.enabled=true", "tracking.experiment=tracking-test",
                   "train.steps=4", "train.log_every=2")
    summary = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches).fit()
    uri = summary["mlflow_tracking_uri"]
    assert uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert not (tmp_path / "mlruns").exists()

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tracking-test"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "lora" and run.data.params["train.steps"] == "4"
    assert run.data.params["model.kwargs.depth"] == "2"
    assert run.data.tags["world_size"] == "1" and run.data.tags["engine"] == "single"
    assert run.data.tags["method"] == "lora" and run.data.tags["git_commit"]
    assert abs(run.data.metrics["eval_top1"] - summary["top1"]) < 1e-9
    assert {"loss", "lr", "images_per_s", "peak_memory_bytes_rank0"} <= set(run.data.metrics)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [2, 4]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "memory.json", "adapter.safetensors", "metrics.jsonl"} <= artifacts


def test_tracking_disabled_writes_no_store(tmp_path):
    batches = fixed_batches()
    cfg = tiny_cfg(tmp_path, "linear", "tracking.enabled=false", "train.steps=1")
    summary = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches).fit()
    # the summary (returned and on disk) says so explicitly: both MLflow fields present and null
    saved = json.loads((tmp_path / "linear" / "summary.json").read_text())
    for doc in (summary, saved):
        assert doc["mlflow_run_id"] is None and doc["mlflow_tracking_uri"] is None
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert not list(tmp_path.rglob("*.db")) and not list(tmp_path.rglob("mlruns"))
