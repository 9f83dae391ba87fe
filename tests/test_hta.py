"""HTA (spec spt_arc_hta.md §3): 5·D parameters per square matrix, orthogonal reflectors, the O(N·D) branch against
the dense formula in fp64 (also non-square), no D×D tensor while training, exact merge, training, options."""
from __future__ import annotations

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import peft_dist
from conftest import REPO, adamw_losses, tiny_vit
from peft_dist.config import ConfigError, load_config
from peft_dist.methods.base import count_trainable
from peft_dist.methods.hta import HTALinear, reflect, reflector_matrix


def test_vit_b_count_is_5d_per_square_matrix():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", num_classes=10)
    peft_dist.apply_method(model, "hta")
    qkv = model.blocks[0].attn.qkv
    for name in ("q", "k", "v"):
        per_slice = sum(getattr(qkv, part)[name].numel() for part in ("v_left", "v_right", "diag", "down", "up"))
        assert per_slice == 5 * 768
    # q, k, v, proj in 12 blocks: 12·4·5·768 = 184,320 (spec §3.2, the paper's 0.22 M minus the VTAB head)
    assert count_trainable(model)["trainable_params_without_head"] == 12 * 4 * 5 * 768


def test_non_square_generalisation_count():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", num_classes=10)
    peft_dist.apply_method(model, "hta", targets=["q", "v", "fc1", "fc2"])
    fc = 768 + 3072 + 768 + 768 + 3072  # v_l (d_in) + v_r (d_out) + min(d_in, d_out) + rank-1 term
    assert count_trainable(model)["trainable_params_without_head"] == 12 * (2 * 5 * 768 + 2 * fc)  # 0.295 M, §3.2


def test_reflectors_orthogonal_only_when_normalised():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(32, generator=g, dtype=torch.float64)
    eye = torch.eye(32, dtype=torch.float64)
    h = reflector_matrix(v)
    torch.testing.assert_close(h @ h.t(), eye)
    torch.testing.assert_close(h @ v, -v)  # it reflects v itself
    literal = reflector_matrix(v, normalized=False)
    assert (literal @ literal.t() - eye).abs().max() > 1e-2  # Eq. 3 as printed is not orthogonal …
    v2 = v / v.norm() * 2 ** 0.5
    literal2 = reflector_matrix(v2, normalized=False)
    torch.testing.assert_close(literal2 @ literal2.t(), eye)  # … unless ‖v‖² = 2
    x = torch.randn(5, 32, generator=g, dtype=torch.float64)
    torch.testing.assert_close(reflect(x, v), x @ h)
    torch.testing.assert_close(reflect(x, v, normalized=False), x @ literal)


def randomised(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("base."):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return layer


@pytest.mark.parametrize("reflector", ["normalized", "literal"])
@pytest.mark.parametrize("d_out, d_in", [(12, 12), (20, 12), (12, 20)])
def test_branch_equals_dense_formula_in_fp64(reflector, d_out, d_in):
    base = torch.nn.Linear(d_in, d_out, dtype=torch.float64)
    layer = randomised(HTALinear(base, {"all": slice(0, d_out)}, rank=2, reflector=reflector))
    x = torch.randn(3, 4, d_in, dtype=torch.float64)
    normalized = reflector == "normalized"
    h_l = reflector_matrix(layer.v_left["all"].detach(), normalized)
    h_r = reflector_matrix(layer.v_right["all"].detach(), normalized)
    sigma = torch.zeros(d_in, d_out, dtype=torch.float64)
    m = min(d_in, d_out)
    sigma[range(m), range(m)] = layer.diag["all"].detach()
    # Y = X (W + W_down W_up + H_l Σ H_r) + b in the paper's layout (Eq. 6)
    w_paper = base.weight.detach().t() + layer.down["all"].detach() @ layer.up["all"].detach() + h_l @ sigma @ h_r
    torch.testing.assert_close(layer(x), x @ w_paper + base.bias.detach())
    # merging goes through lora.merged_linear, which adds in fp32 even for fp64 layers: fp32-level agreement
    torch.testing.assert_close(layer.merged()(x), layer(x), rtol=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda inp: layer(inp), (x[:1, :2].clone().requires_grad_(True),))


def test_no_dxd_tensor_while_training():
    d = 64
    base = torch.nn.Linear(d, 3 * d)
    base.requires_grad_(False)
    layer = randomised(HTALinear(base, {"q": slice(0, d), "k": slice(d, 2 * d), "v": slice(2 * d, 3 * d)}, rank=1),
                       seed=1)
    layer.base.weight.requires_grad_(False)

    class Shapes(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:  # newly allocated results only (views of the frozen W are no cost)
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    self.largest = max(self.largest, t.numel())
            return out

    x = torch.randn(2, 5, d, requires_grad=True)
    with Shapes() as probe:
        layer(x).square().sum().backward()
    # tokens·3D = 1,920 numbers at most; any D×D (4,096) intermediate would show up here
    assert probe.largest < d * d
    with Shapes() as probe:
        layer.merged()
    assert probe.largest >= d * d  # the probe does see D×D tensors where they exist (merging)


def test_identity_at_init_and_exact_merge_on_a_vit():
    model = tiny_vit()
    reference = tiny_vit()
    plain_keys = set(model.state_dict())
    peft_dist.apply_method(model, "hta")
    model.eval(), reference.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))  # d = 0, W_up = 0: the pretrained function
    for module in model.modules():
        if isinstance(module, HTALinear):
            randomised(module, seed=4)
    with torch.no_grad():
        adapted = model(x)
        merged = peft_dist.merge(model)
        assert set(merged.state_dict()) == plain_keys
        torch.testing.assert_close(merged(x), adapted, rtol=0, atol=1e-5)


def test_loss_falls_with_adamw():
    model = tiny_vit(seed=2)
    peft_dist.apply_method(model, "hta", dropout=0.1, diag_init_std=1e-3)
    losses = adamw_losses(model, weight_decay=0.01)
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0], losses
    assert model.blocks[0].attn.qkv.v_left["q"].grad.abs().sum() > 0  # the reflectors train once d moves


def test_bad_options_name_the_key():
    for options, key in [({"targets": ["qkv"]}, "method.targets"), ({"targets": []}, "method.targets"),
                         ({"rank": -1}, "method.rank"), ({"reflector": "cayley"}, "method.reflector"),
                         ({"dropout": 2.0}, "method.dropout")]:
        with pytest.raises(ConfigError, match=key):
            peft_dist.apply_method(tiny_vit(), "hta", **options)


@pytest.mark.parametrize("recipe, augment", [("vtab", "none"), ("fgvc", "flip")])
def test_recipes_load(tmp_path, recipe, augment):
    cfg = load_config([REPO / "configs" / "backbones" / "vit_b16.yaml",
                       REPO / "configs" / "recipes" / "hta" / f"{recipe}.yaml"], [f"data.path={tmp_path}"])
    assert cfg.method.name == "hta" and cfg.method.options["targets"] == ["q", "k", "v", "proj"]
    assert cfg.data.augment == augment and cfg.train.epochs == 100 and cfg.optim.warmup_epochs == 10
    assert load_config(REPO / "configs" / "methods" / "hta.yaml", ["data.source=synthetic"]).method.name == "hta"
