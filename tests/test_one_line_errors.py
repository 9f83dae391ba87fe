"""Bad input gets one clear line: through the real CLI in a subprocess, each mistake a new user makes exits with
status 2 and prints exactly one line on stderr that names the config key or the file at fault, and it loses
nothing: no run directory, no stray temporary, no half-written output, the inputs untouched."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PYTHON
from launcher.env import DistEnv
from peft_dist.config import load_config
from peft_dist.data.shards import write_shards
from peft_dist.train.trainer import train

pytestmark = pytest.mark.slow  # every case starts the CLI (a few seconds each)

TINY_MODEL = ["model.name=vit_tiny_patch16_224", "data.img_size=32",
              "model.kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2}"]
QUIET = ["train.progress=false", "tracking.enabled=false"]
SYNTHETIC_RUN = [*TINY_MODEL, *QUIET, "data.source=synthetic", "data.synthetic_samples=8", "data.batch_size=4",
                 "data.eval_batch_size=4", "model.num_classes=10", "train.steps=1"]
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def peft_dist(*args, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m peft_dist.cli ARGS`` in ``cwd``, started as a user would: no launcher's variables around it."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM_")}
    return subprocess.run([PYTHON, "-m", "peft_dist.cli", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def one_line(result: subprocess.CompletedProcess, *names: str) -> str:
    """The single stderr line of a refused command, which must name every one of ``names``."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("peft-dist: error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (hidden ones included) with its bytes; directories map to None."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def write_image_folder(root: Path, per_class: int = 4, truncate: str | None = None) -> Path:
    """Two class folders of 32x32 JPEGs; ``truncate`` (e.g. ``b/img3.jpg``) is cut to half its bytes."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / cls / f"img{j}.jpg")
    if truncate:
        broken = root / truncate
        broken.write_bytes(broken.read_bytes()[:broken.stat().st_size // 2])
    return root


# The inputs are made in this process (the CLI's start-up is what makes these tests slow); only the refused
# commands run as subprocesses.
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 1-step LoRA run of the tiny ViT on synthetic data (10 classes), as `peft-dist train` leaves it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(load_config(None, [*SYNTHETIC_RUN, f"train.out_dir={run}"]), DistEnv(), torch.device("cpu"))
    return run


@pytest.fixture(scope="module")
def two_class_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two-classes")
    write_shards(f"folder:{write_image_folder(root / 'images')}", root / "shards")
    return root / "shards"


# ----------------------------------------------------------------------------------------------- config values
def test_betas_of_one(tmp_path):
    one_line(peft_dist("train", *SYNTHETIC_RUN, "optim.betas=[1.0, 0.999]", f"train.out_dir={tmp_path / 'run'}",
                       cwd=tmp_path), "optim.betas[0]", "< 1.0")
    assert snapshot(tmp_path) == {}


def test_binary_config_file(tmp_path):
    config = tmp_path / "weights.yaml"
    config.write_bytes(bytes(range(256)) * 4)
    one_line(peft_dist("train", "--config", config, cwd=tmp_path), str(config), "not a YAML text file")
    assert list(snapshot(tmp_path)) == ["weights.yaml"]


def test_yaml_syntax_error_is_one_line_with_its_position(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  name: [vit_tiny_patch16_224\n")
    one_line(peft_dist("train", "--config", config, cwd=tmp_path), str(config), "not valid YAML", "line 3")


def test_ddp_without_a_launcher(tmp_path):
    one_line(peft_dist("train", *SYNTHETIC_RUN, "dist.engine=ddp", f"train.out_dir={tmp_path / 'run'}",
                       cwd=tmp_path), "dist.engine=ddp", "torchrun", "srun", "dist.engine=single")
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize("name, says", [("resnet18", "builds a ResNet with no ViT blocks"),
                                        ("vit_nonexistent", "unknown timm model 'vit_nonexistent'")])
def test_model_name_that_is_not_a_supported_vit(tmp_path, name, says):
    one_line(peft_dist("train", *SYNTHETIC_RUN, f"model.name={name}", f"train.out_dir={tmp_path / 'run'}",
                       cwd=tmp_path), "model.name", says, "allowed: a timm ViT")
    assert snapshot(tmp_path) == {}


def test_typo_in_model_kwargs(tmp_path):
    line = one_line(peft_dist("train", *SYNTHETIC_RUN, "model.kwargs={img_sze: 32}", f"train.out_dir={tmp_path}/run",
                              cwd=tmp_path), "model.kwargs", "unknown key 'img_sze'")
    assert "img_size" in line.partition("allowed keys")[2]  # what was meant is among the keys offered
    assert snapshot(tmp_path) == {}


def test_image_size_the_model_does_not_take(tmp_path):
    one_line(peft_dist("train", *SYNTHETIC_RUN, "data.img_size=64", f"train.out_dir={tmp_path / 'run'}",
                       cwd=tmp_path), "data.img_size: got 64", "model.kwargs.img_size=32", "set data.img_size=32")
    assert snapshot(tmp_path) == {}


# ----------------------------------------------------------------------------------------------- paths
def test_out_dir_that_is_a_file(tmp_path):
    taken = tmp_path / "run"
    taken.write_text("notes\n")
    one_line(peft_dist("train", *SYNTHETIC_RUN, f"train.out_dir={taken}", cwd=tmp_path), "train.out_dir", str(taken))
    assert snapshot(tmp_path) == {"run": b"notes\n"}


def test_shards_out_that_is_a_file(tmp_path):
    write_image_folder(tmp_path / "images", per_class=1)
    taken = tmp_path / "shards"
    taken.write_text("notes\n")
    before = snapshot(tmp_path)
    one_line(peft_dist("shards", "--source", f"folder:{tmp_path / 'images'}", "--out", taken, cwd=tmp_path),
             "--out", str(taken), "is a file")
    assert snapshot(tmp_path) == before


def test_truncated_adapter_at_eval(tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    adapter = run / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:adapter.stat().st_size // 2])
    before = snapshot(tmp_path)
    one_line(peft_dist("eval", "--run", run, cwd=tmp_path), f"cannot read adapter file {adapter}")
    assert snapshot(tmp_path) == before


def test_export_to_an_existing_directory(tmp_path, finished_run):
    (tmp_path / "exported").mkdir()
    run_before = snapshot(finished_run)
    one_line(peft_dist("export", "--run", finished_run, "--out", tmp_path / "exported", cwd=tmp_path),
             "export --out", f"{tmp_path / 'exported'} is a directory")
    assert snapshot(tmp_path) == {"exported": None}  # no stray .exported.tmp beside it
    assert snapshot(finished_run) == run_before


# ----------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def shards_with_a_truncated_jpeg(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corrupt")
    write_shards(f"folder:{write_image_folder(root / 'images', truncate='b/img3.jpg')}", root / "shards",
                 shard_size=4)
    return root / "shards"


def train_on(shards: Path, out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return peft_dist("train", *TINY_MODEL, *QUIET, "data.source=shards", f"data.path={shards}", "data.eval_split=train",
                     "model.num_classes=2", "data.batch_size=4", "data.eval_batch_size=4", "train.steps=2",
                     f"train.out_dir={out_dir}", *extra, cwd=out_dir.parent)


def test_corrupt_image_is_the_same_line_with_and_without_loader_workers(tmp_path, shards_with_a_truncated_jpeg):
    lines = [one_line(train_on(shards_with_a_truncated_jpeg, tmp_path / f"workers{n}", f"data.num_workers={n}"),
                      "corrupt sample '000007_b_img3'", f"shard {shards_with_a_truncated_jpeg}/train-000001.tar",
                      "data.skip_corrupt=true")
             for n in (0, 1)]
    assert lines[0] == lines[1]


def test_corrupt_image_with_a_loader_worker_is_skipped_and_counted_when_asked(tmp_path, shards_with_a_truncated_jpeg):
    result = train_on(shards_with_a_truncated_jpeg, tmp_path / "run", "data.num_workers=1", "data.skip_corrupt=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_samples"] == 1


def test_eval_on_shards_of_another_class_count(tmp_path, finished_run, two_class_shards):
    one_line(peft_dist("eval", "--run", finished_run, "data.source=shards", f"data.path={two_class_shards}",
                       "data.eval_split=train", cwd=tmp_path),
             f"data.path: {two_class_shards} holds 2 classes", "model.num_classes=10")


# ----------------------------------------------------------------------------------------------- methods
@pytest.fixture
def snell_config(tmp_path) -> Path:
    config = tmp_path / "snell.yaml"
    config.write_text("method:\n  name: snell\n  rank: 8\n  sparsity: 0.9\n")
    return config


def test_switching_method_name_drops_the_file_options_the_new_method_does_not_take(tmp_path, snell_config):
    result = peft_dist("train", "--config", snell_config, *SYNTHETIC_RUN, "method.name=lora", "method.alpha=4",
                       f"train.out_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dropped the config file's snell options sparsity, which lora does not take" in result.stderr
    import yaml

    method = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["method"]
    assert method == {"name": "lora", "rank": 8, "alpha": 4}


def test_switching_method_name_still_validates_command_line_options(tmp_path, snell_config):
    one_line(peft_dist("train", "--config", snell_config, *SYNTHETIC_RUN, "method.name=lora", "method.sparsity=0.5",
                       f"train.out_dir={tmp_path / 'run'}", cwd=tmp_path), "method.sparsity: unknown key")
    assert not (tmp_path / "run").exists()
