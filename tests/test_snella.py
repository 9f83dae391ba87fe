"""SNELLA's allocator (spec snell_snella.md §4, §7.3 F, §7.6 item 5): the cubic budget schedule against §4.3's
table, integer proportional allocation under caps, the importance EMAs, the allocation written before the epoch's
first forward, resume through state_dict, the artifacts, dense MixK, a short training run, and identical
allocations on two DDP ranks."""
import json
import math
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import peft_dist
from conftest import free_port, tiny_vit
from peft_dist.methods.base import TrainPlan
from peft_dist.methods.snell import KernelFactors
from peft_dist.methods.snella import budget_schedule, proportional_allocation
from test_snell import train_steps

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- schedule
def test_budget_schedule_reproduces_the_spec_table():
    """VTAB-CIFAR: s_init 0.01, ρ 0.8, 100 epochs, t_i = t_f = 0, interval 1 (§4.3's kept fractions)."""
    n = 10_000_000
    v_init, v_target = 0.99 * n, 0.2 * n
    assert budget_schedule(0, 100, v_init, v_target) == (math.floor(v_init), False)  # no statistics yet
    for epoch, kept in ((1, 0.967), (10, 0.776), (25, 0.533), (50, 0.299), (75, 0.212), (99, 0.200)):
        budget, realloc = budget_schedule(epoch, 100, v_init, v_target)
        assert realloc and round(budget / n, 3) == kept, (epoch, budget / n)
    budgets = [budget_schedule(e, 100, v_init, v_target)[0] for e in range(100)]
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))  # monotone decay


def test_budget_schedule_warmups_and_interval():
    kw = dict(total_epochs=20, budget_init=1000.0, budget_target=200.0, init_warmup=2, final_warmup=3,
              mask_interval=4)
    assert budget_schedule(2, **kw) == (1000, False)
    assert budget_schedule(3, **kw) == (math.floor(200 + 800 * (1 - 1 / 15) ** 3), False)  # 3 % 4 != 0
    assert budget_schedule(4, **kw)[1] is True
    assert budget_schedule(17, **kw) == (math.floor(200 + 800 * (1 - 15 / 15) ** 3), False)
    assert budget_schedule(18, **kw) == (200, True) and budget_schedule(19, **kw) == (200, True)


# ---------------------------------------------------------------------------------------------- allocation
def test_proportional_allocation_sums_to_the_budget_and_respects_caps():
    rng = random.Random(0)
    for trial in range(200):
        m = rng.randint(1, 12)
        caps = [rng.randint(1, 500) for _ in range(m)]
        scores = [rng.random() ** 3 * (rng.random() < 0.9) for _ in range(m)]
        budget = rng.randint(0, sum(caps) + 50)
        counts = proportional_allocation(budget, scores, caps)
        assert sum(counts) == min(budget, sum(caps)), (trial, counts)
        assert all(0 <= c <= cap for c, cap in zip(counts, caps))
        # proportional among the matrices below their cap: counts / score agree within the rounding of one entry
        free = [i for i in range(m) if counts[i] < caps[i] and scores[i] > 0]
        if len(free) > 1:
            rates = [counts[i] / scores[i] for i in free]
            slack = max(1 / scores[i] for i in free)
            assert max(rates) - min(rates) <= slack + 1e-9, (trial, counts, scores, caps)
        # a capped matrix deserves at least its cap at the common rate of the uncapped ones
        if free:
            rate = min(counts[i] / scores[i] for i in free)
            for i in range(m):
                if counts[i] == caps[i] and scores[i] > 0:
                    assert scores[i] * (rate + max(1 / scores[j] for j in free)) >= caps[i] - 1e-9


def test_proportional_allocation_edge_cases():
    assert proportional_allocation(10, [0.0, 0.0], [10, 10]) == [5, 5]  # no positive score: uniform (§7.4)
    assert proportional_allocation(10, [float("nan"), 1.0], [10, 10]) == [0, 10]
    assert proportional_allocation(999, [1.0, 2.0], [3, 4]) == [3, 4]
    assert proportional_allocation(6, [1.0, 1.0, 1.0], [1, 100, 100]) == [1, 3, 2]  # capped excess, ties by index
    assert proportional_allocation(7, [3.0, 1.0], [4, 10]) == [4, 3]  # 5.25 → capped at 4, the rest spills over
    with pytest.raises(ValueError, match="3 scores for 2 matrices"):
        proportional_allocation(5, [1.0, 1.0, 1.0], [3, 3])


# ---------------------------------------------------------------------------------------------- hooks
def _snella(**options):
    model = tiny_vit()
    method = peft_dist.apply_method(model, "snella", rank=4, **options)
    return model, method


