"""Adapters travel: ``peft-dist export --format peft`` loads with Hugging Face ``peft`` onto the same timm backbone
and gives our logits; other methods are told which formats they have; ``peft-dist eval`` works on a run directory
copied to another place, its backbone found beside it or named in one line."""
import json
import os
import shutil
import subprocess

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import PYTHON, REPO, TINY_VIT
from launcher.env import DistEnv
from peft_dist.cli import main
from peft_dist.config import load_config
from peft_dist.train.evaluate import restore_run
from peft_dist.train.trainer import Trainer

peft = pytest.importorskip("peft", reason="peft is a test dependency (the dev extra)")

MODEL_NAME = "vit_tiny_patch16_224"
PRETRAINED_CLASSES = 10
TASK_CLASSES = 5


def pretrained_backbone(path):
    """A 'pre-trained' backbone file with a 10-class head, as a user's checkpoint would have (the run re-sizes it)."""
    torch.manual_seed(123)
    model = timm.create_model(MODEL_NAME, pretrained=False, num_classes=PRETRAINED_CLASSES, **TINY_VIT)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def batches(n=2, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n * bs, 3, 32, 32, generator=g), torch.randint(0, TASK_CLASSES, (n * bs,), generator=g)
    return [(x[i * bs:(i + 1) * bs], y[i * bs:(i + 1) * bs]) for i in range(n)]


def finished_run(tmp_path, method, checkpoint, *options):
    """A real run directory: the trainer's config.yaml and adapter.safetensors after a few AdamW steps."""
    kw = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()) + "}"
    out = tmp_path / method
    cfg = load_config(None, [
        f"model.name={MODEL_NAME}", f"model.num_classes={TASK_CLASSES}", f"model.kwargs={kw}",
        f"model.checkpoint={checkpoint}", "data.source=synthetic", f"method.name={method}", *options,
        f"train.out_dir={out}", "train.steps=4", "train.progress=false", "tracking.enabled=false", "optim.lr=2e-2"])
    data = batches()
    Trainer(cfg, DistEnv(), torch.device("cpu"), data, data).fit()
    return out


