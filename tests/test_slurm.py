"""The slurm/ templates on a real two-node SLURM cluster (tests/slurm_cluster.py: slurmctld and two slurmd, each node
in its own network and UTS namespace), started once for the module.

- single_node.sbatch, 4 tasks on one node, is the reference: a 4-rank run of the job.
- multi_node.sbatch, 2 nodes x 2 processes (srun -> torchrun per node -> c10d rendezvous on node1), ends with
  exactly the reference's adapters; a SIGUSR1 mid-run checkpoints, requeues and resumes to the same adapters with
  every step logged once; killing node2's training processes mid-run ends every rank within dist.timeout_s and
  the requeued job resumes from the last checkpoint to the same adapters; a requeued job that fails before it trains
  (a marker from an earlier preemption, then a start-up failure) ends without requeueing itself again.
- a SIGUSR1 that reaches torchrun after the summary was written (torchrun then exits 1) still completes the job.
- scancel's SIGTERM stops a single-node job with a checkpoint and no requeue.

Import time dominates (torch + timm per process, 2 cores): jobs are tiny (TINY_VIT, 40 steps), the uninterrupted
multi-node job is the reference of every later one, and the jobs that only test a decision run one process a node.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, REPO, TINY_VIT
from slurm_cluster import FINISHED, NODES, SlurmUnavailable, TwoNodeSlurm, ensure_installed

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
    def __init__(self, slurm: TwoNodeSlurm, work: Path, name: str, template: str, nodes: int, *overrides: str,
                 per_node: int | None = None):
        """``per_node`` training processes on each node: srun tasks (single_node, 4 by default) or torchrun's
        processes (multi_node, 2 by default), one thread each."""
        self.slurm, self.out_dir, self.name = slurm, work / name, name
        if template == "single_node":
            per_node = per_node or 4
            tasks = [f"--ntasks-per-node={per_node}", "--cpus-per-task=1"]
        else:
            per_node = per_node or 2
            tasks = ["--ntasks-per-node=1", f"--cpus-per-task={per_node}"]
        exports = f"ALL,OMP_NUM_THREADS=1,PEFT_DIST={PEFT_DIST},PYTHON={PYTHON},GPUS_PER_NODE={per_node}," \
                  f"OUT_DIR={self.out_dir}"
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
        # slurmctld gives a requeued job a begin time about two minutes ahead; the test moves it to now, but only
        # once the old instance has left the nodes, and a second later: slurmd refuses a launch whose credential
        # is not newer (in whole seconds) than the revocation of the instance before it
        while self.field("JobState") != "PENDING" or not self.slurm.nodes_idle():
            assert time.monotonic() < deadline, f"job {self.id}'s previous instance did not end"
            time.sleep(0.25)
        time.sleep(1.5)
        self.slurm.run("scontrol", "update", f"JobId={self.id}", "StartTime=now")

    def completed(self) -> "Job":
        state = self.wait()
        assert state == "COMPLETED", self.log()[-3000:]
        return self


def logged_steps(out_dir: Path) -> list[int]:
    f = out_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []


def assert_same_adapters(a_dir: Path, b_dir: Path, resumed: bool = False) -> None:
    """Bitwise equal; or, when ``b_dir``'s job resumed mid-run, equal up to the order of the 4 ranks' gradient sum
    in the resumed process's first step: DDP rebuilds its buckets after a process's first backward, so that step's
    gloo ring adds the 4 gradients in another order (differences of a few float32 ulps; a lost or repeated step
    moves the adapters by ~1e-3)."""
    a = load_file(str(a_dir / "adapter.safetensors"))
    b = load_file(str(b_dir / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        if resumed:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


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
    for node in ("node1", "node2"):  # each node's slurmd started its torchrun
        slurmd_log = (multi_node.slurm.root / "log" / f"slurmd-{node}.log").read_text()
        assert f"launch task StepId={multi_node.id}.0 " in slurmd_log
    assert logged_steps(multi_node.out_dir) == list(range(1, STEPS + 1))
    assert_same_adapters(reference.out_dir, multi_node.out_dir)


def command_lines_on(slurm: TwoNodeSlurm, node: str) -> dict[int, list[bytes]]:
    """Each process on ``node`` and its argv (processes that exit while being read are left out)."""
    found = {}
    for pid in slurm.pids_on(node):
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
    return found


def training_processes(slurm: TwoNodeSlurm, node: str) -> list[int]:
    """The training processes (torchrun's workers, not torchrun itself) running on ``node``."""
    return [pid for pid, argv in command_lines_on(slurm, node).items()
            if b"peft_dist.cli" in argv and b"torch.distributed.run" not in argv]


def torchrun_processes(slurm: TwoNodeSlurm, node: str) -> list[int]:
    """Processes on ``node`` whose command line runs torch.distributed.run (torchrun, and srun starting it)."""
    return [pid for pid, argv in command_lines_on(slurm, node).items() if b"torch.distributed.run" in argv]


def resumed_at(log: str) -> int:
    lines = [line for line in log.splitlines() if line.startswith("resumed from ")]
    assert len(lines) == 1, log[-3000:]
    return int(lines[0].split(" at step ")[1].split()[0])


def test_sigusr1_checkpoints_requeues_and_resumes_to_the_same_adapters(slurm, work, multi_node):
    job = Job(slurm, work, "preempted", "multi_node", 2)
    job.wait_for_step(8)
    slurm.run("scancel", "--signal=USR1", job.id)  # to every process of the job's steps, as --signal=USR1@120 does
    job.wait_for_restart()
    job.completed()
    log = job.log()
    assert "preempted (SIGUSR1)" in log and "preempted: requeueing job" in log
    assert 8 <= resumed_at(log) < STEPS
    assert logged_steps(job.out_dir) == list(range(1, STEPS + 1))  # no step lost or repeated across the requeue
    assert_same_adapters(multi_node.out_dir, job.out_dir, resumed=True)


def test_sigusr1_after_the_summary_still_completes_the_job(slurm, work):
    """SLURM's USR1 reaches torchrun once its workers wrote the summary: torchrun then exits 1 although every worker
    finishes; the job is COMPLETED, not FAILED."""
    import os
    import signal

    job = Job(slurm, work, "signalled-at-end", "multi_node", 2, per_node=1)
    summary = job.out_dir / "summary.json"
    deadline = time.monotonic() + 180
    next_state_check = 0.0
    while not summary.is_file():  # polled tightly: torchrun outlives the summary by a fraction of a second
        if time.monotonic() > next_state_check:
            assert job.field("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), job.log()[-3000:]
            next_state_check = time.monotonic() + 0.5
        assert time.monotonic() < deadline, job.log()[-3000:]
        time.sleep(0.005)
    # torchrun on each node (and the batch script's srun, which forwards the signal), as the step's --signal=USR1
    # reaches them, here a moment after the workers
    agents = [pid for node in NODES for pid in torchrun_processes(slurm, node)]
    for pid in agents:
        os.kill(pid, signal.SIGUSR1)
    assert job.wait() == "COMPLETED", job.log()[-3000:]
    # torchrun's 1, or srun's 143 for the node whose torchrun it then terminated
    assert agents and re.search(r"finished \(status [1-9]\d* after the summary was written\)", job.log()), \
        job.log()[-3000:]
    assert job.field("Restarts") == "0"


def test_killing_one_node_ends_every_rank_and_the_requeued_job_resumes(slurm, work, multi_node):
    import os
    import signal

    from peft_dist.train.checkpoint import list_checkpoints

    job = Job(slurm, work, "killed", "multi_node", 2)
    job.wait_for_step(12)  # past the checkpoint at step 10
    victims = training_processes(slurm, "node2")
    assert len(victims) == 2, victims
    killed = time.monotonic()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    while training_processes(slurm, "node1") or training_processes(slurm, "node2"):
        assert time.monotonic() - killed < TIMEOUT_S, \
            f"ranks still running {TIMEOUT_S} s (dist.timeout_s) after node2's were killed:\n{job.log()[-3000:]}"
        time.sleep(0.1)
    print(f"every rank ended {time.monotonic() - killed:.1f} s after node2's training processes were killed")
    assert job.wait() == "FAILED" and job.field("Restarts") == "0"  # a crash is no preemption: no requeue by itself
    last = list_checkpoints(job.out_dir)[-1]
    # --requeue: SLURM requeues such a job when a node fails; here, as an operator would, by hand
    slurm.run("scontrol", "requeue", job.id)
    job.wait_for_restart()
    job.completed()
    assert str(last) in job.log() and resumed_at(job.log()) >= 10
    assert logged_steps(job.out_dir) == list(range(1, STEPS + 1))
    assert_same_adapters(multi_node.out_dir, job.out_dir, resumed=True)


def test_a_requeued_job_that_fails_before_training_is_not_requeued_again(slurm, work):
    out_dir = work / "failing"
    out_dir.mkdir()
    (out_dir / "preempted.json").write_text('{"step": 5}\n')  # left by the preemption before this requeue
    # one process per node: the start-up fails the same way, at a third of the import cost
    job = Job(slurm, work, "failing", "multi_node", 2, f"model.checkpoint={work}/missing-backbone.safetensors",
              per_node=1)
    assert job.wait() == "FAILED", job.log()[-3000:]
    time.sleep(1)  # a requeue would show by now (scontrol requeue runs before the script exits)
    assert job.field("Restarts") == "0" and job.field("JobState") == "FAILED"
    assert "requeueing" not in job.log() and "missing-backbone.safetensors" in job.log()
    assert not (out_dir / "preempted.json").exists()


def test_scancel_stops_with_a_checkpoint_and_no_requeue(slurm, work):
    # what is tested is the trainer's and the batch script's decision: one task is enough
    job = Job(slurm, work, "cancelled", "single_node", 1, "dist.engine=single", per_node=1)
    job.wait_for_step(8)
    slurm.run("scancel", job.id)  # SIGTERM to the batch shell and every task, SIGKILL after KillWait
    assert job.wait() == "CANCELLED"
    deadline = time.monotonic() + 15
    while "stopped (SIGTERM)" not in job.log():
        assert time.monotonic() < deadline, job.log()[-3000:]
        time.sleep(0.2)
    time.sleep(1)
    assert job.field("Restarts") == "0" and job.field("JobState") == "CANCELLED"
    assert "requeueing" not in job.log() and not (job.out_dir / "preempted.json").exists()
    assert "exiting with status 143, not requeued" in job.log()
