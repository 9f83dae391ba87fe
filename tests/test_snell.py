"""The ``snell`` method on timm ViTs (spec snell_snella.md §1, §3, §7.3 E, §7.6 items 4 and 6): placement and trainable
set, the fused-qkv wrapper vs three separate modules, the faithful regularisers, merged vs faithful vs the official
reference path, merge and sparse-delta export round trips, option errors, recipes vs the spec's tables, and a short
training run through the hooks in the trainer's order."""
import copy
import glob
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import peft_dist
from conftest import REPO, tiny_vit
from peft_dist.config import ConfigError, load_config
from peft_dist.methods.base import AdaptedModule, TrainPlan
from peft_dist.methods.functional.kernelized import KernelConfig, reference_delta_weight
from peft_dist.methods.snell import (
    KernelFactors,
    SnellLinear,
    apply_sparse_delta,
    export_sparse_delta,
)

F64 = torch.float64
SIX = ["q", "k", "v", "proj", "fc1", "fc2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def images(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def train_steps(model, method, steps, steps_per_epoch, lr=3e-3):
    """A plain AdamW loop calling the Method hooks in the trainer's order (on_train_start, on_epoch_start before the
    epoch's first forward, on_step_end after optimizer.step() and before zero_grad)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (16,), generator=g)
    x = torch.randn(16, 3, 32, 32, generator=g)
    for i, label in enumerate(y.tolist()):  # a learnable signal: each class brightens its own patch
        x[i, :, 8 * (label % 4):8 * (label % 4) + 8, 8 * (label // 4):8 * (label // 4) + 8] += 2.0
    opt = torch.optim.AdamW(method.param_groups(model, 0.01), lr=lr)
    method.on_train_start(model, TrainPlan(steps, steps_per_epoch, -(-steps // steps_per_epoch)))
    losses = []
    model.train()
    for step in range(steps):
        if step % steps_per_epoch == 0:
            method.on_epoch_start(model, step // steps_per_epoch)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        method.on_step_end(model, step)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------------------- placement
def test_placement_trainable_set_and_weight_decay_groups():
    model = tiny_vit()
    method = peft_dist.apply_method(model, "snell", rank=4, sparsity=0.5)
    for block in model.blocks:
        qkv = block.attn.qkv
        assert isinstance(qkv, SnellLinear) and list(qkv.kernels) == ["q", "k", "v"]
        assert qkv.rows == {"q": (0, 48), "k": (48, 96), "v": (96, 144)}
        for path in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            assert isinstance(block.get_submodule(path), SnellLinear)
        # adapter Dropout on q/k/v (one module, one sample for the three), fc1, fc2; none on proj (§1.1)
        assert isinstance(qkv.dropout, nn.Dropout) and qkv.dropout.p == 0.1
        assert isinstance(block.attn.proj.dropout, nn.Identity)
        assert block.mlp.fc1.dropout.p == 0.1 and block.mlp.fc2.dropout.p == 0.1
        assert qkv.drop_path == 0.1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    factors = {n for n in trainable if n.endswith((".A", ".B"))}
    assert trainable == factors | {"head.weight", "head.bias", "cls_token"}
    assert len(factors) == 2 * 6 * len(model.blocks)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "pos_embed" in frozen and "patch_embed.proj.weight" in frozen and "blocks.0.norm1.weight" in frozen
    assert "blocks.0.attn.qkv.base.bias" in frozen
    groups = method.param_groups(model, 0.05)
    decayed = {id(p) for gr in groups if gr["weight_decay"] > 0 for p in gr["params"]}
    assert id(model.cls_token) not in decayed and id(model.head.bias) not in decayed  # §5.1
    assert id(model.head.weight) in decayed and id(model.blocks[0].attn.qkv.kernels["q"].A) in decayed


def _adapted_widths(model) -> tuple[int, int]:
    """(Σ(d_in + d_out), number of matrices) over q, k, v, proj, fc1, fc2 of every block, read from the unadapted
    backbone's own Linear shapes (q, k and v are three d × d slices of the fused qkv)."""
    total = matrices = 0
    for block in model.blocks:
        qkv = block.attn.qkv
        total += 3 * (qkv.in_features + qkv.out_features // 3)
        for linear in (block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            total += linear.in_features + linear.out_features
        matrices += 6
    return total, matrices


@pytest.mark.parametrize("backbone, widths, table", [
    # spec §2.4's table: Σ(d_in + d_out) and the trainable parameters in millions at r = 8 / 16 / 32
    ("vit_base_patch16_224", 165_888, {8: 1.33, 16: 2.65, 32: 5.31}),
    ("vit_large_patch16_224", 442_368, {8: 3.54}),
    ("vit_huge_patch14_224", 737_280, {8: 5.90}),
])
def test_parameter_counts_match_the_spec_table(backbone, widths, table):
    """Σ r·(d_in + d_out) over every adapted matrix (§2.4), counted from the adapted model's trainable tensors
    against the backbone's own layer shapes and the spec's rounded figures; SNELLA adds 3 scalars per matrix."""
    with torch.device("meta"):
        plain = peft_dist.create_backbone(backbone, num_classes=100)
        reference, matrices = _adapted_widths(plain)
        assert (reference, matrices) == (widths, 6 * len(plain.blocks))
        for rank, millions in table.items():
            for name, extra in (("snell", 0), ("snella", 3 * matrices)):
                model = peft_dist.create_backbone(backbone, num_classes=100)
                peft_dist.apply_method(model, name, rank=rank)
                adapters = peft_dist.count_trainable(model)["trainable_params_without_head"] - model.cls_token.numel()
                assert adapters == rank * reference + extra, (backbone, name, rank)
            assert round(rank * reference / 1e6, 2) == millions, (backbone, rank)


def test_initialisation_is_kaiming_uniform_and_the_delta_starts_nonzero():
    model = tiny_vit()
    peft_dist.apply_method(model, "snell", rank=8, sparsity=0.0)
    k = model.blocks[0].mlp.fc1.kernels["fc1"]  # d_in 48, d_out 192, q = 4
    assert k.A.abs().max() <= 1 / math.sqrt(48 * 4) and k.B.abs().max() <= 1 / math.sqrt(192 * 4)
    assert k.A.abs().max() > 0.8 / math.sqrt(48 * 4)
    assert torch.count_nonzero(model.blocks[0].mlp.fc1.delta_weight()) == 48 * 192  # B is not zeroed (§2.3)


def test_sparsity_map_and_buffer_dtype():
    model = tiny_vit()
    peft_dist.apply_method(model, "snell", rank=4, sparsity={"default": 0.7, "fc2": 0.2, "blocks.1.fc2": 0.4,
                                                                "blocks.0.q": 0.0})
    s = {k.matrix_name: k.sparsity_value() for k in model.modules() if isinstance(k, KernelFactors)}
    assert s["blocks.0.q"] == 0.0 and s["blocks.0.k"] == 0.7 and s["blocks.0.fc2"] == 0.2 and s["blocks.1.fc2"] == 0.4
    model.to(torch.bfloat16)  # s keeps its exact float64 value: its keep count is ⌊(1 − s)N⌋
    k = model.blocks[0].attn.qkv.kernels["k"]
    assert k.sparsity.dtype == F64 and k.sparsity_value() == 0.7
    k.load_state_dict({**k.state_dict(), "sparsity": torch.tensor(0.35, dtype=F64)})
    assert k.sparsity_value() == 0.35  # a loaded state is picked up by the next forward
    with torch.device("meta"):  # meta init + to_empty(): s survives instead of being left uninitialised
        meta = peft_dist.create_backbone("vit_tiny_patch16_224", num_classes=5, img_size=32, patch_size=8, depth=1,
                                         embed_dim=48, num_heads=3)
        peft_dist.apply_method(meta, "snell", rank=4, sparsity=0.25)
    meta.to_empty(device="cpu")
    assert {k.sparsity_value() for k in meta.modules() if isinstance(k, KernelFactors)} == {0.25}


# ---------------------------------------------------------------------------------------------- module behaviour
def _snell_linear(base, slices, seed, mode="faithful", dropout=0.0, drop_path=0.0, sparsity=0.5, dtype=F64):
    torch.manual_seed(seed)
    kernels = {name: KernelFactors(base.in_features, rows.stop - rows.start, 4, "piecewise", sparsity, name,
                                   dtype=dtype) for name, rows in slices.items()}
    return SnellLinear(base, slices, kernels, KernelConfig(), mode, dropout, drop_path)


@pytest.mark.parametrize("mode", ["faithful", "merged"])
def test_fused_qkv_wrapper_equals_three_separate_modules(mode):
    D = 12
    torch.manual_seed(0)
    qkv = nn.Linear(D, 3 * D, dtype=F64)
    fused = _snell_linear(qkv, {"q": slice(0, D), "k": slice(D, 2 * D), "v": slice(2 * D, 3 * D)}, 1, mode)
    separate = []
    for i, name in enumerate("qkv"):
        base = nn.Linear(D, D, dtype=F64)
        with torch.no_grad():
            base.weight.copy_(qkv.weight[i * D:(i + 1) * D])
            base.bias.copy_(qkv.bias[i * D:(i + 1) * D])
        one = _snell_linear(base, {name: slice(0, D)}, 2, mode)
        one.kernels[name].load_state_dict(fused.kernels[name].state_dict())
        separate.append(one)
    fused.eval()
    x = torch.randn(2, 5, D, dtype=F64, requires_grad=True)
    y = fused(x)
    y_sep = torch.cat([m.eval()(x) for m in separate], -1)
    torch.testing.assert_close(y, y_sep, rtol=1e-12, atol=1e-12)
    G = torch.randn_like(y)
    params = [t for k in fused.kernels.values() for t in (k.A, k.B)]
    params_sep = [t for m in separate for k in m.kernels.values() for t in (k.A, k.B)]
    got = torch.autograd.grad(y, [x, *params], G)
    want = torch.autograd.grad(y_sep, [x, *params_sep], G)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_faithful_dropout_is_shared_by_qkv_and_drop_path_is_per_slice():
    D = 8
    torch.manual_seed(0)
    qkv = nn.Linear(D, 3 * D, dtype=F64)
    slices = {"q": slice(0, D), "k": slice(D, 2 * D), "v": slice(2 * D, 3 * D)}
    m = _snell_linear(qkv, slices, 1, dropout=0.5, sparsity=0.0).train()
    seen = []
    m.dropout.register_forward_hook(lambda mod, inp, out: seen.append(out))
    x = torch.randn(4, 3, D, dtype=F64)
    y = m(x)
    assert len(seen) == 1 and not torch.equal(seen[0], x)
    torch.testing.assert_close(y, qkv(x) + seen[0] @ m.delta_weight().t())  # every slice read the same x_d

    m = _snell_linear(qkv, slices, 1, drop_path=0.5, sparsity=0.0).train()
    x = torch.randn(32, 3, D, dtype=F64)
    full = x @ m.delta_weight().t()
    delta = m(x) - qkv(x)
    keep = {}
    for name, rows in slices.items():
        ratio = delta[..., rows] / full[..., rows]  # per sample: 0 (dropped) or 1/(1 − p) = 2 (kept)
        per_sample = ratio.reshape(32, -1)
        assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample))
        assert set(per_sample[:, 0].round(decimals=6).tolist()) == {0.0, 2.0}
        keep[name] = per_sample[:, 0] > 0
    assert not torch.equal(keep["q"], keep["k"]) and not torch.equal(keep["k"], keep["v"])  # independent masks
    m.eval()
    torch.testing.assert_close(m(x) - qkv(x), full)  # identities in eval


def test_merged_faithful_and_reference_paths_agree():
    """Eval logits: merged (one GEMM) = faithful (parallel branch) = the official-style reference; training
    gradients: fused = reference (adapter regularisers off, fp64)."""
    outs, grads = {}, {}
    for label, opts in (("merged", dict(mode="merged")), ("faithful", dict(adapter_dropout=0.0,
                                                                            adapter_drop_path=0.0)),
                        ("reference", dict(implementation="reference", adapter_dropout=0.0,
                                           adapter_drop_path=0.0))):
        model = tiny_vit().double()
        peft_dist.apply_method(model, "snell", rank=4, sparsity=0.6, **opts)
        model.eval()
        x = images(2).double()
        outs[label] = model(x)
        model.train()
        model(x).square().sum().backward()
        grads[label] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(outs["faithful"], outs["merged"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outs["reference"], outs["merged"], rtol=1e-10, atol=1e-10)
    for name, g in grads["reference"].items():
        torch.testing.assert_close(grads["merged"][name], g, rtol=1e-8, atol=1e-10, msg=name)
        torch.testing.assert_close(grads["faithful"][name], g, rtol=1e-8, atol=1e-10, msg=name)


# ---------------------------------------------------------------------------------------------- merge and export
@pytest.mark.parametrize("mode", ["faithful", "merged"])
def test_merge_round_trip_within_1e5(mode):
    model = tiny_vit()
    peft_dist.apply_method(model, "snell", rank=4, sparsity=0.7, mode=mode)
    with torch.no_grad():  # move away from the init so the delta is not negligible
        for k in model.modules():
            if isinstance(k, KernelFactors):
                k.A.mul_(20)
                k.B.mul_(20)
    model.eval()
    x = images(4)
    before = model(x)
    plain = peft_dist.merge(copy.deepcopy(model))
    assert not any(isinstance(m, AdaptedModule) for m in plain.modules())
    assert isinstance(plain.blocks[0].attn.qkv, nn.Linear)
    torch.testing.assert_close(plain(x), before, rtol=0, atol=1e-5)
    assert (plain(x) - tiny_vit()(x)).abs().max() > 1e-3  # the delta is really in there
    # every merged weight is W0 + ΔW, ΔW from the official expression (cdist + torch.quantile) in fp64, slice by
    # slice of the fused qkv; fp32 storage of the sum bounds the error by a few ulps of |W0 + ΔW| ≲ 1
    merged_layers = 0
    for name, module in model.named_modules():
        if not isinstance(module, SnellLinear):
            continue
        merged_weight = plain.get_submodule(name).weight.double()
        expected = module.base.weight.detach().double().clone()
        for matrix, (start, stop) in module.rows.items():
            k = module.kernels[matrix]
            expected[start:stop] += reference_delta_weight(k.A.detach().double(), k.B.detach().double(),
                                                           k.sparsity_value())
        torch.testing.assert_close(merged_weight, expected, rtol=0, atol=1e-6, msg=name)
        merged_layers += 1
    assert merged_layers == 4 * len(model.blocks)  # qkv, proj, fc1, fc2


def test_sparse_delta_export_apply_and_remove():
    model = tiny_vit()
    peft_dist.apply_method(model, "snell", rank=4, sparsity=0.8)
    tensors = export_sparse_delta(model)
    qkv_values = tensors["blocks.0.attn.qkv.weight.delta_values"]
    assert tensors["blocks.0.attn.qkv.weight.delta_indices"].dtype == torch.int32
    assert abs(qkv_values.numel() - 3 * math.floor(0.2 * 48 * 48)) <= 3  # density 1 − s per slice
    merged = peft_dist.merge(copy.deepcopy(model))
    plain = tiny_vit()
    originals = {n: p.detach().clone() for n, p in plain.named_parameters()}
    apply_sparse_delta(plain, tensors)
    for name, p in merged.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[name], p, rtol=0, atol=0, msg=name)
    apply_sparse_delta(plain, tensors, scale=-1.0)
    for name, p in plain.named_parameters():
        torch.testing.assert_close(p, originals[name], rtol=0, atol=1e-6, msg=name)
    # bad inputs name what is wrong
    with pytest.raises(KeyError, match="delta_indices is missing"):
        apply_sparse_delta(plain, {"blocks.0.attn.qkv.weight.delta_values": qkv_values})
    wrong = dict(tensors)
    wrong["blocks.0.attn.qkv.weight.delta_shape"] = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight has shape"):
        apply_sparse_delta(plain, wrong)
    with pytest.raises(KeyError, match="no module"):
        apply_sparse_delta(plain, {k.replace("blocks.0", "blocks.9"): v for k, v in tensors.items()})
    with pytest.raises(ValueError, match="no SNELL/SNELLA layers"):
        export_sparse_delta(tiny_vit())


# ---------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("method,options,key", [
    ("snell", {"rank": 3}, "method.rank"),
    ("snell", {"sparsity": 1.5}, "method.sparsity"),
    ("snell", {"sparsity": {"fc3": 0.5}}, "method.sparsity.fc3"),
    ("snell", {"sparsity": {"q": -0.1}}, "method.sparsity.q"),
    ("snell", {"kernel": "rbf"}, "method.kernel"),
    ("snell", {"threshold": "soft"}, "method.threshold"),
    ("snell", {"mode": "merged", "adapter_dropout": 0.1}, "method.adapter_dropout"),
    ("snell", {"mode": "merged", "implementation": "reference"}, "method.implementation"),
    ("snell", {"adapter_drop_path": 1.0}, "method.adapter_drop_path"),
    ("snell", {"targets": ["q", "qkv"]}, "method.targets"),
    ("snell", {"colour": "red"}, "method.colour"),
    ("snella", {"target_ratio": 1.5}, "method.target_ratio"),
    ("snella", {"beta1": 1.0}, "method.beta1"),
    ("snella", {"mask_interval": 0}, "method.mask_interval"),
    ("snella", {"dense": True, "kernel": "piecewise"}, "method.dense"),
])
def test_bad_options_name_the_key(method, options, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        peft_dist.apply_method(tiny_vit(), method, **options)


def test_sparsity_map_naming_a_missing_block_fails_at_injection():
    with pytest.raises(ConfigError, match=r"method\.sparsity\.blocks\.7\.fc1: block 7 does not exist"):
        peft_dist.apply_method(tiny_vit(), "snell", sparsity={"blocks.7.fc1": 0.5})


def test_merged_mode_defaults_to_no_regularisers():
    model = tiny_vit()
    peft_dist.apply_method(model, "snell", mode="merged")
    assert all(isinstance(m.dropout, nn.Identity) and m.drop_path == 0 for m in model.modules()
               if isinstance(m, SnellLinear))


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("mode", ["faithful", "merged"])
def test_tiny_vit_trains_and_the_summary_reports_sparsity(mode, tmp_path):
    model = tiny_vit()
    method = peft_dist.apply_method(model, "snell", rank=4, sparsity={"default": 0.5, "fc1": 0.9}, mode=mode)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train_steps(model, method, steps=25, steps_per_epoch=5, lr=1e-2)
    assert losses[-1] < 0.7 * losses[0], losses
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    summary = method.summary(model)
    json.dumps(summary)
    assert len(summary["matrices"]) == 12
    for name, entry in summary["matrices"].items():
        target = 0.9 if name.endswith("fc1") else 0.5
        assert entry["target_sparsity"] == target
        assert abs(entry["sparsity"] - target) <= 1.5 / entry["entries"], (name, entry)
    files = method.write_artifacts(model, tmp_path)
    rows = (tmp_path / "snell_sparsity.csv").read_text().splitlines()
    assert rows[0].startswith("matrix,block,kind") and len(rows) == 13
    assert (tmp_path / "snell_sparsity.png").read_bytes()[:4] == b"\x89PNG" and len(files) == 2


# ---------------------------------------------------------------------------------------------- recipes
def _recipe(path, *extra):
    return load_config([REPO / "configs/backbones/vit_b16.yaml", REPO / path], list(extra))


def test_every_recipe_loads_and_validates():
    files = sorted(glob.glob(str(REPO / "configs/recipes/snell/**/*.yaml"), recursive=True))
    assert len(files) == 19 + 3 * 5 + 5 + 9  # SNELL-32 VTAB, SNELL-8/16/32 FGVC, SNELLA-32 FGVC and VTAB
    for f in files:
        cfg = _recipe(Path(f).relative_to(REPO))
        assert cfg.model.name == "vit_base_patch16_224" and cfg.optim.warmup_epochs == 10
    for f in ("configs/methods/snell.yaml", "configs/methods/snella.yaml"):
        assert _recipe(f, "data.path=x").method.name in ("snell", "snella")


@pytest.mark.parametrize("path,expect", [
    ("snell32/vtab/dtd.yaml", dict(bs=64, lr=1e-3, wd=1e-2, epochs=200, classes=47, s=0.995, rank=32)),
    ("snell32/vtab/camelyon.yaml", dict(bs=16, lr=7e-4, wd=5e-2, epochs=100, classes=2, s=0.15, rank=32)),
    ("snell32/vtab/dmlab.yaml", dict(bs=8, lr=1e-3, wd=1e-4, epochs=100, classes=6, s=0.0, rank=32)),
    ("snell8/fgvc/flowers.yaml", dict(bs=32, lr=1e-3, wd=1e-2, epochs=100, classes=102, s=0.6, rank=8)),
    ("snell32/fgvc/flowers.yaml", dict(bs=32, lr=1e-3, wd=1e-2, epochs=100, classes=102, s=0.8, rank=32)),
    ("snell16/fgvc/dogs.yaml", dict(bs=32, lr=3e-4, wd=1e-3, epochs=100, classes=120, s=0.1, rank=16)),
    ("snell32/fgvc/dogs.yaml", dict(bs=32, lr=3e-4, wd=5e-3, epochs=100, classes=120, s=0.1, rank=32)),
    ("snella32/vtab/cifar.yaml", dict(bs=8, lr=1e-3, wd=5e-2, epochs=100, classes=100, rho=0.8, s_init=0.01,
                                      precision="fp16")),  # its script passes --amp
    ("snella32/fgvc/nabirds.yaml", dict(bs=32, lr=1e-3, wd=5e-4, epochs=100, classes=555, rho=0.16, s_init=0.0)),
    ("snella32/fgvc/dogs.yaml", dict(bs=32, lr=1e-4, wd=5e-3, epochs=100, classes=120, rho=0.24, s_init=0.0)),
    ("snella32/fgvc/cars.yaml", dict(bs=16, lr=1e-3, wd=5e-2, epochs=100, classes=196, dense=True)),
    ("snella32/vtab/svhn.yaml", dict(bs=16, lr=1e-3, wd=1e-4, epochs=100, classes=10, dense=True)),
])
def test_recipes_match_the_spec_tables(path, expect):
    cfg = _recipe(f"configs/recipes/snell/{path}")
    o = cfg.method.options
    assert (cfg.data.batch_size, cfg.optim.lr, cfg.optim.weight_decay, cfg.train.epochs, cfg.model.num_classes) == \
        (expect["bs"], expect["lr"], expect["wd"], expect["epochs"], expect["classes"])
    assert cfg.optim.warmup_start_lr == 1e-6 and cfg.optim.min_lr == 1e-5
    assert cfg.train.precision == expect.get("precision", "fp32")
    assert cfg.data.augment == ("none" if "/vtab/" in path else "flip")
    if "s" in expect:
        assert cfg.method.name == "snell" and o["sparsity"] == expect["s"] and o["rank"] == expect["rank"]
    elif expect.get("dense"):
        assert cfg.method.name == "snella" and o["dense"] is True
    else:
        assert (o["target_ratio"], o["init_sparsity"], o["beta1"], o["beta2"]) == \
            (expect["rho"], expect["s_init"], 0.85, 0.85)


# ---------------------------------------------------------------------------------------------- benchmark
QUICK_BACKBONE = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4)
"""benchmarks/snell_step.py --quick: this ViT, batch 4 of 32-pixel images, 100 classes, one timed round."""


