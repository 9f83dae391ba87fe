"""SPT stage 1 (spec spt_arc_hta.md §1.2-1.3, §5.3-5.4): candidates, sensitivity scores, §1.3 allocation arithmetic,
the allocation file and the sensitivity command, including two gloo ranks."""
from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import TINY_VIT, free_port, tiny_vit
from peft_dist.config import ConfigError, load_config
from peft_dist.methods.spt_sensitivity import (
    AllocationError, add_sensitivity_arguments, allocation_json, build_allocation, classify, compute_sensitivity,
    default_taus, format_allocation_table, model_candidates, read_allocation, run_sensitivity, select_budget,
    structured_param_count, top_positions, write_allocation)


def batches(n=3, bs=6, seed=1, classes=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, 32, 32, generator=g), torch.randint(0, classes, (bs,), generator=g)) for _ in range(n)]


def tiny_overrides(*extra):
    kw = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()) + "}"
    return ["model.name=vit_tiny_patch16_224", "model.num_classes=5", f"model.kwargs={kw}", "data.source=synthetic",
            "data.batch_size=6", *extra]


def sensitivity_args(out, *extra):
    parser = argparse.ArgumentParser()
    add_sensitivity_arguments(parser)
    return parser.parse_args(["--out", str(out), "--structured-type", "lora", "--num-batches", "3", "--rank", "2",
                              "--tau-step", "500", "--tau-count", "60", "--budgets", "0.002", "0.005", *extra])


# ------------------------------------------------------------------------------------------------ candidates
def test_vit_b_candidate_set_and_thresholds_follow_the_spec():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", num_classes=10)
    cands = model_candidates(model)
    matrices = [c for c in cands if c.kind == "matrix"]
    vectors = [c for c in cands if c.kind == "vector"]
    # 12 blocks x 6 ops; 10 vectors per block (norm1 γβ, q/k/v/proj biases, norm2 γβ, fc1/fc2 biases) + final norm γβ
    assert len(matrices) == 72 and len(vectors) == 122
    assert sum(c.numel for c in cands) == 85_056_000  # "~85 M entries" (spec §1.2)
    by_key = {c.key: c for c in cands}
    assert by_key["blocks.3.attn.k.weight"].shape == (768, 768) and by_key["blocks.3.attn.k.weight"].op == "k"
    assert by_key["blocks.3.attn.v.bias"].shape == (768,)
    assert by_key["blocks.11.mlp.fc1.weight"].shape == (3072, 768)
    assert not any(s in c.key for c in cands for s in ("head", "cls_token", "pos_embed", "patch_embed", "qkv"))
    # σ_opt = P_s / α for ViT-B, r=8 (spec §1.3 lists these values)
    assert structured_param_count("lora", 768, 768, 8) / 10 == pytest.approx(1228.8)
    assert structured_param_count("lora", 3072, 768, 8) / 10 == pytest.approx(3072)
    assert structured_param_count("lora", 768, 3072, 8) / 10 == pytest.approx(3072)
    assert structured_param_count("adapter", 768, 768, 8) / 10 == pytest.approx(1306.4)
    assert structured_param_count("adapter", 3072, 768, 8) / 10 == pytest.approx(5223.2)


def test_unsupported_parameters_are_named():
    with pytest.raises(AllocationError, match=r"blocks\.0\.ls1\.gamma"):
        model_candidates(tiny_vit(init_values=1e-5))
    with pytest.raises(AllocationError, match="unknown"):
        classify("blocks.0.attn.unknown.weight", (4, 4))


# ------------------------------------------------------------------------------------------------ §1.3 arithmetic
def hand_scores():
    """Ten non-zero scores whose global order is fixed by hand (every other entry scores 0)."""
    q = torch.zeros(2, 3)
    fc1 = torch.zeros(4, 3)
    norm = torch.zeros(4)
    bias = torch.zeros(4)
    q.view(-1)[0], fc1.view(-1)[5], norm[2], q.view(-1)[4], fc1.view(-1)[7] = 100, 90, 80, 70, 60
    norm[0], q.view(-1)[1], bias[3], fc1.view(-1)[0], fc1.view(-1)[11] = 50, 40, 30, 20, 10
    return {"blocks.0.attn.q.weight": q, "blocks.0.mlp.fc1.weight": fc1, "blocks.0.norm1.weight": norm,
            "blocks.0.attn.proj.bias": bias}


