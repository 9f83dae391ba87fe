"""Backbones from local weights: .npz (JAX layout), .pth, .safetensors; head re-sized; clear errors."""
import pytest
import torch
from safetensors.torch import save_file

import peft_dist
from conftest import TINY_VIT, tiny_vit
from npz_format import vit_to_jax_npz
from peft_dist.models.backbone import CheckpointError


def _same_backbone(a, b, skip_head=True):
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if skip_head and k.startswith("head."):
            continue
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors", ".npz"])
def test_load_each_format_and_resize_head(tmp_path, suffix):
    src = tiny_vit(num_classes=21, seed=1)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(src.state_dict(), str(path))
    elif suffix == ".npz":
        vit_to_jax_npz(src, path)
    else:
        torch.save({"model": src.state_dict()}, path)
    same_head = peft_dist.create_backbone("vit_tiny_patch16_224", 21, checkpoint=path, **TINY_VIT)
    _same_backbone(src, same_head, skip_head=False)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(src.eval()(x), same_head.eval()(x), rtol=1e-5, atol=1e-5)
    task = peft_dist.create_backbone("vit_tiny_patch16_224", 7, checkpoint=path, **TINY_VIT)
    assert task.head.weight.shape == (7, TINY_VIT["embed_dim"])
    _same_backbone(src, task)


def test_pos_embed_resized_for_another_input_size(tmp_path):
    src = tiny_vit()
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    bigger = peft_dist.create_backbone("vit_tiny_patch16_224", 5, checkpoint=path, **{**TINY_VIT, "img_size": 48})
    assert bigger.pos_embed.shape[1] == 1 + 36


def test_missing_checkpoint_names_path(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {tmp_path}/absent.pth"):
        peft_dist.create_backbone("vit_tiny_patch16_224", 5, checkpoint=tmp_path / "absent.pth", **TINY_VIT)


def test_wrong_shape_names_tensors(tmp_path):
    sd = tiny_vit().state_dict()
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(10, 48)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as e:
        peft_dist.create_backbone("vit_tiny_patch16_224", 5, checkpoint=path, **TINY_VIT)
    assert "blocks.0.mlp.fc1.weight: checkpoint (10, 48) vs model (192, 48)" in str(e.value)
    assert str(path) in str(e.value)


def test_other_architecture_names_missing_tensors(tmp_path):
    sd = tiny_vit(depth=1).state_dict()
    path = tmp_path / "shallow.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"missing \d+ tensors \(e.g. blocks\.1\."):
        peft_dist.create_backbone("vit_tiny_patch16_224", 5, checkpoint=path, **TINY_VIT)


class Evil:
    """Any non-tensor object: weights_only loading must refuse to unpickle it."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*evil.pth"):
        peft_dist.create_backbone("vit_tiny_patch16_224", 5, checkpoint=path, **TINY_VIT)


def test_unknown_suffix_and_model_name(tmp_path):
    p = tmp_path / "w.ckpt"
    p.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported file type '.ckpt'"):
        peft_dist.create_backbone("vit_tiny_patch16_224", 5, checkpoint=p, **TINY_VIT)
    with pytest.raises(CheckpointError, match="unknown timm model 'vit_nonexistent'"):
        peft_dist.create_backbone("vit_nonexistent", 5)


def test_large_backbones_build_on_meta_device():
    expected = {"vit_base_patch16_224": 85_798_656, "vit_large_patch16_224": 303_301_632,
                "vit_huge_patch14_224": 630_764_800}
    with torch.device("meta"):
        for name, frozen in expected.items():
            m = peft_dist.create_backbone(name, num_classes=100)
            peft_dist.apply_method(m, "lora", rank=8)
            counts = peft_dist.count_trainable(m)
            assert counts["frozen_params"] == frozen, name
