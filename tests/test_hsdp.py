"""HSDP (``dist.mesh=[replicate, shard]``, FSDP2's 2-D mesh) on 4 gloo ranks: 2 x 2 and 4 x 1 train the same adapters
as 1 process on the same global batches (test_ddp's tolerance); each shard group is consecutive ranks; a run
interrupted and resumed on the 2 x 2 mesh ends bitwise equal to an uninterrupted one; the dry run and the memory
estimator report exactly the parameter bytes FSDP2 stores on each rank of the 2 x 2 mesh; a 64-rank [8, 8] dry run
holds per rank what an 8-rank run holds; bad meshes fail in one line naming dist.mesh.

One spawn of 4 ranks serves every multi-process check (module fixture; the resume check would cost a second spawn
in test_resume_engines)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_ddp import assert_same_adapters, global_batches, initial_trainable, overrides
from test_resume_engines import assert_same_checkpoint, run_overrides, spawn
from test_resume_engines import global_batches as resume_batches
from dist_workers import train_shard_of_global_batches
from launcher.dry_run import dry_run
from peft_dist.config import ConfigError, load_config
from peft_dist.train import checkpoint as ckpt

# one worker for the file under xdist: its tests share one 4-rank spawn (the module fixture), which each worker
# would otherwise run again
pytestmark = pytest.mark.xdist_group("test_hsdp")

METHODS = ("lora", "snell")
MESHES = {"2x2": [2, 2], "4x1": [4, 1]}
RUNS = [("lora", "2x2"), ("snell", "2x2"), ("lora", "4x1")]
"""Pure replication (4 x 1) for one method: its reduction is a plain all-reduce, whatever the method."""


CLIPPED_SGD = ["optim.name=sgd", "optim.lr=0.05", "optim.grad_clip=0.5"]
"""LoRA's runs: the gradient norm (~1.5 at the first step) is computed over the 2-D mesh's shards and clips every
step; SGD's step is proportional to the clipped gradient, so a norm counting a replica twice would show (Adam's
update is almost invariant to the gradient's scale)."""


def hsdp_overrides(out_dir, method: str, mesh: list[int] | None) -> list[str]:
    extra = [] if mesh is None else [f"dist.mesh=[{mesh[0]}, {mesh[1]}]"]
    return overrides(out_dir, "single" if mesh is None else "fsdp2", method) + \
        (CLIPPED_SGD if method == "lora" else []) + extra