def test_importance_statistics_follow_the_ema_formulas():
    model, method = _snella(init_sparsity=0.0, target_ratio=0.5)
    factors = model.blocks[0].mlp.fc2.kernels["fc2"]
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    grads = [p.grad.clone() for p in (factors.A, factors.B)]
    method.on_step_end(model, 0)
    I = (factors.A.detach() * grads[0]).abs()
    torch.testing.assert_close(method.sensitivity["blocks.0.fc2.A"], 0.15 * I)
    torch.testing.assert_close(method.uncertainty["blocks.0.fc2.A"], 0.15 * (I - 0.15 * I).abs())
    method.on_step_end(model, 1)  # same gradient again: Ī ← 0.85·Ī + 0.15·I
    s1 = 0.15 * I
    s2 = 0.85 * s1 + 0.15 * I
    torch.testing.assert_close(method.sensitivity["blocks.0.fc2.A"], s2)
    u2 = 0.85 * (0.15 * (I - s1).abs()) + 0.15 * (I - s2).abs()
    torch.testing.assert_close(method.uncertainty["blocks.0.fc2.A"], u2)
    expect = float((s2.double() * u2.double()).mean())
    sB = method.sensitivity["blocks.0.fc2.B"].double() * method.uncertainty["blocks.0.fc2.B"].double()
    assert method.matrix_scores(model)["blocks.0.fc2"] == pytest.approx(expect + float(sB.mean()), rel=1e-12)
    assert "blocks.0.fc2.alpha" not in method.sensitivity  # α, γ, β are not scored (§4.2)


def test_allocation_is_written_before_the_epoch_and_spends_the_budget():
    model, method = _snella(init_sparsity=0.01, target_ratio=0.8)
    refs = method.matrices(model)
    sizes = {r.name: r.entries for r in refs}
    total = sum(sizes.values())
    assert all(r.factors.sparsity_value() == 0.01 for r in refs)
    with pytest.raises(RuntimeError, match="on_train_start"):
        method.on_epoch_start(model, 1)
    train_steps(model, method, steps=6, steps_per_epoch=3)  # epochs 0 and 1
    budget = budget_schedule(1, 2, 0.99 * total, 0.2 * total)[0]
    assert method.budget == budget
    kept = {r.name: round((1 - r.factors.sparsity_value()) * r.entries) for r in refs}
    assert sum(kept.values()) == budget
    scores = method.matrix_scores(model)
    order = sorted(scores, key=scores.get)
    assert kept[order[-1]] / sizes[order[-1]] >= kept[order[0]] / sizes[order[0]]
    # the next epoch's allocation lands in the modules before any forward of that epoch
    method.total_epochs = 4
    method.on_epoch_start(model, 2)
    budget2 = budget_schedule(2, 4, 0.99 * total, 0.2 * total)[0]
    assert sum(round((1 - r.factors.sparsity_value()) * r.entries) for r in refs) == budget2
    realised = method.summary(model)["matrices"]
    for r in refs:  # the forward builds exactly the allocated counts (±1 for the magnitude path's minimum)
        assert abs((1 - realised[r.name]["sparsity"]) * r.entries - (1 - r.factors.sparsity_value()) * r.entries) \
            <= 1.01


def test_state_dict_round_trip_resumes_the_allocation(tmp_path):
    model, method = _snella(init_sparsity=0.0, target_ratio=0.6)
    train_steps(model, method, steps=6, steps_per_epoch=3)
    path = tmp_path / "method.pt"
    torch.save(method.state_dict(), path)
    state = torch.load(path, weights_only=True)

    fresh_model, fresh = _snella(init_sparsity=0.0, target_ratio=0.6)
    fresh_model.load_state_dict(model.state_dict())
    for k in fresh_model.modules():  # as a resume from adapters only: the s buffers are not in the adapter file
        if isinstance(k, KernelFactors):
            k.set_sparsity(0.0)
    fresh.load_state_dict(state)
    for a, b in zip(method.matrices(model), fresh.matrices(fresh_model)):
        assert a.factors.sparsity_value() == b.factors.sparsity_value()
    assert fresh.history == method.history and fresh.steps == method.steps
    for key in method.sensitivity:
        assert torch.equal(fresh.sensitivity[key], method.sensitivity[key])
    method.on_epoch_start(model, 2)
    fresh.on_epoch_start(fresh_model, 2)
    assert [r.factors.sparsity_value() for r in method.matrices(model)] == \
        [r.factors.sparsity_value() for r in fresh.matrices(fresh_model)]
    other_model, other = tiny_vit(depth=1), None
    other = peft_dist.apply_method(other_model, "snella", rank=4)
    with pytest.raises(ValueError, match="snella state is for matrices"):
        other.load_state_dict(state)


