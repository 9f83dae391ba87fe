"""The README's main job, end to end through the real CLI: `peft-dist demo` pre-trains a small ViT on the digits
0-4 once (cached), adapts it to the digits 5-9 with SNELL under FSDP2 on 2 gloo processes with the frozen backbone
sharded, and prints its memory beside the estimated replicated and full fine-tuning runs, its top-1 beside linear
probing, the plot, the adapter and the mlflow ui command."""
import json
import re
import subprocess
from pathlib import Path

import mlflow
import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(1500)]


def test_demo(tmp_path):
    runs = tmp_path / "runs"
    out = runs / "demo"
    exe = str(Path(REPO) / ".venv" / "bin" / "peft-dist")
    r = subprocess.run([exe, "demo", "--out-dir", str(out)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=1440)  # minutes on a loaded 2-core machine
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["world_size"], summary["engine"], summary["method"]) == (2, "fsdp2", "snell")

    # the transfer setting: 5 classes each side, the backbone pre-trained once and cached beside the run
    pretrained = runs / "digits-pretrained"
    record = json.loads((pretrained / "pretrain.json").read_text())
    assert (pretrained / "backbone.safetensors").is_file() and record["top1_digits_0to4"] >= 0.8
    for half in ("digits-0to4-shards", "digits-5to9-shards"):
        info = json.loads((runs / half / "_info.json").read_text())
        assert info["num_classes"] == 5
    probe = json.loads((pretrained / "linear_probe.json").read_text())["top1"]
    assert summary["top1"] > probe, (summary["top1"], probe)
    line = next(x for x in r.stdout.splitlines() if "vs linear probing" in x)
    assert f"snell {100 * summary['top1']:.1f} % vs linear probing {100 * probe:.1f} %" in line

    # the frozen backbone is sharded: each rank holds about half of what the replicated run holds (estimated)
    frozen = [rank["params_frozen_bytes"] for rank in json.loads((out / "memory.json").read_text())["ranks"]]
    table = r.stdout[r.stdout.index("memory per rank, MiB"):]
    replicated = re.search(r"same run, replicated \(ddp\), per rank \(estimated\)\s+([\d.]+)", table)
    full = re.search(r"full fine-tuning \(ddp\), per rank \(estimated\)\s+([\d.]+)\s+([\d.]+)", table)
    assert replicated and full, table
    replicated_frozen_mib = float(replicated.group(1))
    assert len(frozen) == 2 and all(0.4 < f / 2**20 / replicated_frozen_mib < 0.6 for f in frozen), \
        (frozen, replicated_frozen_mib)
    assert float(full.group(2)) > replicated_frozen_mib  # full fine-tuning trains the whole backbone

    # the plot, the adapter and MLflow
    lines = r.stdout.strip().splitlines()
    plot = Path(next(x for x in lines if x.startswith("plot: ")).removeprefix("plot: "))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapter = Path(next(x for x in lines if x.startswith("adapter: ")).removeprefix("adapter: "))
    assert adapter == out / "adapter.safetensors" and adapter.is_file()
    assert lines[-1] == f"mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}"
    mlflow.set_tracking_uri(summary["mlflow_tracking_uri"])
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.tags["world_size"] == "2" and run.data.metrics["eval_top1"] == summary["top1"]
    assert run.data.metrics["linear_probe_top1"] == probe
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(summary["mlflow_run_id"])]
    assert "demo.png" in artifacts, artifacts

    # a later demo reuses the cached backbone instead of pre-training again
    from peft_dist.demo import pretrained_digits_backbone

    before = (pretrained / "backbone.safetensors").stat().st_mtime_ns
    checkpoint, again = pretrained_digits_backbone(runs)
    assert checkpoint == pretrained / "backbone.safetensors" and again == record
    assert checkpoint.stat().st_mtime_ns == before
