"""The slurm/ templates on a real two-node SLURM cluster (tests/slurm_cluster.py: slurmctld and two slurmd, each node
in its own network and UTS namespace), started once for the module.

- single_node.sbatch, 4 tasks on one node, is the reference: a 4-rank run of the job.
- multi_node.sbatch, 2 nodes x 2 processes (srun -> torchrun per node -> c10d rendezvous on node1), ends with
  exactly the reference's adapters; a SIGUSR1 mid-run checkpoints, requeues and resumes to the same adapters with
  every step logged once; killing node2's training processes mid-run ends every rank within dist.timeout_s and
  the requeued job resumes from the last checkpoint to the same adapters; a requeued job that fails before it trains
  (a marker from an earlier preemption, then a start-up failure) ends without requeueing itself again.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import PYTHON, REPO, TINY_VIT
from slurm_cluster import FINISHED, SlurmUnavailable, TwoNodeSlurm, ensure_installed

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

PEFT_DIST = str(Path(PYTHON).with_name("peft-dist"))
CONFIG = str(REPO / "configs" / "demo.yaml")
STEPS = 40
TIMEOUT_S = 20
TRAIN = ["model.num_classes=10", "model.kwargs={" + ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()) + "}",
         "method.name=lora", "dist.engine=ddp", "data.source=synthetic", "data.synthetic_samples=512",
         "data.batch_size=16", "data.num_workers=0", "data.img_size=32", f"train.steps={STEPS}", "train.log_every=1",
         "train.save_every_steps=5", "train.progress=false", "tracking.enabled=false", "memory.enabled=false",
         "optim.lr=3e-3", f"dist.timeout_s={TIMEOUT_S}"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        ensure_installed()
        cluster = TwoNodeSlurm(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as e:
        pytest.skip(f"no local SLURM cluster: {e}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jobs")


class Job:
    def __init__(self, slurm: TwoNodeSlurm, work: Path, name: str, template: str, nodes: int, *overrides: str):
        self.slurm, self.out_dir, self.name = slurm, work / name, name
        tasks = ["--ntasks-per-node=4", "--cpus-per-task=1"] if template == "single_node" else \
            ["--ntasks-per-node=1", "--cpus-per-task=2"]
        exports = f"ALL,OMP_NUM_THREADS=1,PEFT_DIST={PEFT_DIST},PYTHON={PYTHON},GPUS_PER_NODE=2,OUT_DIR={self.out_dir}"
        cmd = ["sbatch", "--parsable", f"--chdir={REPO}", f"--nodes={nodes}", *tasks, "--gpus-per-node=0",
               f"--job-name={name}", f"--output={work}/{name}-%j.out", f"--export={exports}",
               str(REPO / "slurm" / f"{template}.sbatch"), CONFIG, *TRAIN, *overrides]
        self.id = slurm.run(*cmd).stdout.strip().split(";")[0]
        self.log_file = work / f"{name}-{self.id}.out"

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.is_file() else "(no output yet)"

    def field(self, name: str) -> str:
        return self.slurm.job_field(self.id, name)

    def wait(self, timeout: float = 240) -> str:
        try:
            return self.slurm.wait_for(self.id, FINISHED, timeout)
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{self.log()[-3000:]}") from None

    def wait_for_step(self, step: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while len(logged_steps(self.out_dir)) < step:
            state = self.field("JobState")
            assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"{state}:\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, f"no step {step} after {timeout} s:\n{self.log()[-3000:]}"
            time.sleep(0.1)

    def wait_for_restart(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.field("Restarts") in ("", "0"):
            assert time.monotonic() < deadline, f"job {self.id} was not requeued:\n{self.log()[-3000:]}"
            time.sleep(0.25)

    def completed(self) -> "Job":
        state = self.wait()
        assert state == "COMPLETED", self.log()[-3000:]
        return self


def logged_steps(out_dir: Path) -> list[int]:
    f = out_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []


def assert_same_adapters(a_dir: Path, b_dir: Path) -> None:
    a = load_file(str(a_dir / "adapter.safetensors"))
    b = load_file(str(b_dir / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k


@pytest.fixture(scope="module")
def reference(slurm, work) -> Job:
    """single_node.sbatch with 4 tasks on node1: the 4-rank run every multi-node job must reproduce."""
    return Job(slurm, work, "single4", "single_node", 1).completed()


@pytest.fixture(scope="module")
def multi_node(slurm, work) -> Job:
    return Job(slurm, work, "multi", "multi_node", 2).completed()


def test_single_node_template_runs_four_tasks(reference):
    summary = json.loads((reference.out_dir / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["steps"] == STEPS and summary["status"] == "finished"
    assert reference.field("NodeList") == "node1"
    assert logged_steps(reference.out_dir) == list(range(1, STEPS + 1))


def test_multi_node_template_equals_the_single_node_run(reference, multi_node):
    summary = json.loads((multi_node.out_dir / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["steps"] == STEPS
    assert multi_node.field("NodeList") == "node[1-2]"
    assert "rendezvous node1:" in multi_node.log()
    assert logged_steps(multi_node.out_dir) == list(range(1, STEPS + 1))
    assert_same_adapters(reference.out_dir, multi_node.out_dir)