def test_allocation_matches_hand_computed_section_1_3():
    # r=1, α=2, β=2: P_s(q, 2x3) = 5 → structured at c >= 2.5; P_s(fc1, 4x3) = 7 → c >= 3.5; vectors (n=4) whole
    # at c >= 2. fixed = 1 (the "cls token").
    #   τ=2: q1 fc1 1                       → 2 + 1 = 3
    #   τ=4: q2 fc1 1 norm 1                → 4 + 1 = 5
    #   τ=6: q2 fc1 2 norm whole 4          → 8 + 1 = 9
    #   τ=8: q structured 5, fc1 2, norm 4, bias 1 → 12 + 1 = 13
    #   τ=10: q 5, fc1 structured 7, norm 4, bias 1 → 17 + 1 = 18
    doc = build_allocation(hand_scores(), structured_type="lora", rank=1, alpha=2, beta=2,
                           budgets_m=[9e-6, 11e-6, 4e-6, 1.0], taus=[2, 4, 6, 8, 10], fixed_params=1)
    assert [s["total"] for s in doc["sweep"]] == [3, 5, 9, 13, 18]
    by_budget = {e["budget_m"]: e for e in doc["budgets"]}
    assert by_budget[9e-6]["tau"] == 6  # exact hit
    assert by_budget[11e-6]["tau"] == 8  # |9-11| == |13-11|: ties go to the later τ
    assert by_budget[4e-6]["tau"] == 4  # |3-4| == |5-4|: later τ again
    assert by_budget[1.0]["tau"] == 10  # the closest total when the budget is out of reach

    e8 = by_budget[11e-6]
    assert e8["tuned_matrices"] == [[1, 0, 0, 0, 0, 0]] and e8["per_op"] == [1, 0, 0, 0, 0, 0]
    assert e8["tuned_vectors"] == ["blocks.0.norm1.weight"]
    assert e8["unstructured"] == {"blocks.0.mlp.fc1.weight": [5, 7], "blocks.0.attn.proj.bias": [3]}
    assert (e8["structured_total"], e8["vector_total"], e8["unstructured_total"], e8["total"]) == (5, 4, 3, 13)
    e4 = by_budget[4e-6]
    assert e4["unstructured"] == {"blocks.0.attn.q.weight": [0, 4], "blocks.0.mlp.fc1.weight": [5],
                                  "blocks.0.norm1.weight": [2]}
    assert e4["tuned_vectors"] == [] and e4["per_op"] == [0] * 6

    # Adapter costs (§1.3): P_s(q) = 2·1·2 + 1 + 2 = 7 → c >= 3.5; at τ=10 q (c=3) stays unstructured and fc1 (c=4,
    # P_s = 2·1·4 + 1 + 4 = 13 → c >= 6.5) too: 3 + 4 + 4 + 1 + 1 = 13.
    adapter = build_allocation(hand_scores(), structured_type="adapter", rank=1, alpha=2, beta=2, budgets_m=[1.0],
                               taus=[10], fixed_params=1)
    assert adapter["sweep"] == [{"tau": 10, "total": 13}]
    assert adapter["budgets"][0]["per_op"] == [0] * 6