def _static_and_trainable_bytes(method: str, **options) -> tuple[int, int]:
    """(parameter + buffer bytes, trainable bytes) of a quick-mode variant, counted from the real tensors."""
    model = peft_dist.create_backbone("vit_base_patch16_224", num_classes=100, **QUICK_BACKBONE)
    peft_dist.apply_method(model, method, **options)
    static = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return static, trainable


def test_benchmark_quick_reports_consistent_ratios_and_peaks():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks/snell_step.py"), "--quick"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["config"] == {"model": "vit_base_patch16_224", "batch": 4, "precision": "fp32", "device": "cpu",
                                "threads": 1, "reps": 1, "sparsity": 0.9, "quick": True}
    assert not any(key.startswith("merged_") for key in result)  # the bf16-only comparisons are absent in fp32
    times, peaks, phases = result["step_s_median"], result["peak_bytes"], result["phase_s_median"]
    timed = {"lora8", "plainlora8", "branchlora8", "snell32", "snell32dense", "reference32"}
    assert set(times) == set(phases) == timed
    assert set(peaks) == {"lora8", "plainlora8", "snell8", "lora32", "snell32", "reference32", "branchlora8",
                          "snell32dense"}
    assert all(t > 0 for t in times.values())
    # a step is its three phases, each timed separately (the clock readings are shared, so they add up)
    for name in timed:
        assert set(phases[name]) == {"forward", "backward", "optimizer"}
        assert sum(phases[name].values()) == pytest.approx(times[name], rel=1e-9), name
    # one round: each step ratio is the ratio of the two reported step times, so the three ratios close a triangle
    for key, (num, den) in {"snell_over_lora_step": ("snell32", "lora8"),
                            "fused_speedup_vs_reference": ("reference32", "snell32"),
                            "reference_over_lora_step": ("reference32", "lora8"),
                            "survivor_over_dense_step": ("snell32", "snell32dense"),
                            "lora_over_plain_lora_step": ("lora8", "plainlora8"),
                            "lora_branch_over_plain_lora_step": ("branchlora8", "plainlora8")}.items():
        assert result[key] == pytest.approx(times[num] / times[den], rel=1e-12), key
    assert result["reference_over_lora_step"] == pytest.approx(
        result["snell_over_lora_step"] * result["fused_speedup_vs_reference"], rel=1e-12)
    assert result["survivor_over_dense_backward"] == pytest.approx(
        phases["snell32"]["backward"] / phases["snell32dense"]["backward"], rel=1e-12)
    for key, (num, den) in {"snell_over_lora_peak": ("snell8", "lora8"),
                            "snell32_over_lora32_peak": ("snell32", "lora32"),
                            "snell32_over_lora8_peak": ("snell32", "lora8"),
                            "fused_over_reference_peak": ("snell32", "reference32"),
                            "lora_over_plain_lora_peak": ("lora8", "plainlora8")}.items():
        assert result[key] == peaks[num] / peaks[den], key
    # a training step's peak holds at least every parameter and buffer, the batch (4·3·32·32 fp32 images and 4
    # int64 labels), and per trainable tensor its gradient and AdamW's two moments: counted here from real models
    # built with the benchmark's options, independently of its storage tracker
    batch_bytes = 4 * 3 * 32 * 32 * 4 + 4 * 8
    lora = dict(targets=SIX, dropout=0.0)
    variants = {"lora8": ("lora", dict(rank=8, alpha=8.0, **lora)),
                "plainlora8": ("lora", dict(rank=8, alpha=8.0, **lora)),  # the same tensors, other modules
                "branchlora8": ("lora", dict(rank=8, alpha=8.0, **lora)),
                "lora32": ("lora", dict(rank=32, alpha=32.0, **lora)),
                "snell8": ("snell", dict(rank=8, sparsity=0.9, mode="merged")),
                "snell32": ("snell", dict(rank=32, sparsity=0.9, mode="merged")),
                "snell32dense": ("snell", dict(rank=32, sparsity=0.9, mode="merged")),
                "reference32": ("snell", dict(rank=32, sparsity=0.9, implementation="reference",
                                               adapter_dropout=0.0, adapter_drop_path=0.0))}
    for name, (method, options) in variants.items():
        static, trainable = _static_and_trainable_bytes(method, **options)
        assert peaks[name] > static + batch_bytes + 3 * trainable, (name, peaks[name], static, trainable)
