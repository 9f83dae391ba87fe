"""SLURM's signals outside the training loop (launcher/preemption.py), on real processes: SIGUSR1 while `peft-dist
train` is still setting up (before the model is built) requeues instead of killing the process, and a DataLoader
worker started by spawn survives SIGUSR1 (only the training process acts on it) but ends on its DataLoader's SIGTERM.
tests/test_slurm.py covers the batch scripts' side (requeue on SIGUSR1, none on scancel's SIGTERM)."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import PYTHON, REPO, TINY_VIT
from test_data_loader import id_shards  # noqa: F401 — the fixture: 250 id-labelled samples in 7 shards

pytestmark = pytest.mark.timeout(240)

# the signal goes out as soon as the CLI's main() runs: the parser, config, data and model are still ahead
SIGNAL_AT_START = """
import os, signal, sys, threading, time

def in_main(frame):
    while frame is not None:
        if frame.f_code.co_name == "main" and frame.f_code.co_filename.endswith("peft_dist/cli.py"):
            return True
        frame = frame.f_back
    return False

def send_once_main_runs(main_thread):
    while not in_main(sys._current_frames().get(main_thread)):
        time.sleep(0.0002)
    os.kill(os.getpid(), signal.SIGUSR1)

threading.Thread(target=send_once_main_runs, args=(threading.get_ident(),), daemon=True).start()
from peft_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigusr1_while_setting_up_requeues_without_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    kwargs = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()) + "}"
    r = subprocess.run([PYTHON, "-c", SIGNAL_AT_START, "train", "--config", str(REPO / "configs" / "demo.yaml"),
                        f"model.kwargs={kwargs}", "dist.engine=single", "data.source=synthetic",
                        "data.num_workers=0", "train.steps=3", "train.progress=false", "tracking.enabled=false",
                        f"train.out_dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=200)
    assert r.returncode == 75, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])  # not -SIGUSR1: killed
    assert "preempted (SIGUSR1): checkpoint at step 0 kept" in r.stdout
    assert json.loads((out / "preempted.json").read_text()) == {"step": 0}
    assert not (out / "checkpoints").exists() and not (out / "summary.json").exists()


WORKER_SURVIVES = """
import os, signal, subprocess, sys
import torch.multiprocessing as mp
from peft_dist.config import DataConfig
from peft_dist.data import build_train_loader

mp.set_start_method("spawn", force=True)  # a spawned worker starts with SIGUSR1's default action: terminate
cfg = DataConfig(path=sys.argv[1], img_size=8, batch_size=8, num_workers=1, mean=(0.5,) * 3, std=(0.5,) * 3)
loader = build_train_loader(cfg, 0, 1, 0)
loader.set_epoch(0)
count, signalled = 0, []
for batch in loader:
    count += 1
    if count == 2:  # the worker is running (it produced batches): signal every child of this process
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                signalled += [int(p) for p in f.read().split()]
        for pid in signalled:  # from another process, as SLURM's step daemon sends it
            subprocess.run(["kill", "-USR1", str(pid)], check=True)
print(count, len(signalled), loader.batches_per_epoch)
"""


def test_a_spawned_loader_worker_ignores_sigusr1(id_shards):
    shards, _ = id_shards
    r = subprocess.run([PYTHON, "-c", WORKER_SURVIVES, str(shards)], cwd=REPO, capture_output=True, text=True,
                       timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    count, signalled, per_epoch = map(int, r.stdout.split()[-3:])
    assert signalled >= 1 and count == per_epoch  # the epoch ran to its end after the worker was signalled


WORKER_ENDS_WHEN_THE_PARENT_TERMINATES_IT = """
import os, signal, sys, time
import torch.multiprocessing as mp
from peft_dist.config import DataConfig
from peft_dist.data import build_train_loader

mp.set_start_method("spawn", force=True)
cfg = DataConfig(path=sys.argv[1], img_size=8, batch_size=8, num_workers=1, mean=(0.5,) * 3, std=(0.5,) * 3)
loader = build_train_loader(cfg, 0, 1, 0)
loader.set_epoch(0)
batches = iter(loader)
next(batches)
children = [int(p) for task in os.listdir("/proc/self/task")
            for p in open(f"/proc/self/task/{task}/children").read().split()]
workers = [pid for pid in children if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()]  # not the
# resource tracker, which ignores SIGTERM itself
for pid in workers:
    os.kill(pid, signal.SIGTERM)  # what DataLoader's shutdown does to a worker that does not stop when asked
deadline = time.monotonic() + 30
while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") and
                                          open(f"/proc/{pid}/stat").read().split()[2] != "Z" for pid in workers):
    time.sleep(0.1)
print(len(workers), sum(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                        for pid in workers))
os._exit(0)
"""


def test_a_loader_worker_ends_when_the_training_process_terminates_it(id_shards):
    """A worker ignoring SIGTERM could not be ended by its DataLoader, and the trainer's exit would wait in join
    forever (seen: a corrupt-sample run with one loader worker never ended)."""
    shards, _ = id_shards
    r = subprocess.run([PYTHON, "-c", WORKER_ENDS_WHEN_THE_PARENT_TERMINATES_IT, str(shards)], cwd=REPO,
                       capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    workers, alive = map(int, r.stdout.split()[-2:])
    assert workers >= 1 and alive == 0
