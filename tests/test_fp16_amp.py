"""``train.precision: fp16`` (issue 16): fp16 autocast with torch's gradient scaler, as SNELLA's ``--amp`` scripts
train (timm's NativeScaler: scaled backward, unscale before clipping, scaler step and update). On CPU, which torch
2.14 and 2.15 autocast to fp16 as well. References: a hand-written fp16 step, an uninterrupted run, one process.
Budget: about 15 s on 2 idle cores (one 2-rank spawn)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import stop_before_step
from launcher.env import DistEnv
from peft_dist.config import ConfigError
from peft_dist.train.trainer import Trainer
from test_baselines import fixed_batches, tiny_cfg

FP16 = ["train.precision=fp16", "train.log_every=1", "optim.lr=1e-2", "data.batch_size=4", "memory.enabled=false"]


def poison_gradient_once(param: torch.nn.Parameter, at_call: int) -> None:
    """Make ``param``'s gradient infinite in its ``at_call``-th backward (1-based): an fp16 overflow, forced."""
    calls = [0]

    def hook(grad):
        calls[0] += 1
        return grad * float("inf") if calls[0] == at_call else grad

    param.register_hook(hook)


def trainable(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_fp16_trains_fp32_adapters_and_a_forced_overflow_is_skipped_by_the_scaler(tmp_path):
    batches = fixed_batches(n=2, bs=4)
    trainer = Trainer(tiny_cfg(tmp_path, "lora", *FP16, "train.steps=8"), DistEnv(), torch.device("cpu"),
                      batches, batches)
    poison_gradient_once(trainer.model.head.weight, at_call=4)
    after_each_step, engine_step = [], trainer.engine.step

    def observed_step(step):
        lr = engine_step(step)
        after_each_step.append(trainable(trainer))
        return lr

    trainer.engine.step = observed_step
    before = trainable(trainer)
    summary = trainer.fit()

    assert summary["status"] == "finished" and summary["precision"] == "fp16"
    assert summary["nonfinite_steps_skipped"] == 0  # the trainer's divergence guard never saw the overflow
    states = [before] + after_each_step
    unchanged = [step + 1 for step in range(8) if all(torch.equal(states[step][n], states[step + 1][n]) for n in before)]
    assert 4 in unchanged  # the forced overflow; at lr 1e-2 a real one follows (step 6), skipped the same way
    skipped = summary["fp16_scaler"]["skipped_steps"]
    assert skipped == len(unchanged) and summary["fp16_scaler"]["final_scale"] == 65536.0 / 2 ** skipped
    assert all(p.dtype == torch.float32 for p in after_each_step[-1].values())
    losses = [json.loads(line)["loss"] for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0], losses


def test_clipping_sees_the_unscaled_gradient(tmp_path):
    """One fp16 SGD step with a clip norm far below the gradient's: the update is the clipped *true* gradient
    (clipping the scaled one would shrink it by the scale, 2^16)."""
    from peft_dist.train.trainer import build_model

    x, y = fixed_batches(n=1, bs=4)[0]
    cfg = tiny_cfg(tmp_path, "lora", *FP16, "train.steps=1", "optim.name=sgd", "optim.momentum=0",
                   "optim.weight_decay=0", "optim.grad_clip=0.01")
    trainer = Trainer(cfg, DistEnv(), torch.device("cpu"), [(x, y)], [(x, y)])
    before = trainable(trainer)
    trainer.engine.forward_backward(x, y)
    trainer.engine.step(0)
    got = {n: p.detach() - before[n] for n, p in trainer.model.named_parameters() if p.requires_grad}

    model, _ = build_model(cfg)  # the same seed: the same initial adapters
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(params[n], before[n]) for n in before)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), 0.01)
    assert norm > 1.0  # the clip really bites
    for n, p in params.items():
        torch.testing.assert_close(got[n], -cfg.optim.lr * p.grad, rtol=2e-3, atol=1e-7, msg=n)


def test_fp16_resume_is_bitwise_and_restores_the_scaler(tmp_path):
    batches = fixed_batches(n=2, bs=4)

    def run(name, *extra, stop_before=None):
        cfg = tiny_cfg(tmp_path / name, "lora", *FP16, "train.steps=6", "train.save_every_steps=3", *extra)
        trainer = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches)
        if not trainer.start_step:
            poison_gradient_once(trainer.model.head.weight, at_call=2)  # the scale differs from its default
        if stop_before is not None:
            stop_before_step(trainer, stop_before)
        return trainer, trainer.fit()

    straight, want = run("straight")
    with pytest.raises(KeyboardInterrupt):
        run("resumed", stop_before=4)
    manifest = json.loads((tmp_path / "resumed/lora/checkpoints/step-00000003/manifest.json").read_text())
    assert manifest["scaler"]["scale"] == 32768.0 and manifest["scaler"]["skipped_steps"] == 1
    resumed, got = run("resumed", "train.resume=auto")
    assert resumed.start_step == 3
    assert got["fp16_scaler"] == want["fp16_scaler"] == {"skipped_steps": 1, "final_scale": 32768.0}
    reference = straight.engine.state_dict()
    for name, tensor in resumed.engine.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_fp16_under_a_sharded_optimizer_is_one_line(tmp_path):
    """Refused before the engine wraps anything (no process group needed to see it)."""
    from peft_dist.engines.fairscale_oss import FairscaleOSSEngine

    cfg = tiny_cfg(tmp_path, "lora", "train.precision=fp16", "dist.engine=fairscale_oss")
    with pytest.raises(ConfigError, match=r"^train\.precision=fp16: not available with dist\.engine=fairscale_oss"
                       ) as e:
        FairscaleOSSEngine(torch.nn.Linear(2, 2), None, cfg, DistEnv(), torch.device("cpu"), 1, 0)
    assert "\n" not in str(e.value)


