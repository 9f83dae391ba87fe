"""The slurm/ templates on a real (single-host) SLURM: a 2-task job runs to completion; a job sent SIGUSR1 mid-run
checkpoints, is requeued, resumes and ends with the same adapter weights as the uninterrupted job."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO
from slurm_cluster import LocalSlurm, SlurmUnavailable, ensure_installed

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

PEFT_DIST = str(Path(REPO) / ".venv" / "bin" / "peft-dist")
TRAIN = ["model.name=vit_tiny_patch16_224", "model.num_classes=10",
         "model.kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}",
         "method.name=lora", "dist.engine=ddp", "data.source=synthetic", "data.synthetic_samples=512",
         "data.batch_size=32", "data.num_workers=0", "data.img_size=32", "train.steps=60", "train.log_every=1",
         "train.progress=false", "tracking.enabled=false", "optim.lr=3e-3", "dist.timeout_s=120"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        ensure_installed()
        cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as e:
        pytest.skip(f"no local SLURM: {e}")
    yield cluster
    cluster.stop()


def submit(slurm: LocalSlurm, work: Path, out_dir: Path) -> str:
    cmd = ["sbatch", "--parsable", f"--chdir={work}", "--ntasks-per-node=2", "--cpus-per-task=1",
           "--gpus-per-node=0", f"--output={work}/slurm-%j.out", "--export=ALL,OMP_NUM_THREADS=1",
           str(Path(REPO) / "slurm" / "single_node.sbatch"), str(Path(REPO) / "configs" / "demo.yaml"), *TRAIN]
    slurm.env.update(PEFT_DIST=PEFT_DIST, OUT_DIR=str(out_dir))
    return slurm.run(*cmd).stdout.strip().split(";")[0]


def logged_steps(out_dir: Path) -> int:
    f = out_dir / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.is_file() else 0


def test_uninterrupted_and_preempted_jobs_agree(slurm, tmp_path):
    straight = tmp_path / "straight"
    job = submit(slurm, tmp_path, straight)
    state = slurm.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=400)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 60

    preempted = tmp_path / "preempted"
    job = submit(slurm, tmp_path, preempted)
    deadline = time.monotonic() + 300
    while logged_steps(preempted) < 5:
        assert time.monotonic() < deadline, "the job never started training"
        assert slurm.job_field(job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
            (tmp_path / f"slurm-{job}.out").read_text()[-3000:]
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", job)  # to the job step's tasks, as --signal=USR1@90 would
    deadline = time.monotonic() + 500
    while slurm.job_field(job, "Restarts") in ("", "0"):
        assert time.monotonic() < deadline, "the preempted job was not requeued"
        time.sleep(0.5)
    state = slurm.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=500)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "preempted: requeueing job" in log and "resumed from" in log
    records = [json.loads(line)["step"] for line in (preempted / "metrics.jsonl").read_text().splitlines()]
    assert records == list(range(1, 61))  # no step lost or repeated across the requeue

    a = load_file(str(straight / "adapter.safetensors"))
    b = load_file(str(preempted / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
