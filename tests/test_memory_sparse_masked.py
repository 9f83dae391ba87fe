"""sparse_masked (the GPS-style memory baseline): masked weight gradient vs fp64 autograd and gradcheck, exact
per-matrix densities (number, map, SNELL CSV), untouched entries stay W0 under AdamW with weight decay, full-size
gradients and optimizer state, merge, and option errors that name the key or file."""
import csv

import pytest
import torch
import torch.nn.functional as F

import peft_dist
from conftest import tiny_vit
from peft_dist.config import ConfigError
from peft_dist.methods.registry import build_method
from peft_dist.methods.sparse_masked import MaskedWeightGrad, MaskedWeightLinear, kept_entries


def _mask(shape, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


def test_masked_weight_grad_gradcheck_fp64():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64)
    # With every entry tuned the hand-written backward must be the true derivative (x and W); with a partial mask
    # the input gradient stays exact (the weight gradient is masked by design, checked against autograd below).
    everything = torch.ones(4, 5, dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda xx, ww: MaskedWeightGrad.apply(xx, ww, b, everything), (x, w))
    assert torch.autograd.gradcheck(lambda xx: MaskedWeightGrad.apply(xx, w.detach(), b, _mask((4, 5), 0.5)), (x,))


def test_masked_weight_grad_matches_masked_autograd_reference():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64)
    mask = _mask((5, 6), 0.3, seed=1)
    upstream = torch.randn(3, 7, 5, dtype=torch.float64)
    (MaskedWeightGrad.apply(x, w, b, mask) * upstream).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = w.detach().clone().requires_grad_(True)
    (F.linear(x_ref, w_ref, b) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad * mask, rtol=1e-12, atol=1e-12)
    assert (w.grad[~mask] == 0).all() and (w.grad[mask] != 0).all()


def test_exact_densities_and_untouched_entries_stay_w0_under_adamw():
    model = tiny_vit()
    method = peft_dist.apply_method(model, "sparse_masked", sparsity={"default": 0.9, "fc1": 0.5, "blocks.1.q": 0.75})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    modules = {n: m for n, m in model.named_modules() if isinstance(m, MaskedWeightLinear)}
    assert set(modules) == {f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "attn.proj", "mlp.fc1",
                                                                              "mlp.fc2")}
    d = 48
    qkv = modules["blocks.1.attn.qkv"].grad_mask
    assert int(qkv[:d].sum()) == kept_entries(d * d, 0.75)  # q: the most specific key wins
    assert int(qkv[d:2 * d].sum()) == kept_entries(d * d, 0.9)  # k and v: default
    assert int(qkv[2 * d:].sum()) == kept_entries(d * d, 0.9)
    assert int(modules["blocks.0.mlp.fc1"].grad_mask.sum()) == kept_entries(4 * d * d, 0.5)
    assert method.density["blocks.1.q"] == pytest.approx(0.25, abs=1 / (d * d))

    opt = torch.optim.AdamW(method.param_groups(model, weight_decay=0.1), lr=1e-2)
    for _ in range(2):
        loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    for name, m in modules.items():
        w0, w = before[f"{name}.base.weight"], m.base.weight.detach()
        assert torch.equal(w[~m.grad_mask], w0[~m.grad_mask]), name  # no decay, no update off the mask
        assert not torch.equal(w[m.grad_mask], w0[m.grad_mask]), name
        assert torch.equal(m.base.bias, before[f"{name}.base.bias"]), name  # biases are frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.base.weight" for n in modules} | {"head.weight", "head.bias", "cls_token"}


def test_full_size_gradients_and_adam_state():
    model = tiny_vit()
    method = peft_dist.apply_method(model, "sparse_masked", sparsity=0.99)
    opt = torch.optim.AdamW(method.param_groups(model, 0.0), lr=1e-3)
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    matrices = [m.base.weight for m in model.modules() if isinstance(m, MaskedWeightLinear)]
    assert all(p.grad is not None and p.grad.shape == p.shape for p in matrices)
    opt.step()
    for p in matrices:
        assert opt.state[p]["exp_avg"].shape == p.shape and opt.state[p]["exp_avg_sq"].shape == p.shape


def test_sparsity_file_from_a_snell_run(tmp_path):
    rows = [{"matrix": f"blocks.{b}.{k}", "block": b, "kind": k, "sparsity": 0.5 + 0.1 * b}
            for b in range(2) for k in ("q", "k", "v", "proj", "fc1", "fc2")]
    path = tmp_path / "snell_sparsity.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    model = tiny_vit()
    method = peft_dist.apply_method(model, "sparse_masked", sparsity_file=str(path))
    fc2 = model.blocks[1].mlp.fc2.grad_mask
    assert int(fc2.sum()) == kept_entries(fc2.numel(), 0.6)
    assert method.density["blocks.0.v"] == pytest.approx(0.5, abs=1e-3)

    bad = tmp_path / "bad.csv"
    bad.write_text("name,s\nblocks.0.q,0.5\n")
    with pytest.raises(ConfigError, match=r"method.sparsity_file: .*bad.csv needs the columns 'matrix' and 'sparsity'"):
        build_method("sparse_masked", sparsity_file=str(bad))
    partial = tmp_path / "partial.csv"
    partial.write_text("matrix,sparsity\nblocks.0.q,0.5\n")
    with pytest.raises(ConfigError, match=r"partial.csv has no row for matrix blocks.0.k"):
        peft_dist.apply_method(tiny_vit(), "sparse_masked", sparsity_file=str(partial))
    with pytest.raises(ConfigError, match=r"method.sparsity_file: file not found"):
        build_method("sparse_masked", sparsity_file=str(tmp_path / "missing.csv"))


@pytest.mark.parametrize("options, message", [
    ({"sparsity": 1.5}, r"method.sparsity: got 1.5; allowed: >= 0.0 and <= 1.0"),
    ({"sparsity": {"blocks.x.q": 0.5}}, r"method.sparsity.blocks.x.q: unknown key"),
    ({"targets": ["qkv"]}, r"method.targets: unknown target 'qkv'"),
])
def test_option_errors_name_the_key(options, message):
    with pytest.raises(ConfigError, match=message):
        build_method("sparse_masked", **options)


def test_merge_is_the_tuned_plain_model():
    model = tiny_vit()
    peft_dist.apply_method(model, "sparse_masked", sparsity=0.5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MaskedWeightLinear):
                m.base.weight.add_(0.01 * m.grad_mask)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    plain = peft_dist.merge(model)
    assert not any(isinstance(m, MaskedWeightLinear) for m in plain.modules())
    torch.testing.assert_close(plain(x), expected)
