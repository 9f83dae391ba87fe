"""Every registered method trains under fsdp2 and DeepSpeed ZeRO-3 on 2 gloo ranks; per rank, optimizer state is
8 bytes per owned trainable element, no frozen parameter has a gradient, fsdp2 shards the frozen weights; a failed
rank makes every rank exit instead of hanging."""
import json
import time

import pytest
import torch.multiprocessing as mp

import peft_dist
from conftest import free_port, spawn_two_ranks
from dist_workers import engine_matrix, fail_on_rank

pytestmark = [pytest.mark.distributed]


def run_matrix(tmp_path, engine, stage):
    methods = [m for m in peft_dist.method_names() if not m.startswith("spt")]  # SPT needs an allocation file
    out = str(tmp_path / "results")
    spawn_two_ranks(engine_matrix, engine, stage, methods, str(tmp_path), out)
    return methods, [json.loads(open(f"{out}.rank{r}").read()) for r in range(2)]


@pytest.mark.timeout(420)
def test_every_method_under_fsdp2(tmp_path):
    methods, ranks = run_matrix(tmp_path, "fsdp2", 2)
    for m in methods:
        per_rank = [r[m] for r in ranks]
        assert sum(r["trainable_local_elements"] for r in per_rank) == per_rank[0]["trainable_elements"], m
        assert sum(r["frozen_local_bytes"] for r in per_rank) == per_rank[0]["frozen_full_bytes"], m
        for r in per_rank:
            assert r["optimizer_moment_bytes"] == 8 * r["trainable_local_elements"], m
            assert r["frozen_with_grad"] == [], m
            # half each: tensors with fewer rows than ranks (pos_embed is 1 x 17 x 48) shard along a longer dimension
            assert abs(r["frozen_local_bytes"] - r["frozen_full_bytes"] / 2) <= 0.01 * r["frozen_full_bytes"], m


@pytest.mark.timeout(420)
def test_every_method_under_zero3(tmp_path):
    methods, ranks = run_matrix(tmp_path, "deepspeed", 3)
    for m in methods:
        for r in (x[m] for x in ranks):
            # ZeRO partitions the flattened trainable fp32 master copy; alignment pads it by a few elements
            owned = r["trainable_elements"] / 2
            assert owned * 8 <= r["optimizer_moment_bytes"] <= (owned + 64) * 8, m
            assert r["frozen_with_grad"] == [], m


@pytest.mark.timeout(180)
def test_failed_rank_does_not_hang_the_others(tmp_path):
    overrides = ["model.name=vit_tiny_patch16_224", "model.num_classes=5",
                 "model.kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}",
                 "data.source=synthetic", "method.name=lora", "dist.engine=ddp", "dist.timeout_s=30",
                 f"train.out_dir={tmp_path}", "train.progress=false", "tracking.enabled=false", "train.steps=6",
                 "train.log_every=1"]
    start = time.monotonic()
    ctx = mp.start_processes(fail_on_rank, args=(2, free_port(), 1, overrides), nprocs=2, join=False,
                             start_method="spawn")
    for p in ctx.processes:
        p.join(timeout=120)
    codes = [p.exitcode for p in ctx.processes]
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    assert all(c is not None for c in codes), f"a rank hung: exit codes {codes}"
    assert all(c != 0 for c in codes), codes
    assert time.monotonic() - start < 120


def test_fairscale_missing_extra_is_a_clear_error(monkeypatch):
    import sys

    from peft_dist.engines.fairscale_oss import _import_oss

    monkeypatch.setitem(sys.modules, "fairscale.optim", None)  # as if the legacy extra were not installed
    with pytest.raises(RuntimeError, match=r"fairscale_oss needs the legacy extra: pip install 'peft-dist\[legacy\]'"):
        _import_oss()


def _fsdp2_bf16_run(tmp_path, strategy: str) -> dict:
    from dist_workers import fsdp2_bf16_dtypes

    out = tmp_path / f"dtypes-{strategy}.json"
    spawn_two_ranks(fsdp2_bf16_dtypes, str(out), strategy)
    return json.loads(out.read_text())


@pytest.mark.timeout(180)
@pytest.mark.parametrize("strategy", ["auto", "own_group"])
def test_fsdp2_bf16_policy_keeps_snell_factors_in_fp32(tmp_path, strategy):
    """bf16 compute (the GPU policy, here on gloo): SNELL's kernel factors reach the fused Function in fp32 while
    the input and the frozen weight are bf16 (spec snell_snella.md §7.2); LoRA's factors follow the policy. ``auto``
    is the per-parameter override on torch >= 2.15 and the factors' own fp32 group before it; ``own_group`` is
    the fallback forced on any torch, so both paths run on every supported minor."""
    got = _fsdp2_bf16_run(tmp_path, strategy)
    assert got["snell"]["input"] == got["snell"]["frozen_weight"] == "torch.bfloat16"
    assert got["snell"]["snell_factors"] == "torch.float32"
    assert got["lora"]["lora_gathered"] == ["torch.bfloat16"]
    assert got["snell"]["grads"] == got["lora"]["grads"] == ["torch.float32"]  # fp32 reduction, fp32 shards


@pytest.mark.timeout(240)
def test_fsdp2_full_precision_strategies_agree(tmp_path):
    """The fallback is numerically the override: the same loss and the same SNELL factor gradients, bitwise (both
    gather the factors in fp32 and run the same kernels). On torch < 2.15, where the override does not exist, the
    explicit request fails in one line and ``auto`` resolves to the fallback."""
    from peft_dist.engines.fsdp2 import resolve_full_precision_strategy, supports_dtype_override

    if not supports_dtype_override():
        with pytest.raises(RuntimeError, match=r"param_dtype_override_fn needs torch >= 2.15"):
            resolve_full_precision_strategy("override")
        assert resolve_full_precision_strategy("auto") == "own_group"
        return
    assert resolve_full_precision_strategy("auto") == "override"
    override, own_group = _fsdp2_bf16_run(tmp_path, "override"), _fsdp2_bf16_run(tmp_path, "own_group")
    assert override["snell"]["loss"] == own_group["snell"]["loss"]
    assert override["snell"]["factor_grads"] == own_group["snell"]["factor_grads"]
    assert any(any(g != 0.0 for g in grads) for grads in own_group["snell"]["factor_grads"])


def test_balanced_placement_picks_the_longest_evenly_divisible_dimension():
    import torch
    from torch.distributed.tensor import Shard

    from peft_dist.engines.fsdp2 import balanced_placement

    place = balanced_placement(32)
    shard = lambda *shape: place(torch.nn.Parameter(torch.empty(*shape)))  # noqa: E731
    assert shard(3840, 1280) == Shard(0)          # enough rows: FSDP2's default
    assert shard(2, 1280, 16) == Shard(1)         # SNELL factors: along d_in
    assert shard(8, 1280) == Shard(1)             # LoRA A
    assert shard(1, 257, 1280) == Shard(2)        # pos_embed: 257 does not split evenly, 1280 does
    assert shard(2, 48, 1) == Shard(0)            # nothing splits evenly over 32: dim 0 with padding
