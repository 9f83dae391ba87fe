"""The torch range peft-dist supports, and every private or version-dependent API it uses, looked up in one place.

Private APIs (``torch.distributed._tools``, ``torch.testing._internal``'s FakeStore, ``torch._C`` hooks, webdataset's
tar iterators) can move in any release: each is imported through ``private_attr``, so a torch outside the tested
range fails with one line naming the feature, the missing name and the supported range instead of an ImportError
deep inside a trace. Features that are new within the range are detected (``fsdp2.supports_dtype_override``), not
assumed.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

SUPPORTED_TORCH = ((2, 14), (2, 15))
"""Oldest and newest torch minor the suite runs on (CI tests both ends; constraints/ holds the locked sets)."""


class UnsupportedVersionError(RuntimeError):
    """A dependency lacks an API that a feature of peft-dist needs."""


def supported_range() -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED_TORCH
    return f"torch {lo_major}.{lo_minor}–{hi_major}.{hi_minor}"


def torch_minor(version: str | None = None) -> tuple[int, int]:
    if version is None:
        import torch

        version = torch.__version__
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def torch_is_supported(version: str | None = None) -> bool:
    return SUPPORTED_TORCH[0] <= torch_minor(version) <= SUPPORTED_TORCH[1]


def private_attr(module: str, name: str, feature: str, supported: str | None = None) -> Any:
    """``module.name``, or one clear error saying which feature needs it, the installed version of the package it
    belongs to and the versions that have it (default: the supported torch range)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        from importlib.metadata import PackageNotFoundError, version

        package = module.split(".")[0]
        try:
            installed = version(package)
        except PackageNotFoundError:
            installed = "not installed"
        raise UnsupportedVersionError(
            f"{feature} needs {module}.{name}, which this installation lacks ({package} {installed}); "
            f"supported: {supported or supported_range()} (see the README's 'Supported versions')") from None


def fake_store():
    """A store for the ``fake`` process group that the dry run and the memory estimator trace under."""
    return private_attr("torch.testing._internal.distributed.fake_pg", "FakeStore", "a fake process group")()


def attach_cuda_oom_observer(callback: Callable[..., Any]) -> None:
    """Call ``callback(device, alloc, device_alloc, device_free)`` when the CUDA caching allocator runs out."""
    private_attr("torch._C", "_cuda_attach_out_of_memory_observer", "memory.snapshot_on_oom")(callback)


def fake_tensor_api(name: str) -> Any:
    """``FakeTensorMode`` and the exceptions of data-dependent reads, from ``torch._subclasses.fake_tensor``."""
    return private_attr("torch._subclasses.fake_tensor", name, "the memory estimator")


def record_cuda_memory_history(**kwargs: Any) -> None:
    """Start (``max_entries=N``) or stop (``enabled=None``) the CUDA allocator's history for snapshots."""
    private_attr("torch.cuda.memory", "_record_memory_history", "memory.snapshot_steps")(**kwargs)


def dump_cuda_snapshot(path: str) -> None:
    private_attr("torch.cuda.memory", "_dump_snapshot", "memory snapshots")(path)

def main(argv: list[str] | None = None) -> int:
    """``python -m peft_dist.compat --check 2.15``: the environment holds that torch minor, inside the supported
    range, and every dependency imports; one line either way (the Makefile runs it after installing)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m peft_dist.compat")
    parser.add_argument("--check", metavar="MINOR", help="the torch minor this environment must hold, e.g. 2.15")
    args = parser.parse_args(argv)
    import deepspeed
    import mlflow
    import timm
    import torch
    import torchvision
    import webdataset

    versions = (f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
                f"deepspeed {deepspeed.__version__}, webdataset {webdataset.__version__}, mlflow {mlflow.__version__}")
    wanted = tuple(int(x) for x in args.check.split(".")) if args.check else None
    if not torch_is_supported() or (wanted is not None and torch_minor() != wanted):
        print(f"environment NOT ready: {versions}; wanted torch {args.check or supported_range()} "
              f"(supported: {supported_range()})", file=sys.stderr)
        return 1
    print(f"environment ready: {versions}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
