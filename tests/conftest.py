"""Shared fixtures: tiny timm ViTs (design.md conventions) and helpers for multi-process gloo tests."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
"""A 2-block ViT with 16 tokens + cls: every method runs on it in milliseconds."""


def tiny_vit(num_classes: int = 5, seed: int = 0, **overrides):
    import peft_dist

    torch.manual_seed(seed)
    kwargs = {**TINY_VIT, **overrides}
    return peft_dist.create_backbone("vit_tiny_patch16_224", num_classes=num_classes, **kwargs)


def adamw_losses(model, steps: int = 15, lr: float = 1e-2, weight_decay: float = 0.0) -> list[float]:
    """Train ``model``'s trainable parameters on one fixed batch of 8 with AdamW; the loss after every step."""
    import torch.nn.functional as F

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread avoids the OpenMP/MKL hand-offs that dominate on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_tiny_vit():
    return tiny_vit


def spawn_two_ranks(worker, *args, start_method: str = "spawn") -> None:
    """Run ``worker(rank, 2, port, *args)`` on 2 processes over a fresh port and wait for both.

    A rank killed by a native abort before its first module forward (seen once in ~40 DeepSpeed runs on gloo:
    "terminate called without an active exception" seconds after start) is a start-up crash: it is retried once on a
    new port, with a warning in pytest's summary. A native crash after a rank's first forward, a Python exception or
    a wrong result is never retried."""
    import tempfile
    import warnings

    import torch.multiprocessing as mp

    for attempt in (1, 2):
        with tempfile.TemporaryDirectory(prefix="ranks-") as progress:
            try:
                mp.start_processes(_run_with_progress, args=(2, free_port(), progress, worker, *args), nprocs=2,
                                   join=True, start_method=start_method)
                return
            except mp.ProcessExitedException as e:
                native = e.signal_name in ("SIGABRT", "SIGSEGV")
                started = (Path(progress) / f"rank{e.error_index}.forward").exists()
                if attempt == 2 or not native or started:
                    if native and started:
                        e.args = (f"{e.args[0]} after its first forward: a crash in training, not retried",)
                    raise
                warnings.warn(f"rank {e.error_index} died with {e.signal_name} before its first forward (a start-up "
                              "crash); retried once on a fresh port")


def _run_with_progress(rank: int, world: int, port: int, progress: str, worker, *args) -> None:
    """A spawned rank that notes its first module forward in ``progress`` before running ``worker``; a native crash
    prints the Python stack of every thread (faulthandler) to the test's captured stderr."""
    import faulthandler

    faulthandler.enable(all_threads=True)
    marker = Path(progress) / f"rank{rank}.forward"

    def note_first_forward(module, inputs):
        marker.touch()
        handle.remove()

    handle = torch.nn.modules.module.register_module_forward_pre_hook(note_first_forward)
    worker(rank, world, port, *args)
    # The worker returned and wrote its results: leave without interpreter finalization, whose garbage collection
    # can destroy a gloo process group while its worker thread is still joinable (std::terminate, SIGABRT after
    # the work; seen in about 1 of 4 FSDP2 runs on torch 2.15, gdb: ProcessGroupGloo::runLoop alive in
    # Py_FinalizeEx). A crash during the work itself still fails the test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def stop_before_step(trainer, step: int, exception: type[BaseException] = KeyboardInterrupt) -> None:
    """Make ``trainer`` raise ``exception`` when it reaches ``step``: a crash right after the step before it."""
    original = trainer.train_step

    def train_step(current, stream):
        if current == step:
            raise exception
        return original(current, stream)

    trainer.train_step = train_step


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_measuring_cpu(cmd: list[str], **kwargs) -> tuple["subprocess.CompletedProcess", float]:
    """``subprocess.run(cmd)`` and the CPU seconds (user + system) the child and its descendants used: the cost of a
    command, which, unlike its wall time, does not grow when other tests share the cores."""
    import resource
    import subprocess

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(cmd, **kwargs)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return result, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


SLOW_FIRST = ("slurm", "slow", "distributed")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks added here
def pytest_collection_modifyitems(config, items):
    """The long tests first (SLURM jobs, then end-to-end runs, then multi-process ones), so that under several xdist
    workers the last minutes are not one long test with the other workers idle; a stable sort keeps the files' order
    within each kind. The SLURM tests share one cluster (a module fixture), so under ``--dist loadgroup`` they all
    go to one worker."""
    def kind(item) -> int:
        return next((i for i, mark in enumerate(SLOW_FIRST) if item.get_closest_marker(mark)), len(SLOW_FIRST))

    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
    items.sort(key=kind)
