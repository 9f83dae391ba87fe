"""The README's main job, end to end: `peft-dist demo` writes the digits shards, trains LoRA on 2 gloo processes
from them, evaluates, logs to MLflow and prints the summary; its top-1 must be well above chance."""
import json
import subprocess
from pathlib import Path

import mlflow
import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(600)]


def test_demo(tmp_path):
    out = tmp_path / "demo"
    exe = str(Path(REPO) / ".venv" / "bin" / "peft-dist")
    r = subprocess.run([exe, "demo", "--out-dir", str(out)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["top1"] >= 0.80, summary
    assert summary["world_size"] == 2 and summary["engine"] == "ddp" and summary["method"] == "lora"
    assert len(summary["peak_memory_bytes_per_rank"]) == 2 and all(summary["peak_memory_bytes_per_rank"])
    for line in ("top-1 (test, last epoch)", "trainable parameters", "images/s", "peak memory per rank",
                 "memory by category (MiB)", "mlflow ui --backend-store-uri sqlite:///"):
        assert line in r.stdout, line
    info = json.loads((tmp_path / "demo-digits-shards" / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] + info["splits"]["test"]["num_samples"] == 1797
    mlflow.set_tracking_uri(summary["mlflow_tracking_uri"])
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.tags["world_size"] == "2" and run.data.metrics["eval_top1"] == summary["top1"]
    assert json.loads((out / "memory.json").read_text())