def train_on_meshes(rank: int, world: int, port: int, runs: list[tuple[str, list[str]]], batches, out_dir: str,
                    straight: list[str], resumed: list[str], batches_to_resume):
    """A spawned rank: each run on this rank's contiguous share of every global batch; per rank, the bytes FSDP2
    stores for it (local shards of the frozen and trainable parameters, Adam state after training) and the ranks of
    its shard group; rank 0 saves the full adapters. Then ``straight`` uninterrupted, and ``resumed`` interrupted
    before step 3 and resumed (test_resume_engines' protocol)."""
    from dist_workers import init_gloo
    from launcher.env import read_dist_env
    from peft_dist.memory.profiler import local_bytes, state_bytes
    from peft_dist.train.trainer import Trainer
    from resume_workers import run_trainer

    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    share = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in batches]
    held = {}
    for name, ov in runs:
        trainer = Trainer(load_config(None, ov), read_dist_env(), torch.device("cpu"), share, share)
        trainer.fit()
        module, optimizer = trainer.engine.module, trainer.engine.optimizer
        mesh = next(module.parameters()).device_mesh
        held[name] = {
            "frozen": sum(local_bytes(p) for p in module.parameters() if not p.requires_grad),
            "trainable": sum(local_bytes(p) for p in module.parameters() if p.requires_grad),
            "moments": sum(local_bytes(v) for s in optimizer.state.values() for k, v in s.items()
                           if k in ("exp_avg", "exp_avg_sq")),
            "optimizer_state": state_bytes(module, optimizer)["optimizer_state_bytes"],  # with Adam's step counts
            "shard_group": mesh["shard"].mesh.tolist(),
            "replicate_group": mesh["replicate"].mesh.tolist(),
        }
        adapters = trainer.engine.state_dict()  # a collective: every rank calls it
        if rank == 0:
            torch.save(adapters, Path(out_dir) / f"{name}.pt")
    (Path(out_dir) / f"held.rank{rank}.json").write_text(json.dumps(held))
    run_trainer(rank, world, straight, batches_to_resume)
    run_trainer(rank, world, resumed, batches_to_resume, stop_before=3)
    run_trainer(rank, world, resumed + ["train.resume=auto"], batches_to_resume)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("hsdp")
    runs = [(f"{method}-{label}", hsdp_overrides(out / f"{method}-{label}", method, MESHES[label]))
            for method, label in RUNS]
    mesh = "dist.mesh=[2, 2]"
    straight, resumed = (run_overrides(out / name, "fsdp2", mesh) for name in ("straight", "resumed"))
    spawn(4, train_on_meshes, runs, global_batches(), str(out), straight, resumed, resume_batches())
    held = [json.loads((out / f"held.rank{r}.json").read_text()) for r in range(4)]
    return {"out": out, "held": held, "runs": dict(runs)}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    results = {}
    for method in METHODS:
        train_shard_of_global_batches(0, 1, 0, hsdp_overrides(out / method, method, None), global_batches(),
                                      str(out / f"{method}.pt"))
        results[method] = torch.load(out / f"{method}.pt", weights_only=True)
        results[method]["initial"] = initial_trainable(method, out / f"{method}-init")
    return results


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method, label", RUNS)
def test_hsdp_trains_the_adapters_of_one_process(four_ranks, single_process, method, label):
    got = torch.load(four_ranks["out"] / f"{method}-{label}.pt", weights_only=True)
    want = single_process[method]
    assert_same_adapters(got, want["adapters"], want["initial"], f"hsdp {label}/{method}")


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_shard_groups_are_consecutive_ranks(four_ranks):
    """Row-major layout: on 2 nodes of 2 ranks, node 0 (ranks 0, 1) and node 1 (ranks 2, 3) each hold one copy of
    the sharded model; rank r's replica is rank r +/- 2, on the other node."""
    groups = [h["lora-2x2"] for h in four_ranks["held"]]
    assert [g["shard_group"] for g in groups] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [g["replicate_group"] for g in groups] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [h["lora-4x1"]["shard_group"] for h in four_ranks["held"]] == [[0], [1], [2], [3]]


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_resumed_run_on_a_2x2_mesh_ends_bitwise_equal_to_an_uninterrupted_one(four_ranks):
    """The checkpoint gathers full tensors from the 2-D mesh; the resumed run reshards them onto it."""
    out = four_ranks["out"]
    final = out / "resumed" / "checkpoints" / "step-00000004"
    assert_same_checkpoint(out / "straight" / "checkpoints" / "step-00000004", final)
    assert ckpt.read_manifest(final)["world_size"] == 4
    steps = [json.loads(line)["step"] for line in (out / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # step 4 followed the resumed step 2, not a re-run of steps 1-2


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["snell"])  # LoRA's sharding is the same mechanism (its run uses SGD)
def test_dry_run_and_estimator_report_what_fsdp2_stores_on_a_2x2_mesh(four_ranks, method):
    from peft_dist.memory.estimator import estimate

    measured = [h[f"{method}-2x2"] for h in four_ranks["held"]]
    # the mesh matters: a replica holds twice the shard of the 1-D 4-rank layout
    assert measured[0]["frozen"] == measured[2]["frozen"] and measured[1]["frozen"] == measured[3]["frozen"]
    cfg = load_config(None, four_ranks["runs"][f"{method}-2x2"])
    report = dry_run(cfg, 4)
    assert report["mesh"] == [2, 2]
    for rank, (dry, real) in enumerate(zip(report["ranks"], measured)):
        assert (dry["params_frozen"], dry["params_trainable"]) == (real["frozen"], real["trainable"]), f"rank {rank}"
        if cfg.optim.name == "adamw":  # the dry run counts Adam's two moments
            assert dry["optimizer_state"] == real["moments"] > 0, f"rank {rank}"
    estimated = estimate(load_config(None, four_ranks["runs"][f"{method}-2x2"]), 4, device="cpu",
                         eval_batch_size=0)
    assert (estimated.params_frozen_bytes, estimated.params_trainable_bytes, estimated.optimizer_state_bytes) == \
        (measured[0]["frozen"], measured[0]["trainable"], measured[0]["optimizer_state"])  # it traces rank 0


TINY_SNELL_FSDP2 = ["model.name=vit_tiny_patch16_224", "model.num_classes=5",
                    "model.kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}",
                    "data.source=synthetic", "method.name=snell", "method.rank=8", "dist.engine=fsdp2"]


def test_dry_run_of_8_nodes_holds_per_rank_what_one_node_of_8_holds():
    """dist.mesh=[8, 8] on 64 ranks: each rank stores the shard an 8-rank run stores (frozen weights, adapters,
    gradients, Adam state all divided by 8, not 64), identical on the 8 replicas of each shard."""
    hsdp = dry_run(load_config(None, TINY_SNELL_FSDP2 + ["dist.mesh=[8, 8]"]), 64)["ranks"]
    one_node = dry_run(load_config(None, TINY_SNELL_FSDP2), 8)["ranks"]
    assert hsdp == [one_node[r % 8] for r in range(64)]


@pytest.mark.parametrize("overrides, world, message", [
    (["dist.mesh=[8, 8]"], 32,
     "dist.mesh: got [8, 8] (64 ranks) for a world size of 32; allowed: [replicate, shard] whose product is 32, "
     "e.g. [4, 8]"),
    (["dist.mesh=[2, 2, 2]"], 8,
     "dist.mesh: got [2, 2, 2]; allowed: null or [replicate, shard], two positive integers, e.g. [2, 8] for 2 nodes "
     "of 8 GPUs"),
    (["dist.mesh=[0, 8]"], 8,
     "dist.mesh: got [0, 8]; allowed: null or [replicate, shard], two positive integers, e.g. [2, 8] for 2 nodes "
     "of 8 GPUs"),
    (["dist.mesh=[2, 4]", "dist.engine=ddp"], 8,
     "dist.mesh: got [2, 4] with dist.engine=ddp; allowed: null, or a [replicate, shard] mesh with dist.engine=fsdp2"),
    (["dist.mesh=[2, 4]", "dist.shard_backbone=false"], 8,
     "dist.mesh: got [2, 4] with dist.shard_backbone=false (replicate every parameter); allowed: a shard size of 1, "
     "e.g. [8, 1], or dist.shard_backbone=true"),
])
def test_a_bad_mesh_fails_in_one_line_naming_dist_mesh(overrides, world, message):
    ov = [o for o in TINY_SNELL_FSDP2 if not o.startswith("dist.engine")]
    ov += [] if any(o.startswith("dist.engine") for o in overrides) else ["dist.engine=fsdp2"]
    with pytest.raises(ConfigError) as e:
        dry_run(load_config(None, ov + overrides), world)
    assert str(e.value) == message
