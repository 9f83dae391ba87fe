"""The declared version range is the one the code runs on: locked sets inside pyproject's range, the installed torch
equal to its locked set, SLURM templates passing only torchrun flags this torch has, private APIs failing in one
line."""
import re
import shlex
import subprocess
import sys
from importlib.metadata import version

import pytest
import torch

from conftest import REPO
from peft_dist import compat


def locked(minor: str) -> dict[str, str]:
    lines = (REPO / "constraints" / f"torch-{minor}.txt").read_text().splitlines()
    from packaging.utils import canonicalize_name

    pins = (line.split("==", 1) for line in lines if line and not line.startswith("#"))
    return {canonicalize_name(name): pinned for name, pinned in pins}


@pytest.mark.parametrize("minor", ["2.14", "2.15"])
def test_each_locked_set_lies_inside_the_declared_range(minor):
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = locked(minor)
    assert pins["torch"].startswith(minor + ".")
    for req in requirements:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not locked for torch {minor}"
        assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} outside {req}"
    assert compat.torch_is_supported(pins["torch"])


def test_the_installed_environment_is_a_locked_set():
    """What `make env` installed is exactly the tested set of its torch minor (the lock took effect over any
    machine-wide pip constraint)."""
    minor = "{}.{}".format(*compat.torch_minor())
    pins = locked(minor)
    for name in ("torch", "torchvision", "timm", "deepspeed", "webdataset", "mlflow", "safetensors"):
        assert version(name) == pins[name], name


def test_supported_range_matches_the_locked_minors():
    minors = sorted(p.stem.removeprefix("torch-") for p in (REPO / "constraints").glob("torch-*.txt"))
    assert minors == ["{}.{}".format(*m) for m in compat.SUPPORTED_TORCH]
    assert not compat.torch_is_supported("2.13.0") and not compat.torch_is_supported("2.16.0+cu130")


@pytest.mark.parametrize("template", sorted((REPO / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_slurm_templates_pass_only_torchrun_flags_this_torch_has(template):
    from torch.distributed.run import get_args_parser

    known = {s for action in get_args_parser()._actions for s in action.option_strings}
    text = template.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if "torch.distributed.run" not in line or line.lstrip().startswith("#"):
            continue
        words = shlex.split(line.split("torch.distributed.run", 1)[1].split(" -m ", 1)[0], comments=True)
        flags = [w.split("=", 1)[0] for w in words if w.startswith("--")]
        assert flags, line
        assert not set(flags) - known, f"{template.name}: torch {torch.__version__} lacks {set(flags) - known}"


def test_a_missing_private_api_is_one_line_naming_feature_and_range():
    with pytest.raises(compat.UnsupportedVersionError) as e:
        compat.private_attr("torch.distributed._tools.mem_tracker", "NoSuchTracker", "the memory estimator")
    message = str(e.value)
    assert "\n" not in message
    assert re.search(r"the memory estimator needs torch\.distributed\._tools\.mem_tracker\.NoSuchTracker.*"
                     r"\(torch 2\.1[45]\.\d.*supported: torch 2\.14–2\.15", message), message


def test_every_private_api_the_code_uses_exists_in_this_torch():
    from peft_dist.memory.estimator import _tracker_classes

    assert len(_tracker_classes()) == 2
    assert compat.fake_store() is not None
    assert compat.private_attr("webdataset.tariterators", "tar_file_expander", "reading tar shards")
    if torch.cuda.is_available():
        compat.private_attr("torch._C", "_cuda_attach_out_of_memory_observer", "memory.snapshot_on_oom")


def test_environment_check_names_the_wrong_minor():
    other = "2.14" if compat.torch_minor() == (2, 15) else "2.15"
    r = subprocess.run([sys.executable, "-m", "peft_dist.compat", "--check", other], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and f"wanted torch {other}" in r.stderr, r.stderr
    mine = "{}.{}".format(*compat.torch_minor())
    r = subprocess.run([sys.executable, "-m", "peft_dist.compat", "--check", mine], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("environment ready: torch " + mine), r.stdout + r.stderr