def test_training_summary_and_artifacts(tmp_path):
    model, method = _snella(init_sparsity=0.01, target_ratio=0.7)
    losses = train_steps(model, method, steps=20, steps_per_epoch=5, lr=1e-2)
    assert losses[-1] < 0.7 * losses[0], losses
    summary = method.summary(model)
    json.dumps(summary)
    assert summary["allocations"] == 3 and summary["budget"] == method.budget
    total = sum(m["entries"] for m in summary["matrices"].values())
    kept = sum((1 - m["sparsity"]) * m["entries"] for m in summary["matrices"].values())
    assert abs(kept - method.budget) <= len(summary["matrices"])  # realised kept entries spend the budget
    assert len({round(m["sparsity"], 3) for m in summary["matrices"].values()}) > 1  # the allocation differs
    assert 0.0 < summary["mean_sparsity"] < 1.0 and total == 2 * (4 * 48 * 48 + 2 * 48 * 192)
    files = method.write_artifacts(model, tmp_path)
    assert {f.name for f in files} == {"snella_allocation.csv", "snella_allocation_history.csv",
                                       "snella_allocation.png"}
    table = (tmp_path / "snella_allocation.csv").read_text().splitlines()
    assert table[0] == "matrix,block,kind,d_out,d_in,entries,sparsity,kept,score" and len(table) == 13
    history = (tmp_path / "snella_allocation_history.csv").read_text().splitlines()
    assert len(history) == 1 + 4 * 12
    assert (tmp_path / "snella_allocation.png").read_bytes()[:4] == b"\x89PNG"


def test_dense_mixk_has_no_sparsification_and_no_allocator():
    model, method = _snella(dense=True)
    train_steps(model, method, steps=4, steps_per_epoch=2)
    assert method.sensitivity == {} and method.history == []
    dW = model.blocks[0].attn.qkv.delta_weight()
    assert torch.count_nonzero(dW) == dW.numel()
    assert method.summary(model)["mean_sparsity"] == 0.0


# ---------------------------------------------------------------------------------------------- two ranks
def _ddp_worker(rank, world, port, out):
    import datetime
    import os

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        model = tiny_vit()
        method = peft_dist.apply_method(model, "snella", rank=4, init_sparsity=0.01, target_ratio=0.7)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(method.param_groups(model, 0.01), lr=1e-2)
        method.on_train_start(model, TrainPlan(6, 2, 3))
        g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
        for step in range(6):
            if step % 2 == 0:
                method.on_epoch_start(model, step // 2)
            x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
            method.on_step_end(model, step)
            opt.zero_grad()
        result = {"scores": method.matrix_scores(model), "history": method.history}
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


def test_two_ddp_ranks_compute_the_same_statistics_and_allocation(tmp_path):
    out = tmp_path / "ranks.json"
    mp.start_processes(_ddp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True, start_method="fork")
    a, b = json.loads(out.read_text())
    assert a["scores"] == b["scores"]  # all-reduced gradients: the statistics agree before any broadcast
    assert a["history"] == b["history"] and len(a["history"]) == 3
    assert any(h["reallocated"] for h in a["history"])


def test_adapter_file_carries_the_learned_allocation(tmp_path):
    """adapter.safetensors holds the per-matrix s the allocator chose; ``restore_run`` rebuilds the trained model
    (not the config's init_sparsity) and predicts exactly as the trained one."""
    from launcher.env import DistEnv
    from peft_dist.config import load_config
    from peft_dist.train.evaluate import restore_run
    from peft_dist.train.trainer import Trainer

    kw = "{img_size: 32, patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}"
    cfg = load_config(None, ["model.name=vit_tiny_patch16_224", "model.num_classes=5", f"model.kwargs={kw}",
                             "data.source=synthetic", "method.name=snella", "method.rank=4", "method.mode=merged",
                             "method.init_sparsity=0.1", "method.target_ratio=0.6", "train.steps=6",
                             f"train.out_dir={tmp_path}", "train.progress=false", "tracking.enabled=false"])
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(2)]
    trainer = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches)
    trainer.fit()
    trained = trainer.method.sparsity_buffers(trainer.model)
    assert len({round(float(s), 4) for s in trained.values()}) > 1  # the allocator moved the budget
    _, restored, method = restore_run(tmp_path)
    assert {k: float(v) for k, v in method.sparsity_buffers(restored).items()} == \
        {k: float(v) for k, v in trained.items()}
    trainer.model.eval(), restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(batches[0][0]), trainer.model(batches[0][0]), rtol=0, atol=0)
