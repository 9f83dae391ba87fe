"""Baseline methods through the real trainer/engine: the loss falls on a fixed batch, frozen tensors do not move,
the optimizer holds state only for trainable tensors; LoRA merges exactly and exports to plain timm."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import peft_dist
from conftest import TINY_VIT, tiny_vit
from launcher.env import DistEnv
from peft_dist.config import load_config
from peft_dist.methods.base import MergeError
from peft_dist.train.evaluate import export_merged
from peft_dist.train.trainer import Trainer

BASELINES = ["full", "linear", "bitfit", "lora", "adapter"]


def tiny_cfg(tmp_path, method, *extra):
    kw = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()) + "}"
    return load_config(None, [
        "model.name=vit_tiny_patch16_224", "model.num_classes=5", f"model.kwargs={kw}", "data.source=synthetic",
        f"method.name={method}", f"train.out_dir={tmp_path / method}", "train.progress=false",
        "tracking.enabled=false", "optim.lr=3e-3", "optim.weight_decay=0.01", *extra])


def fixed_batches(n=2, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (n * bs,), generator=g)
    # a learnable signal: each class shifts a different patch of the image
    x = torch.randn(n * bs, 3, 32, 32, generator=g)
    for i, label in enumerate(y.tolist()):
        x[i, :, 8 * (label % 4):8 * (label % 4) + 8, 8 * (label // 4):8 * (label // 4) + 8] += 2.0
    return [(x[i * bs:(i + 1) * bs], y[i * bs:(i + 1) * bs]) for i in range(n)]


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_trains_and_freezes(tmp_path, method):
    batches = fixed_batches(n=1)
    cfg = tiny_cfg(tmp_path, method, "train.steps=30", "train.log_every=1", "optim.lr=1e-2")
    trainer = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches)
    model = trainer.model
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    summary = trainer.fit()

    losses = [json.loads(line)["loss"] for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.75 * losses[0], losses
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"frozen tensor {n} changed"
            assert p.grad is None
    params_with_state = {id(p) for p in trainer.engine.optimizer.state}
    names_with_state = {n for n, p in model.named_parameters() if id(p) in params_with_state}
    assert names_with_state == trainable
    saved = load_file(str(tmp_path / method / "adapter.safetensors"))
    assert set(saved) == trainable
    counts = peft_dist.count_trainable(model)
    assert summary["trainable_params"] == counts["trainable_params"] == sum(v.numel() for v in saved.values())
    head = 5 * TINY_VIT["embed_dim"] + 5
    assert counts["trainable_params_without_head"] == counts["trainable_params"] - head


def test_trainable_counts_match_published_formulas():
    """ViT-B/16 (D=768, 12 blocks): LoRA-8 on q,v = 12·2·8·(768+768) = 294,912 (spec §4.1: 0.29 M);
    Adapter-8 = 12·(768·8+8 + 8·768+768) = 156,768 (0.16 M); BitFit counts every bias."""
    with torch.device("meta"):
        expect = {"lora": 294_912, "adapter": 156_768, "linear": 0}
        for method, n in expect.items():
            m = peft_dist.create_backbone("vit_base_patch16_224", num_classes=100)
            peft_dist.apply_method(m, method)
            c = peft_dist.count_trainable(m)
            assert c["trainable_params_without_head"] == n, method
            assert c["trainable_params"] == n + 768 * 100 + 100
        m = peft_dist.create_backbone("vit_base_patch16_224", num_classes=100)
        peft_dist.apply_method(m, "bitfit")
        biases = sum(p.numel() for name, p in m.named_parameters() if name.endswith(".bias") and "head" not in name)
        assert peft_dist.count_trainable(m)["trainable_params_without_head"] == biases


def test_weight_decay_groups():
    m = tiny_vit()
    method = peft_dist.apply_method(m, "full")
    groups = method.param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert {"cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= no_decay
    assert "blocks.0.attn.qkv.weight" in decay and "head.weight" in decay
    assert not no_decay & decay


@pytest.mark.parametrize("targets", [["q", "v"], ["q", "k", "v", "proj", "fc1", "fc2"]])
def test_lora_merge_is_exact(targets):
    model = tiny_vit()
    peft_dist.apply_method(model, "lora", rank=4, alpha=8, targets=targets)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    adapted = model(x)
    plain = peft_dist.merge(model)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    assert all(type(m).__module__.startswith(("timm", "torch")) for m in plain.modules())
    torch.testing.assert_close(plain(x), adapted, rtol=0, atol=1e-5)


def test_lora_slices_are_independent_of_each_other():
    """q and v updates live in their own rows of the fused qkv; k rows are untouched by a q/v LoRA."""
    model = tiny_vit()
    peft_dist.apply_method(model, "lora", rank=2, targets=["q", "v"])
    qkv = model.blocks[0].attn.qkv
    with torch.no_grad():
        qkv.lora_B["q"].fill_(1.0)
        qkv.lora_B["v"].fill_(-1.0)
    dw = qkv.delta_weight()
    d = TINY_VIT["embed_dim"]
    assert torch.count_nonzero(dw[d:2 * d]) == 0
    assert torch.count_nonzero(dw[:d]) > 0 and torch.count_nonzero(dw[2 * d:]) > 0


def test_export_loads_into_bare_timm(tmp_path):
    batches = fixed_batches()
    cfg = tiny_cfg(tmp_path, "lora", "train.steps=3", "method.targets=[q, v, fc1]")
    trainer = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches)
    trainer.fit()
    x = batches[0][0]
    adapted = trainer.model.eval()(x)
    out = export_merged(tmp_path / "lora")
    create = json.loads(out.with_suffix(".json").read_text())
    bare = timm.create_model(create.pop("model_name"), pretrained=False, **create)
    bare.load_state_dict(load_file(str(out)))
    torch.testing.assert_close(bare.eval()(x), adapted, rtol=0, atol=1e-5)


def test_adapter_cannot_merge():
    model = tiny_vit()
    peft_dist.apply_method(model, "adapter")
    with pytest.raises(MergeError, match="MlpWithAdapter cannot be merged"):
        peft_dist.merge(model)


def test_add_to_rows_equals_in_place_slice_updates_in_value_and_gradient():
    """The out-of-place row update (gaps kept, slices in any order) against the in-place reference in fp64."""
    from peft_dist.methods.base import add_to_rows

    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, 3, 10, dtype=torch.float64, generator=g, requires_grad=True)
    deltas = [(slice(6, 9), torch.randn(2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)),
              (slice(1, 4), torch.randn(2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True))]
    weight = torch.randn(2, 3, 10, dtype=torch.float64, generator=g)
    got = add_to_rows(out, deltas)
    expected = out.clone()
    for rows, delta in deltas:
        expected[..., rows] += delta
    assert torch.equal(got, expected)
    grads = torch.autograd.grad((got * weight).sum(), [out, *(d for _, d in deltas)])
    reference = torch.autograd.grad((expected * weight).sum(), [out, *(d for _, d in deltas)])
    assert all(torch.equal(a, b) for a, b in zip(grads, reference))
    with pytest.raises(ValueError, match="row slices overlap at 2"):
        add_to_rows(out, [(slice(0, 3), deltas[0][1]), (slice(2, 5), deltas[1][1])])