def user_backbone(checkpoint):
    """What a peft user does: the timm model with the task's class count and the pre-trained weights (the head is
    the adapter's to bring)."""
    model = timm.create_model(MODEL_NAME, pretrained=False, num_classes=TASK_CLASSES, **TINY_VIT)
    weights = {k: v for k, v in load_file(str(checkpoint)).items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected
    return model.eval()


@pytest.mark.parametrize("targets,rank,alpha", [(["q", "v"], 4, 8.0), (["q", "k", "v", "proj", "fc1", "fc2"], 2, 3.0)],
                         ids=["q,v", "all six"])
def test_peft_loads_our_lora_and_gives_our_logits(tmp_path, targets, rank, alpha):
    checkpoint = pretrained_backbone(tmp_path / "backbone.safetensors")
    run = finished_run(tmp_path, "lora", checkpoint, f"method.targets={json.dumps(targets)}",
                       f"method.rank={rank}", f"method.alpha={alpha}")
    assert main(["export", "--run", str(run), "--format", "peft"]) == 0
    out = run / "peft"
    config = json.loads((out / "adapter_config.json").read_text())
    qkv_slices = len([t for t in targets if t in ("q", "k", "v")])
    assert config["r"] == rank and config["lora_alpha"] == alpha and config["modules_to_save"] == ["head"]
    assert config["rank_pattern"] == ({"attn.qkv": qkv_slices * rank} if qkv_slices > 1 else {})

    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    _, ours, _ = restore_run(run)
    with torch.no_grad():
        expected = ours.eval()(x)
    loaded = peft.PeftModel.from_pretrained(user_backbone(checkpoint), str(out)).eval()
    with torch.no_grad():
        got = loaded(x)
        with loaded.disable_adapter():
            without_lora = loaded(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the adapters matter: the same model without them is far from our logits
    assert (without_lora - expected).abs().max() > 1e-2

    # what peft holds is exactly what we wrote: every key, every value (nothing dropped as unexpected or missing)
    held = peft.get_peft_model_state_dict(loaded)
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(held) == sorted(written)
    for key, tensor in written.items():
        torch.testing.assert_close(held[key], tensor, rtol=0, atol=0)
    qkv = loaded.base_model.model.blocks[0].attn.qkv
    assert qkv.r["default"] == qkv_slices * rank and qkv.scaling["default"] == alpha / rank
    if "proj" in targets:
        proj = loaded.base_model.model.blocks[0].attn.proj
        assert proj.r["default"] == rank and proj.scaling["default"] == alpha / rank


def test_merged_format_is_still_the_plain_timm_export(tmp_path):
    checkpoint = pretrained_backbone(tmp_path / "backbone.safetensors")
    run = finished_run(tmp_path, "lora", checkpoint, "method.targets=[q, v, fc1]")
    assert main(["export", "--run", str(run), "--format", "merged"]) == 0
    create = json.loads((run / "model.json").read_text())
    bare = timm.create_model(create.pop("model_name"), pretrained=False, **create)
    bare.load_state_dict(load_file(str(run / "model.safetensors")))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _, ours, _ = restore_run(run)
    with torch.no_grad():
        torch.testing.assert_close(bare.eval()(x), ours.eval()(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,message", [
    ("bitfit", "run {run} trained bitfit, which exports with --format merged (peft: lora only)"),
    ("adapter", "run {run} trained adapter, which has no export format"),
])
def test_a_format_the_method_has_not_is_one_line_naming_its_formats(tmp_path, capsys, method, message):
    checkpoint = pretrained_backbone(tmp_path / "backbone.safetensors")
    run = finished_run(tmp_path, method, checkpoint)
    assert main(["export", "--run", str(run), "--format", "peft"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("peft-dist: error: export --format peft: ")
    assert message.format(run=run) in err
    assert not (run / "peft").exists()


def peft_dist_cli(*args, cwd):
    return subprocess.run([PYTHON, "-m", "peft_dist.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_eval_of_a_run_copied_elsewhere(tmp_path):
    """A real 2-epoch run on digits shards, trained by the CLI; its directory, backbone and shards copied to another
    folder and the originals deleted: eval finds them beside the run and gives the run's own top-1."""
    from peft_dist.data.shards import write_shards

    here = tmp_path / "machine-a"
    here.mkdir()
    checkpoint = pretrained_backbone(here / "backbone.safetensors")
    write_shards("digits", here / "digits", shard_size=512, seed=0)
    kw = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()) + "}"
    trained = peft_dist_cli(
        "train", f"model.name={MODEL_NAME}", "model.num_classes=10", f"model.kwargs={kw}",
        f"model.checkpoint={checkpoint}", "data.path=digits", "data.img_size=32", "data.num_workers=0",
        "data.batch_size=64", "method.name=lora", "dist.engine=single", "train.out_dir=runs/lora", "train.epochs=2",
        "train.progress=false", "tracking.enabled=false", cwd=here)
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((here / "runs" / "lora" / "summary.json").read_text())

    there = tmp_path / "machine-b"
    there.mkdir()
    shutil.copytree(here / "runs" / "lora", there / "lora")
    shutil.copy(checkpoint, there / "backbone.safetensors")
    shutil.copytree(here / "digits", there / "digits")
    shutil.rmtree(here)
    elsewhere = tmp_path / "somewhere-else"
    elsewhere.mkdir()
    evaluated = peft_dist_cli("eval", "--run", str(there / "lora"), cwd=elsewhere)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["top1"] == summary["top1"] and result["samples"] == 360

    (there / "backbone.safetensors").rename(there / "kept-aside.safetensors")
    missing = peft_dist_cli("eval", "--run", str(there / "lora"), cwd=elsewhere)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert missing.stderr.startswith("peft-dist: error: model.checkpoint: the backbone of run ")
    assert "backbone.safetensors" in missing.stderr and "model.checkpoint=PATH" in missing.stderr
    named = peft_dist_cli("eval", "--run", str(there / "lora"), f"model.checkpoint={there / 'kept-aside.safetensors'}",
                          cwd=elsewhere)
    assert named.returncode == 0, named.stderr[-3000:]
    assert json.loads(named.stdout.strip().splitlines()[-1])["top1"] == summary["top1"]
