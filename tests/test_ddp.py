"""Parity: same seed and global batches → 2 gloo ranks under ddp, fsdp2, DeepSpeed ZeRO-1/2/3 and fairscale OSS end
with the adapters of 1 process, for lora, snell and snella (fp32; rtol 1e-4, atol 1e-5: Adam turns reduction-order noise in a near-zero gradient into up to
~1e-5 of an lr-5e-3 step). SNELLA's allocation is
the single process's on every rank."""
import pytest
import torch

from conftest import TINY_VIT, spawn_two_ranks
from dist_workers import train_methods_on_shards, train_shard_of_global_batches
from launcher.env import DistEnv
from peft_dist.config import load_config
from peft_dist.train.trainer import Trainer

# one worker for the file under xdist: every test compares with the module's single-process run, which each worker
# would otherwise train again
pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("test_ddp")]

METHODS = ("lora", "snell", "snella")
ENGINES = ("ddp", "fsdp2", "deepspeed-1", "deepspeed-2", "deepspeed-3", "fairscale_oss")
TOLERANCE = dict(rtol=1e-4, atol=1e-5)
MIXK_SCALARS_AT_ONE = (".alpha", ".gamma")


def global_batches(batches=2, bs=8):
    """2 global batches per epoch and 4 steps: SNELLA reallocates at the second epoch's start."""
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(bs, 3, 32, 32, generator=g), torch.randint(0, 5, (bs,), generator=g))
            for _ in range(batches)]


def overrides(out_dir, engine, method):
    kw = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()) + "}"
    ov = ["model.name=vit_tiny_patch16_224", "model.num_classes=5", f"model.kwargs={kw}", "data.source=synthetic",
          f"method.name={method}", f"train.out_dir={out_dir}", "train.progress=false", "tracking.enabled=false",
          "optim.lr=5e-3", "optim.warmup_steps=1", "train.steps=4", "train.log_every=2"]
    if engine.startswith("deepspeed"):
        ov += ["dist.engine=deepspeed", f"dist.zero_stage={engine[-1]}"]
    else:
        ov.append(f"dist.engine={engine}")
    if method == "lora":
        ov.append("method.targets=[q, k, v, proj, fc1, fc2]")
    if method.startswith("snell"):
        ov += ["method.mode=merged", "method.rank=4"]  # merged: no adapter dropout, so ranks draw no randomness
    # Adam normalises each entry's gradient, so an entry whose true gradient is ~0 moves by a step-sized amount set by
    # reduction-order noise: BitFit's k-slice of the qkv bias (softmax is invariant to it) and a few MixK entries of
    # SNELLA differ by up to 1.6e-4 after 4 steps. Those runs compare under SGD, where noise stays noise-sized.
    if method == "snella":
        ov += ["method.target_ratio=0.5", "method.init_sparsity=0.2", "optim.name=sgd", "optim.lr=0.05"]
    if method == "bitfit":
        ov.append("optim.name=sgd")
    return ov


def initial_trainable(method: str, out_dir) -> dict[str, torch.Tensor]:
    """The trainable tensors as a run starts them: a single-process Trainer built and not fitted (its model is
    seeded before creation, so every rank and engine starts from the same values)."""
    batches = global_batches()
    trainer = Trainer(load_config(None, overrides(out_dir, "single", method)), DistEnv(), torch.device("cpu"),
                      batches, batches)
    names = {n for n, p in trainer.engine.module.named_parameters() if p.requires_grad}
    return {k: v.clone() for k, v in trainer.engine.state_dict().items() if k in names}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    results = {}
    for method in (*METHODS, "bitfit"):
        train_shard_of_global_batches(0, 1, 0, overrides(out / method, "single", method), global_batches(),
                                      str(out / f"{method}.pt"))
        results[method] = torch.load(out / f"{method}.pt", weights_only=True)
        results[method]["initial"] = initial_trainable(method, out / f"{method}-init")
    return results


def assert_same_adapters(got: dict, want: dict, initial: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOLERANCE, msg=lambda m, k=k: f"{what} {k}: {m}")
    # the adapters actually trained: every trainable tensor differs from its value at init, in both runs. A
    # "non-zero" test would prove nothing for SNELL, whose B (and every A) is non-zero before the first step.
    assert initial and initial.keys() <= want.keys(), what
    unchanged = {k for k, v in initial.items() if torch.equal(want[k], v) or torch.equal(got[k], v)}
    # except SNELLA's MixK α and γ one by one: both start at 1.0 with gradients of 1e-9..1e-6 here, so an SGD step
    # of lr 0.05 is below half an fp32 ulp of 1.0 (6e-8) for some matrices and leaves them exactly at 1.0; each
    # kind must still move somewhere
    strict = sorted(k for k in unchanged if not k.endswith(MIXK_SCALARS_AT_ONE))
    assert not strict, f"{what}: still at their initial values: {strict}"
    for suffix in MIXK_SCALARS_AT_ONE:
        scalars = {k for k in initial if k.endswith(suffix)}
        assert not scalars or scalars - unchanged, f"{what}: no {suffix} moved"


def run_two_ranks(tmp_path, runs):
    spawn_two_ranks(train_methods_on_shards, runs, global_batches())
    return [torch.load(out, weights_only=True) for _, out in runs]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", ENGINES)
def test_two_ranks_equal_single_process(tmp_path, single_process, engine):
    runs = [(overrides(tmp_path / method, engine, method), str(tmp_path / f"{method}.pt")) for method in METHODS]
    for method, got in zip(METHODS, run_two_ranks(tmp_path, runs)):
        want = single_process[method]
        if method == "snella":
            allocation = want["allocation"]
            assert len(set(allocation.tolist())) > 1, "the allocator did not differentiate the matrices"
            for rank_allocation in got["allocation_per_rank"]:
                torch.testing.assert_close(rank_allocation, allocation, rtol=0, atol=1e-12)
        assert_same_adapters(got["adapters"], want["adapters"], want["initial"], f"{engine}/{method}")


@pytest.mark.timeout(120)
def test_bitfit_under_fsdp2(tmp_path, single_process):
    (got,) = run_two_ranks(tmp_path, [(overrides(tmp_path / "bitfit", "fsdp2", "bitfit"), str(tmp_path / "b.pt"))])
    want = single_process["bitfit"]
    assert_same_adapters(got["adapters"], want["adapters"], want["initial"], "fsdp2/bitfit")