def test_prefix_counts_equal_one_topk_per_tau():
    """§5.4: one sort + prefix counts gives what a separate top-τ per τ gives (distinct scores, no ties)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"blocks.0.attn.q.weight": (8, 6), "blocks.0.mlp.fc2.weight": (6, 16), "blocks.1.attn.v.weight": (8, 6),
              "blocks.0.norm2.bias": (6,), "blocks.1.mlp.fc1.bias": (16,), "norm.weight": (6,)}
    scores = {k: torch.rand(s, generator=g) ** 4 for k, s in shapes.items()}
    taus = list(range(5, 200, 15))
    rank, alpha, beta = 2, 3.0, 4.0
    doc = build_allocation(scores, structured_type="lora", rank=rank, alpha=alpha, beta=beta, budgets_m=[1e-4],
                           taus=taus, fixed_params=6)
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    sizes = [s.numel() for s in scores.values()]
    for tau, row in zip(taus, doc["sweep"]):
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.topk(flat, tau).indices] = True
        total = 6
        for (key, s), piece in zip(scores.items(), mask.split(sizes)):
            c = int(piece.sum())
            if s.ndim == 2:
                p_s = rank * (s.shape[0] + s.shape[1])
                total += p_s if c >= p_s / alpha else c
            else:
                total += s.numel() if c >= s.numel() / beta else c
        assert row["total"] == total, tau
    entry = doc["budgets"][0]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat, entry["tau"]).indices] = True
    for (key, s), piece in zip(scores.items(), mask.split(sizes)):
        if key in entry["unstructured"]:
            assert entry["unstructured"][key] == piece.nonzero().flatten().tolist()


def test_top_positions_equal_a_stable_full_sort_with_ties():
    g = torch.Generator().manual_seed(0)
    flat = torch.randint(0, 6, (5000,), generator=g).float()  # hundreds of ties per value, zeros included
    full = torch.sort(flat, descending=True, stable=True).indices
    for k in (1, 700, 2500, 5000):
        assert torch.equal(top_positions(flat, k), full[:k])


def test_bad_sweep_inputs_are_named():
    scores = hand_scores()
    with pytest.raises(ConfigError, match="taus"):
        build_allocation(scores, structured_type="lora", taus=[1000])
    with pytest.raises(ConfigError, match="structured_type"):
        build_allocation(scores, structured_type="vera", taus=[2])
    with pytest.raises(ConfigError, match="alpha"):
        build_allocation(scores, structured_type="lora", alpha=0, taus=[2])
    with pytest.raises(ConfigError, match="budgets"):
        build_allocation(scores, structured_type="lora", taus=[2], budgets_m=[-1])
    with pytest.raises(ConfigError, match="tau_step"):
        default_taus(100, step=500)


# ------------------------------------------------------------------------------------------------ scores
def test_scores_are_summed_squared_batch_mean_gradients_in_fp64():
    model = tiny_vit().double()
    model.blocks[1].attn.qkv.weight.requires_grad_(False)  # a frozen tensor still gets scored, then stays frozen
    model.eval()
    data = [(x.double(), y) for x, y in batches()]
    scores = compute_sensitivity(model, data, num_batches=2)
    assert not model.training and not model.blocks[1].attn.qkv.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert list(scores) == [c.key for c in model_candidates(model)]

    params = dict(model.named_parameters())
    names = ["blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.bias", "blocks.0.mlp.fc2.weight", "norm.bias"]
    expected = {n: torch.zeros_like(params[n]) for n in names}
    for x, y in data[:2]:  # exactly num_batches batches
        leaves = {n: params[n].detach().clone().requires_grad_(True) for n in names}
        loss = F.cross_entropy(torch.func.functional_call(model, leaves, (x,)), y)
        for n, g in zip(names, torch.autograd.grad(loss, list(leaves.values()))):
            expected[n] += g.square()
    d = 48
    for j, op in enumerate("qkv"):
        torch.testing.assert_close(scores[f"blocks.0.attn.{op}.weight"],
                                   expected["blocks.0.attn.qkv.weight"][j * d:(j + 1) * d].float())
        torch.testing.assert_close(scores[f"blocks.1.attn.{op}.bias"],
                                   expected["blocks.1.attn.qkv.bias"][j * d:(j + 1) * d].float())
    torch.testing.assert_close(scores["blocks.0.mlp.fc2.weight"], expected["blocks.0.mlp.fc2.weight"].float())
    torch.testing.assert_close(scores["norm.bias"], expected["norm.bias"].float())


def test_score_variants_and_data_errors():
    model = tiny_vit()
    model.eval()
    data = batches(n=1, bs=3)
    grad_sq = compute_sensitivity(model, data, 1)
    fisher = compute_sensitivity(model, data, 1, score="fisher")
    taylor = compute_sensitivity(model, data, 1, score="taylor")
    key = "blocks.0.mlp.fc1.weight"
    # (mean_i g_i)² <= mean_i g_i² (Cauchy-Schwarz); fisher sums the 3 per-sample squares, grad_sq squares the mean
    assert torch.all(fisher[key] / 3 >= grad_sq[key] * (1 - 1e-4) - 1e-12)
    assert torch.any(fisher[key] / 3 > grad_sq[key] * 1.01)  # and they are different estimators
    torch.testing.assert_close(taylor[key] ** 2,
                               grad_sq[key] * model.blocks[0].mlp.fc1.weight.detach() ** 2, rtol=1e-4, atol=1e-12)
    with pytest.raises(ConfigError, match="only 1 of num_batches=2"):
        compute_sensitivity(model, data, 2)
    with pytest.raises(ConfigError, match="score"):
        compute_sensitivity(model, data, 1, score="hessian")


# ------------------------------------------------------------------------------------------------ the file
def test_sensitivity_command_is_deterministic_and_readable(tmp_path, capsys):
    cfg = load_config(None, tiny_overrides("model.drop_path_rate=0.1", "train.seed=3"))
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert run_sensitivity(cfg, sensitivity_args(first), batches=batches(seed=7)) == 0
    printed = capsys.readouterr().out
    assert run_sensitivity(cfg, sensitivity_args(second), batches=batches(seed=7)) == 0
    # Drop-path is active and the head is random, yet a fixed seed gives the identical file (spec §5.1 item 5).
    assert first.read_bytes() == second.read_bytes()
    doc = read_allocation(first)
    assert doc["structured_type"] == "lora" and doc["rank"] == 2 and doc["fixed_params"] == 48
    assert [e["budget_m"] for e in doc["budgets"]] == [0.002, 0.005]
    assert doc["metadata"]["seed"] == 3 and doc["metadata"]["num_batches"] == 3
    entry = select_budget(doc, 0.002)
    assert entry["total"] == entry["structured_total"] + entry["vector_total"] + entry["unstructured_total"] + 48
    assert format_allocation_table(doc, entry) in printed and "per-op" in printed
    assert json.loads(first.read_text()) == doc

    other = tmp_path / "c.json"
    cfg_other = load_config(None, tiny_overrides("model.drop_path_rate=0.1", "train.seed=4"))
    run_sensitivity(cfg_other, sensitivity_args(other), batches=batches(seed=7))
    assert json.loads(other.read_text())["sweep"] != doc["sweep"]  # the seed (head, drop-path) matters


def test_allocation_file_errors_name_the_file(tmp_path):
    with pytest.raises(AllocationError, match="not found.*missing.json"):
        read_allocation(tmp_path / "missing.json")
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x80\x04\x95pickle")
    with pytest.raises(AllocationError, match="garbage.json"):
        read_allocation(garbage)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(AllocationError, match="format"):
        read_allocation(wrong)
    doc = build_allocation(hand_scores(), structured_type="lora", rank=1, budgets_m=[1e-5], taus=[2, 4])
    with pytest.raises(ConfigError, match=r"\.json"):
        write_allocation(tmp_path / "alloc.pth", doc)
    path = write_allocation(tmp_path / "alloc.json", doc)
    assert path.read_text() == allocation_json(doc)
    with pytest.raises(AllocationError, match="method.budget.*holds budgets 1e-05"):
        select_budget(read_allocation(path), 0.4)
    cfg = load_config(None, tiny_overrides())
    with pytest.raises(ConfigError, match="--structured-type"):
        run_sensitivity(cfg, argparse.Namespace(structured_type=None, num_batches=1), batches=batches())


# ------------------------------------------------------------------------------------------------ two ranks
def _two_rank_worker(rank, world, port, overrides, data, out_dir):
    import os

    from dist_workers import init_gloo

    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    try:
        share = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in data]
        cfg = load_config(None, overrides)
        model = tiny_vit()
        scores = compute_sensitivity(model, share, num_batches=len(share))
        torch.save(scores, os.path.join(out_dir, f"scores{rank}.pt"))
        run_sensitivity(cfg, sensitivity_args(os.path.join(out_dir, "alloc.json")), batches=share)
        doc = read_allocation(os.path.join(out_dir, "alloc.json"))  # every rank reads the file rank 0 wrote
        with open(os.path.join(out_dir, f"read{rank}.json"), "w") as f:
            f.write(allocation_json(doc))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_ranks_score_the_global_batch_and_agree(tmp_path):
    data = batches(n=3, bs=6)
    overrides = tiny_overrides()
    # fork: the ranks inherit the imported modules instead of paying torch + timm imports again (2 cores)
    mp.start_processes(_two_rank_worker, args=(2, free_port(), overrides, data, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    single = compute_sensitivity(tiny_vit(), data, num_batches=3)
    s0 = torch.load(tmp_path / "scores0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "scores1.pt", weights_only=True)
    for key in single:
        assert torch.equal(s0[key], s1[key]), key  # identical on every rank
        # the mean of the two half-batch gradients is the global batch-mean gradient (spec §5.3 item 10)
        torch.testing.assert_close(s0[key], single[key], rtol=1e-4, atol=1e-10)
    assert (tmp_path / "read0.json").read_bytes() == (tmp_path / "read1.json").read_bytes()
    assert read_allocation(tmp_path / "alloc.json")["metadata"]["world_size"] == 2


def test_cli_sensitivity_with_the_data_loader(tmp_path, capsys):
    from peft_dist.cli import main

    kw = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()) + "}"
    argv = ["sensitivity", "model.name=vit_tiny_patch16_224", "model.num_classes=5", f"model.kwargs={kw}",
            "data.source=synthetic", "data.synthetic_classes=5", "data.batch_size=8", "data.img_size=32",
            "--out", str(tmp_path / "alloc.json"), "--structured-type", "adapter", "--num-batches", "2", "--rank", "2",
            "--tau-step", "500", "--tau-count", "40", "--budgets", "0.003"]
    assert main(argv) == 0
    assert "per-op" in capsys.readouterr().out
    doc = read_allocation(tmp_path / "alloc.json")
    assert doc["structured_type"] == "adapter" and doc["metadata"]["num_batches"] == 2
    # a head too small for the data's labels is a config error naming the key, not an IndexError
    assert main([a.replace("data.synthetic_classes=5", "data.synthetic_classes=10") for a in argv]) == 2
    assert "model.num_classes" in capsys.readouterr().err


def test_without_structured_vectors_every_vector_keeps_only_its_entries():
    # the hand-computed sweep above without the whole-vector rule: the norm (c=2 at τ≥6) keeps its 2 entries
    #   τ=6: q2 fc1 2 norm 2 → 6 + 1 = 7;  τ=8: q structured 5, fc1 2, norm 2, bias 1 → 10 + 1 = 11
    doc = build_allocation(hand_scores(), structured_type="lora", rank=1, alpha=2, beta=2, budgets_m=[11e-6],
                           taus=[2, 4, 6, 8, 10], fixed_params=1, structured_vector=False)
    assert [s["total"] for s in doc["sweep"]] == [3, 5, 7, 11, 16] and doc["structured_vector"] is False
    entry = select_budget(doc, 11e-6)
    assert entry["tau"] == 8 and entry["tuned_vectors"] == [] and entry["vector_total"] == 0
    assert entry["unstructured"]["blocks.0.norm1.weight"] == [0, 2]
    parser = argparse.ArgumentParser()
    add_sensitivity_arguments(parser)
    assert parser.parse_args(["--out", "a.json"]).structured_vector is True  # the official scripts' setting
    assert parser.parse_args(["--out", "a.json", "--no-structured-vector"]).structured_vector is False
