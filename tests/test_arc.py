"""ARC / ARC_att (spec spt_arc_hta.md §2): exact parameter counts, the trainable set, init, the adapter maths in
fp64, the exact merge into qkv/fc1, optimizer groups, training, options and recipes."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import peft_dist
from conftest import REPO, adamw_losses, tiny_vit
from peft_dist.config import ConfigError, load_config
from peft_dist.methods.arc import ARCLinear
from peft_dist.methods.base import count_trainable


def meta_model(name="vit_base_patch16_224"):
    with torch.device("meta"):
        return timm.create_model(name, num_classes=10)


@pytest.mark.parametrize("method, expected", [("arc", 96_432), ("arc_att", 48_216)])
def test_vit_b_counts_equal_the_spec_formula(method, expected):
    model = meta_model()
    peft_dist.apply_method(model, method)
    # ARC: 2·768·50 + 12·2·(50+768); ARC_att: 768·50 + 12·(50+768) (spec §2.1)
    assert count_trainable(model)["trainable_params_without_head"] == expected


def test_vit_l_count_equals_the_spec_formula():
    model = meta_model("vit_large_patch16_224")
    peft_dist.apply_method(model, "arc")
    assert count_trainable(model)["trainable_params_without_head"] == 2 * 1024 * 50 + 24 * 2 * (50 + 1024)


@pytest.mark.parametrize("method", ["arc", "arc_att"])
def test_exactly_the_arc_parameters_train(method):
    model = tiny_vit()
    peft_dist.apply_method(model, method)
    sides = ["attn.qkv"] + (["mlp.fc1"] if method == "arc" else [])
    expected = {"arc_projections.attn", "head.weight", "head.bias"}
    expected |= {"arc_projections.mlp"} if method == "arc" else set()
    expected |= {f"blocks.{b}.{s}.{p}" for b in range(2) for s in sides for p in ("scale", "adapter_bias")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    # one shared P per side, not one per block
    assert model.blocks[0].attn.qkv.projection is model.blocks[1].attn.qkv.projection


def test_official_init_and_zero_option():
    model = tiny_vit()
    peft_dist.apply_method(model, "arc", rank=6)
    p_bound = math.sqrt(6 / (48 + 6))
    assert model.arc_projections.attn.abs().max() <= p_bound and model.arc_projections.attn.std() > p_bound / 4
    qkv, fc1 = model.blocks[0].attn.qkv, model.blocks[0].mlp.fc1
    assert torch.count_nonzero(qkv.scale) == 0  # attention side starts as the identity
    c_bound = math.sqrt(6 / (1 + 6))  # Xavier-uniform on a 1×r tensor
    assert 0 < fc1.scale.abs().max() <= c_bound
    assert torch.count_nonzero(qkv.adapter_bias) == 0 and torch.count_nonzero(model.head.weight) == 0

    reference = tiny_vit()
    exact = tiny_vit()
    peft_dist.apply_method(exact, "arc", mlp_scale_init="zeros", zero_head=False)
    assert torch.count_nonzero(exact.blocks[1].mlp.fc1.scale) == 0
    exact.eval(), reference.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exact(x), reference(x))  # the identity start is exact


def test_adapter_maths_in_fp64():
    model = tiny_vit().double()
    peft_dist.apply_method(model, "arc", rank=5, dropout=0.0)
    fc1 = model.blocks[1].mlp.fc1
    with torch.no_grad():
        fc1.adapter_bias.normal_()
    z = torch.randn(2, 7, 48, dtype=torch.float64)
    p, c = model.arc_projections.mlp, fc1.scale
    expected = F.linear(z + z @ p @ torch.diag(c) @ p.t() + fc1.adapter_bias, fc1.base.weight, fc1.base.bias)
    torch.testing.assert_close(fc1(z), expected)
    # the re-composed matrix is symmetric with rank ≤ r
    a = fc1.recomposed() - torch.eye(48, dtype=torch.float64)
    torch.testing.assert_close(a, a.t())
    assert torch.linalg.matrix_rank(a) <= 5


def test_reduced_precision_form_is_the_same_function_and_gradients_in_fp64():
    """bf16/fp16 compute takes base(Z) + W·δZ (the delta beside the frozen GEMM, kept fp32) instead of
    base(Z + δZ): in fp64 both give the same output and the same gradients for P, c, b and the input."""
    model = tiny_vit().double()
    peft_dist.apply_method(model, "arc", rank=5, dropout=0.0)
    fc1 = model.blocks[1].mlp.fc1
    with torch.no_grad():
        fc1.adapter_bias.normal_()
        fc1.scale.normal_()
    z = torch.randn(2, 7, 48, dtype=torch.float64, requires_grad=True)
    tensors = [model.arc_projections.mlp, fc1.scale, fc1.adapter_bias, z]
    results = []
    for forward in (fc1.forward, fc1._forward_reduced_precision):
        out = forward(z)
        results.append((out, torch.autograd.grad((out * out.detach().sin()).sum(), tensors)))
    (official, official_grads), (reduced, reduced_grads) = results
    torch.testing.assert_close(reduced, official, rtol=1e-12, atol=1e-12)
    for got, want in zip(reduced_grads, official_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)



@pytest.mark.parametrize("method", ["arc", "arc_att"])
def test_merge_folds_into_qkv_and_fc1(method):
    model = tiny_vit()
    plain_keys = set(model.state_dict())
    peft_dist.apply_method(model, method)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        adapted = model(x)
        merged = peft_dist.merge(model)
        assert not hasattr(merged, "arc_projections") and set(merged.state_dict()) == plain_keys
        assert not any(isinstance(m, ARCLinear) for m in merged.modules())
        torch.testing.assert_close(merged(x), adapted, rtol=0, atol=1e-5)


def test_weight_decay_groups():
    model = tiny_vit()
    method = peft_dist.apply_method(model, "arc")
    groups = method.param_groups(model, 0.01)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.01  # official: every tensor decays
    assert sum(p.numel() for p in groups[0]["params"]) == count_trainable(model)["trainable_params"]
    model = tiny_vit()
    method = peft_dist.apply_method(model, "arc", decay_vectors=False)
    decayed = {id(p) for g in method.param_groups(model, 0.01) if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model.arc_projections.attn), id(model.arc_projections.mlp), id(model.head.weight)}


@pytest.mark.parametrize("method", ["arc", "arc_att"])
def test_loss_falls_with_adamw(method):
    model = tiny_vit(seed=2)
    peft_dist.apply_method(model, method)
    losses = adamw_losses(model, weight_decay=0.0)
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0], losses  # adapter dropout makes single steps noisy


def test_bad_options_name_the_key():
    for options, key in [({"rank": 0}, "method.rank"), ({"dropout": 1.5}, "method.dropout"),
                         ({"mlp_scale_init": "ones"}, "method.mlp_scale_init"), ({"ranks": 4}, "method.ranks")]:
        with pytest.raises(ConfigError, match=key):
            peft_dist.apply_method(tiny_vit(), "arc", **options)


@pytest.mark.parametrize("recipe, method, lr, wd", [("vtab", "arc", 0.01, 0.0), ("fgvc", "arc_att", 0.005, 0.01)])
def test_recipes_load(tmp_path, recipe, method, lr, wd):
    cfg = load_config([REPO / "configs" / "backbones" / "vit_b16.yaml", REPO / "configs" / "recipes" / "arc" /
                       f"{recipe}.yaml"], [f"data.path={tmp_path}"])
    assert cfg.method.name == method and cfg.optim.lr == lr and cfg.optim.weight_decay == wd
    assert cfg.optim.grad_clip == 1.0 and cfg.optim.warmup_epochs == 10 and cfg.train.epochs == 100
    for name in ("arc", "arc_att"):
        assert load_config(REPO / "configs" / "methods" / f"{name}.yaml", ["data.source=synthetic"]).method.name == name