def poison_local_shard_before_step(trainer, at_step: int) -> None:
    """Under FSDP2: an inf in this rank's shard of one gradient, after the reduce-scatter, before step ``at_step``
    (1-based); the other rank's shard stays finite, so only a check reduced over the mesh skips on both."""
    engine_step = trainer.engine.step

    def step(index):
        if index + 1 == at_step:
            grad = next(p.grad for p in trainer.engine.module.parameters() if p.grad is not None
                        and p.grad.to_local().numel())
            grad.to_local().view(-1)[0] = float("inf")
        return engine_step(index)

    trainer.engine.step = step


def data_parallel_ranks(rank: int, world: int, port: int, overrides: list[str], batches, out_file: str) -> None:
    """The same fp16 run under ddp, then fsdp2; rank 0 saves each one's adapters and scaler summary."""
    from dist_workers import init_gloo
    from launcher.env import read_dist_env
    from peft_dist.config import load_config

    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    try:
        share = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in batches]
        results, adapters = {}, {}
        for engine in ("ddp", "fsdp2"):
            cfg = load_config(None, [*overrides, f"dist.engine={engine}", f"train.out_dir={out_file}.{engine}"])
            trainer = Trainer(cfg, read_dist_env(), torch.device("cpu"), share, share)
            if engine == "ddp" and rank == 0:  # before DDP's all-reduce, which spreads the inf to both ranks
                poison_gradient_once(trainer.model.head.weight, at_call=2)
            if engine == "fsdp2" and rank == 0:
                poison_local_shard_before_step(trainer, at_step=2)
            seen = []
            qkv = next(m for n, m in trainer.model.named_modules() if n.endswith("blocks.0.attn.qkv"))
            qkv.register_forward_hook(lambda module, args, out: seen.append(str(out.dtype)))
            summary = trainer.fit()
            adapters[engine] = trainer.engine.state_dict()
            results[engine] = {"scaler": summary["fp16_scaler"], "qkv_output_dtypes": sorted(set(seen))}
        if rank == 0:  # tensors as safetensors, the rest as JSON: nothing pickled
            save_file({f"{engine}/{n}": t.contiguous() for engine, state in adapters.items() for n, t in state.items()},
                      out_file + ".safetensors")
            with open(out_file + ".json", "w") as f:
                json.dump(results, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_fp16_ddp_and_fsdp2_on_two_ranks_equal_one_process(tmp_path):
    """3 steps: the 4th overflows on its own under DDP (a rank's loss is the mean of 4 images, not 8, so its fp16
    gradients are twice the single process's; the scaler skips it, as it should) and the runs part ways there."""
    from conftest import TINY_VIT, spawn_two_ranks

    batches = fixed_batches(n=2, bs=8)
    # SGD: Adam's first steps move every entry by ~lr whatever its gradient's size, so fp16 rounding of a near-zero
    # gradient (LoRA's B starts at 0) flips whole updates; SGD's update is the gradient, rounding and all
    extra = [*FP16, "data.batch_size=8", "train.steps=3", "optim.name=sgd", "optim.lr=0.1"]
    one = Trainer(tiny_cfg(tmp_path / "one", "lora", *extra), DistEnv(), torch.device("cpu"), batches, batches)
    poison_gradient_once(one.model.head.weight, at_call=2)
    one_summary = one.fit()
    kw = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()) + "}"
    overrides = ["model.name=vit_tiny_patch16_224", "model.num_classes=5", f"model.kwargs={kw}",
                 "data.source=synthetic", "method.name=lora", "train.progress=false", "tracking.enabled=false",
                 "optim.weight_decay=0.01", *extra]  # tiny_cfg's settings
    spawn_two_ranks(data_parallel_ranks, overrides, batches, str(tmp_path / "two"))
    two = json.loads((tmp_path / "two.json").read_text())
    tensors = load_file(tmp_path / "two.safetensors")
    for engine, run in two.items():
        assert run["qkv_output_dtypes"] == ["torch.float16"], engine  # the forward computes in fp16
        assert run["scaler"] == one_summary["fp16_scaler"] == {"skipped_steps": 1, "final_scale": 32768.0}, engine
        for name, tensor in one.engine.state_dict().items():
            torch.testing.assert_close(tensors[f"{engine}/{name}"], tensor, rtol=2e-3, atol=5e-5,
                                       msg=lambda m, name=name: f"{engine} {name}: {m}")
