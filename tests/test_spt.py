"""SPT stage 2 (spec spt_arc_hta.md §1.4-1.6): the sparse-delta Function (gradcheck, masked dense gradient, saved
memory independent of K), spt_lora / spt_adapter on a tiny ViT (exact budget, trainable set, merge, training),
recipes and the benchmark's smoke run."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

import peft_dist
from conftest import REPO, adamw_losses, tiny_vit
from peft_dist.config import ConfigError, load_config
from peft_dist.methods.base import AdaptedModule, MergeError, count_trainable
from peft_dist.methods.functional.sparse_delta import SparseDeltaLinearFunction, check_index, sparse_delta_linear
from peft_dist.methods.spt import SPTLayerNorm, SPTLinear
from peft_dist.methods.spt_sensitivity import (AllocationError, build_allocation, model_candidates, select_budget,
                                               write_allocation)


def random_problem(k, d_out=7, d_in=5, tokens=(3, 4), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, d_in, generator=g, dtype=dtype)
    w = torch.randn(d_out, d_in, generator=g, dtype=dtype)
    index = torch.randperm(d_out * d_in, generator=g)[:k]
    delta = torch.randn(k, generator=g, dtype=dtype)
    return x, w, delta, index


# ------------------------------------------------------------------------------------------------ the Function
def test_sparse_delta_function_passes_gradcheck_in_fp64():
    x, w, delta, index = random_problem(9)
    for needs in [(True, False, True), (True, True, True), (False, False, True)]:
        inputs = (x.clone().requires_grad_(needs[0]), w.clone().requires_grad_(needs[1]),
                  delta.clone().requires_grad_(needs[2]), index)
        assert torch.autograd.gradcheck(SparseDeltaLinearFunction.apply, inputs)


def test_sparse_delta_gradients_equal_the_masked_dense_gradient():
    x, w, delta, index = random_problem(12, d_out=9, d_in=6, tokens=(2, 5, 3))
    x1 = x.clone().requires_grad_(True)
    d1 = delta.clone().requires_grad_(True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    out = sparse_delta_linear(x1, w, d1, index.to(torch.int32), bias)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    dense = w.clone()
    dense.view(-1)[index] += delta
    dense.requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    bias2 = bias.detach().clone().requires_grad_(True)
    ref = F.linear(x2, dense, bias2)
    ref.backward(grad_out)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(bias.grad, bias2.grad)
    # ∂L/∂δ is the dense weight gradient read at the selected positions; nothing else of it is kept
    torch.testing.assert_close(d1.grad, dense.grad.view(-1)[index])
    assert w.grad is None


def _activation_bytes(fn, params):
    """Bytes saved for backward by fn(), leaving out parameters and index buffers (they exist anyway)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("spt_bench", REPO / "benchmarks" / "spt_sparse_delta.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_saved_memory_is_the_touched_input_columns():
    d_out, d_in, tokens = 48, 32, (4, 10)
    x = torch.randn(*tokens, d_in, requires_grad=True)
    w = torch.randn(d_out, d_in)
    official = _benchmark_module().OfficialStyleSparseLinear
    ours_bytes, official_bytes = {}, {}
    g = torch.Generator().manual_seed(0)
    for k in (8, 64, 1024):
        index = torch.randperm(d_out * d_in, generator=g)[:k]
        index32 = index.to(torch.int32)  # the module's non-persistent index buffer
        delta = torch.zeros(k, requires_grad=True)
        params = [w, delta, index, index32]
        ours_bytes[k] = _activation_bytes(lambda: sparse_delta_linear(x, w, delta, index32), params)
        rows, cols = index // d_in, index % d_in
        official_bytes[k] = _activation_bytes(lambda: official.apply(x, w, delta, rows, cols), params + [rows, cols])
        # Ours keeps x only at the C distinct columns the entries touch (+ those C columns and the K entries'
        # positions among them, int32 as the index), or x itself where that is not smaller (issue 20 item 4).
        touched = cols.unique().numel()
        gathered = 40 * touched * 4 + touched * 4 + k * 4
        assert ours_bytes[k] == min(gathered, x.numel() * x.element_size()), k
        assert ours_bytes[k] <= official_bytes[k]
    assert ours_bytes[8] < x.numel() * x.element_size() == ours_bytes[1024]
    # The official-style path keeps a weight clone plus a B·N·K gather, which grows with K (so the probe can tell).
    assert official_bytes[1024] - official_bytes[8] == (1024 - 8) * 40 * 4


def test_sparse_delta_under_bf16_autocast_keeps_fp32_delta():
    x, w, delta, index = random_problem(10, d_out=16, d_in=8, dtype=torch.float32)
    delta = (delta * 0.1).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse_delta_linear(x, w, delta, index, torch.zeros(16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert delta.grad.dtype == torch.float32
    dense = w.clone()
    dense.view(-1)[index] += delta.detach()
    torch.testing.assert_close(out.float(), F.linear(x, dense), rtol=2e-2, atol=5e-2)


def test_index_checks_name_the_problem():
    with pytest.raises(ValueError, match="duplicates"):
        check_index(torch.tensor([1, 2, 2]), 10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        check_index(torch.tensor([3, 10]), 10)
    with pytest.raises(ValueError, match="int32/int64"):
        check_index(torch.tensor([1.0]), 10)


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_spt_linear_combinations_pass_gradcheck(kind):
    """Structured slices next to sparse weight entries and bias entries in one fused qkv, fp64."""
    base = torch.nn.Linear(6, 18, dtype=torch.float64).requires_grad_(False)
    structured = {"lora": {"k": slice(6, 12)}} if kind == "lora" else {"adapters": {"q": slice(0, 6),
                                                                                   "v": slice(12, 18)}}
    layer = SPTLinear(base, rank=2, weight_positions=[0, 5, 40, 100], bias_positions=[1, 17], dropout=0.0,
                      drop_path=0.0, **structured)
    trainable = [p for n, p in layer.named_parameters() if not n.startswith("base.")]
    with torch.no_grad():
        for p in trainable:
            p.normal_()  # zero-initialised B/U would hide the branches' gradients
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    # gradcheck perturbs the parameters in place, so passing them as inputs checks their gradients too
    assert torch.autograd.gradcheck(lambda inp, *params: layer(inp), (x, *trainable))
    if kind == "lora":
        torch.testing.assert_close(layer.merged()(x), layer(x), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ the methods
def mixed_allocation(tmp_path, structured_type):
    """An allocation on the tiny ViT (r=2) that exercises every path. A few entries per tensor score above every
    other entry, and the sweep's single τ takes exactly those: q of block 0 (30 ≥ P_s/α ≈ 19-24) and both fc2s
    (60) get structured modules, the k biases (20 of 48 ≥ 48/β) are tuned whole, and a LayerNorm, a q/k/v bias
    slice and two matrices keep unstructured entries."""
    g = torch.Generator().manual_seed(0)
    scores = {c.key: torch.rand(c.shape, generator=g) for c in model_candidates(tiny_vit())}
    high = {"blocks.0.attn.q.weight": 30, "blocks.0.mlp.fc2.weight": 60, "blocks.1.mlp.fc2.weight": 60,
            "blocks.0.attn.k.bias": 20, "blocks.1.attn.k.bias": 20, "blocks.1.norm1.weight": 5,
            "blocks.1.mlp.fc1.weight": 10, "blocks.0.attn.v.bias": 3, "blocks.0.attn.proj.weight": 5}
    for key, n in high.items():
        flat = scores[key].view(-1)
        flat[torch.randperm(flat.numel(), generator=g)[:n]] += 10
    doc = build_allocation(scores, structured_type=structured_type, rank=2, budgets_m=[0.004],
                           taus=[sum(high.values())], fixed_params=48)
    entry = select_budget(doc, 0.004)
    assert entry["tuned_matrices"] == [[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1]]
    assert entry["tuned_vectors"] == ["blocks.0.attn.k.bias", "blocks.1.attn.k.bias"]
    assert sorted(entry["unstructured"]) == ["blocks.0.attn.proj.weight", "blocks.0.attn.v.bias",
                                             "blocks.1.mlp.fc1.weight", "blocks.1.norm1.weight"]
    return write_allocation(tmp_path / f"{structured_type}.json", doc), entry


def perturb_trainables(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("structured_type", ["lora", "adapter"])
def test_spt_trains_exactly_the_allocation(tmp_path, structured_type):
    path, entry = mixed_allocation(tmp_path, structured_type)
    model = tiny_vit()
    plain_keys = set(model.state_dict())
    method = peft_dist.apply_method(model, f"spt_{structured_type}", allocation=str(path), budget=0.004)
    counts = count_trainable(model)
    # LayerNorm entries are trained, so the realised count equals the file's total (cls token included).
    assert counts["trainable_params_without_head"] == entry["total"]
    adapted = {n for n, m in model.named_modules() if isinstance(m, AdaptedModule)}
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        inside = any(owner == a or owner.startswith(a + ".") for a in adapted) and ".base." not in name + "."
        assert p.requires_grad == (inside or name.startswith("head.") or name == "cls_token"), name
    assert isinstance(model.blocks[1].norm1, SPTLayerNorm)
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, SPTLinear)
    if structured_type == "lora":
        assert set(qkv.lora_slices) == {"q"} and qkv.lora_B["q"].shape == (48, 2)
    else:
        assert set(qkv.adapter_slices) == {"q"} and qkv.adapters["q"].down.weight.shape == (2, 48)
    summary = method.summary(model)
    assert summary["allocation_total"] == entry["total"] and summary["unstructured_norm_entries_trained"] > 0
    assert ("adapter_inference_flops_per_token" in summary) == (structured_type == "adapter")
    artifacts = method.write_artifacts(model, tmp_path)
    assert artifacts[0].read_text() == path.read_text()

    # Unstructured entries move only where the allocation says: one AdamW step, then compare ΔW with the index.
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    fc1 = model.blocks[1].mlp.fc1
    key = "blocks.1.mlp.fc1.weight"
    if key in entry["unstructured"]:
        moved = fc1.delta_weight().view(-1).nonzero().flatten().tolist()
        assert set(moved) <= set(entry["unstructured"][key]) and moved

    model.eval()
    perturb_trainables(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        adapted_logits = model(x)
    if structured_type == "adapter":
        with pytest.raises(MergeError, match="GELU"):
            peft_dist.merge(model)
        return
    plain = peft_dist.merge(model)
    assert set(plain.state_dict()) == plain_keys
    assert not any(isinstance(m, AdaptedModule) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), adapted_logits, rtol=0, atol=1e-5)


def test_adapter_files_with_the_former_delta_names_still_load(tmp_path):
    """δ lives in ``DeltaValues`` modules now (``…weight_delta.values``); a file naming it ``…weight_delta`` (written
    before) loads into the same tensors, and the model computes what the saving one did."""
    from peft_dist.train.evaluate import load_adapters
    from peft_dist.train.trainer import save_adapters

    path, _ = mixed_allocation(tmp_path, "lora")
    trained, fresh = tiny_vit(), tiny_vit()
    for model in (trained, fresh):
        peft_dist.apply_method(model, "spt_lora", allocation=str(path), budget=0.004)
    perturb_trainables(trained)
    state = {n: p.detach().clone() for n, p in trained.named_parameters() if p.requires_grad}
    legacy = {n.replace("_delta.values", "_delta"): t for n, t in state.items()}
    assert any(n.endswith(".weight_delta") for n in legacy) and any(n.endswith(".bias_delta") for n in legacy)
    save_adapters(tmp_path / "legacy.safetensors", legacy, {"method": "spt_lora", "model": "tiny"})
    load_adapters(fresh, tmp_path / "legacy.safetensors")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    trained.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)


@pytest.mark.parametrize("structured_type", ["lora", "adapter"])
def test_spt_loss_falls_with_adamw(tmp_path, structured_type):
    path, _ = mixed_allocation(tmp_path, structured_type)
    model = tiny_vit(seed=2)
    peft_dist.apply_method(model, f"spt_{structured_type}", allocation=str(path), budget=0.004)
    losses = adamw_losses(model, weight_decay=1e-4)
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0], losses  # dropout and drop-path make single steps noisy


def test_spt_options_and_files_are_checked(tmp_path):
    lora_file, _ = mixed_allocation(tmp_path, "lora")
    # SPT-Adapter must not run on LoRA-derived files (the official script's bug, spec §1.6)
    with pytest.raises(ConfigError, match="method.allocation.*'lora'.*spt_adapter needs a 'adapter'"):
        peft_dist.apply_method(tiny_vit(), "spt_adapter", allocation=str(lora_file), budget=0.004)
    with pytest.raises(ConfigError, match="method.allocation: required"):
        peft_dist.apply_method(tiny_vit(), "spt_lora")
    with pytest.raises(ConfigError, match="method.budget.*holds budgets 0.004"):
        peft_dist.apply_method(tiny_vit(), "spt_lora", allocation=str(lora_file), budget=0.4)
    with pytest.raises(ConfigError, match="method.dropout"):
        peft_dist.apply_method(tiny_vit(), "spt_lora", allocation=str(lora_file), budget=0.004, dropout=2.0)
    # A file computed for another backbone is refused with the first tensor that differs.
    with pytest.raises(AllocationError, match="does not fit this model: blocks.0.attn.k.bias"):
        peft_dist.apply_method(tiny_vit(embed_dim=96), "spt_lora", allocation=str(lora_file), budget=0.004)


def test_spt_recipes_load(tmp_path):
    lora_file, _ = mixed_allocation(tmp_path, "lora")
    adapter_file, _ = mixed_allocation(tmp_path, "adapter")
    recipes = sorted((REPO / "configs" / "recipes" / "spt").glob("*.yaml"))
    recipes += [REPO / "configs" / "methods" / "spt_lora.yaml", REPO / "configs" / "methods" / "spt_adapter.yaml"]
    assert len(recipes) == 8
    for recipe in recipes:
        text = recipe.read_text()
        overrides = [f"data.path={tmp_path}"]
        if "spt_adapter" in text:
            overrides += [f"method.allocation={adapter_file}", "method.budget=0.004"]
        elif "spt_lora" in text:
            overrides += [f"method.allocation={lora_file}", "method.budget=0.004"]
        cfg = load_config([REPO / "configs" / "backbones" / "vit_b16.yaml", recipe], overrides)
        assert cfg.model.name == "vit_base_patch16_224"
        if recipe.parent.name == "spt" and not recipe.stem.endswith("_sensitivity"):  # §1.6 training recipe
            assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 1e-4 and cfg.train.epochs == 100
            assert cfg.optim.warmup_epochs == 10 and cfg.optim.min_lr == 1e-5 and cfg.model.drop_path_rate == 0.1
        elif recipe.stem.endswith("_sensitivity"):  # §1.2: 32-image batches, drop-path 0.1, seed 0
            assert cfg.data.batch_size == 32 and cfg.model.drop_path_rate == 0.1 and cfg.train.seed == 0
    with pytest.raises(ConfigError, match="method.allocation: allocation file not found"):
        load_config(REPO / "configs" / "recipes" / "spt" / "vtab_lora.yaml",
                    [f"data.path={tmp_path}", f"method.allocation={tmp_path / 'nope.json'}"])


def test_benchmark_quick_run_reports_ratios(capsys):
    returned = _benchmark_module().main(["--quick"])  # in-process: a second interpreter doubles the import cost
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == returned
    # --quick: three shapes, K in {30, 400}, batches 2 and 4 of 50 tokens (batch 2 timed), fp32 on CPU
    assert (result["quick"], result["k_per_matrix"], result["batches"], result["timed_batch"],
            result["tokens_per_image"], result["device"]) == (True, [30, 400], [2, 4], 2, 50, "cpu")
    shapes = [[96, 96], [384, 96], [96, 384]]
    assert [(r["shape"], r["tokens"][0], r["k"]) for r in result["shapes"]] == \
        [(shape, batch, k) for batch in (2, 4) for k in (30, 400) for shape in shapes]
    worst: dict[str, float] = {}
    ours_total = official_total = time_ours = time_official = time_today = 0
    for r in result["shapes"]:
        d_out, d_in = r["shape"]
        batch, k, touched = r["tokens"][0], r["k"], r["touched_columns"]
        tokens = batch * 50
        assert 1 <= touched <= min(k, d_in)
        # saved bytes follow from the shapes alone: ours keeps x at the C touched columns (+ C int32 columns and K
        # int32 positions among them) or x itself where that is not smaller; today's earlier path the whole fp32
        # input; the official approach its W0 + δ clone (d_out·d_in) and the gathered input columns (B·N·K)
        whole = tokens * d_in * 4
        assert r["saved_bytes_ours"] == min(tokens * touched * 4 + touched * 4 + k * 4, whole)
        assert r["saved_bytes_today"] == whole
        assert r["saved_bytes_official"] == (d_out * d_in + tokens * k) * 4
        assert r["saved_bytes_ours"] <= min(r["saved_bytes_today"], r["saved_bytes_official"])
        assert r["saved_bytes_ratio"] == r["saved_bytes_official"] / r["saved_bytes_ours"]
        for other in ("official", "today"):
            key = f"saved_bytes_vs_{other}_k{k}_b{batch}"
            worst[key] = max(worst.get(key, 0.0), r["saved_bytes_ours"] / r[f"saved_bytes_{other}"])
        if batch != 2:
            assert "step_s_ours" not in r  # only the timed batch is timed
            continue
        assert r["step_s_ours"] > 0 and r["step_s_today"] > 0 and r["step_s_official"] > 0
        assert r["step_speedup"] == pytest.approx(r["step_s_official"] / r["step_s_ours"], rel=1e-12)
        ours_total += r["saved_bytes_ours"]
        official_total += r["saved_bytes_official"]
        time_ours += r["step_s_ours"]
        time_official += r["step_s_official"]
        time_today += r["step_s_today"]
    # the per-(K, batch) figures are the worst shape's ours/theirs, never above 1
    for key, value in worst.items():
        assert result[key] == value <= 1.0, key
    # K = 30 touches at most 30 of the 96-384 columns: far below both others
    assert result["saved_bytes_vs_today_k30_b4"] < 0.5 and result["saved_bytes_vs_official_k30_b4"] < 0.5
    # the headline ratios are over the timed batch's shapes: summed official (today's) over summed ours
    assert result["saved_bytes_ratio_vs_official"] == pytest.approx(official_total / ours_total, rel=1e-12)
    assert result["step_speedup_vs_official"] == pytest.approx(time_official / time_ours, rel=1e-12)
    assert result["step_speedup_vs_today"] == pytest.approx(time_today / time_ours, rel=1e-12)
