"""``train.ema_decay`` (issue 16): SNELLA's FGVC model EMA, kept over the trainable tensors only. References: timm's
own ModelEmaV2 driven by hand over the same trajectory, an evaluation written out here, an uninterrupted run, one
process. Budget: about 20 s on 2 idle cores (one 2-rank spawn)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import stop_before_step
from launcher.env import DistEnv
from peft_dist.train.trainer import Trainer
from test_baselines import fixed_batches, tiny_cfg

EMA = ["train.ema_decay=0.6", "train.log_every=1", "optim.lr=1e-2", "data.batch_size=4", "memory.enabled=false"]
"""A fast decay, so that the average is far from the live adapters after a few steps (the recipes use 0.9999)."""


def trainable(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


class Holder(torch.nn.Module):
    """The trainable tensors as a module of their own, for timm's EMA class (its keys do not matter: it zips)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for i, t in enumerate(tensors.values()):
            self.register_parameter(f"p{i}", torch.nn.Parameter(t.clone()))


def test_ema_follows_timms_model_ema_over_the_trainable_tensors_only(tmp_path):
    from timm.utils import ModelEmaV2

    batches = fixed_batches(n=2, bs=4)
    trainer = Trainer(tiny_cfg(tmp_path, "lora", *EMA, "train.steps=6"), DistEnv(), torch.device("cpu"),
                      batches, batches)
    reference = ModelEmaV2(Holder(trainable(trainer)), decay=0.6)
    engine_step = trainer.engine.step

    def observed_step(step):
        lr = engine_step(step)
        reference.update(Holder(trainable(trainer)))
        return lr

    trainer.engine.step = observed_step
    trainer.fit()
    live = trainable(trainer)
    assert list(trainer.ema.averages) == list(live)  # the trainable tensors, and nothing of the frozen backbone
    assert sum(a.numel() for a in trainer.ema.averages.values()) == trainer.param_counts["trainable_params"]
    for (name, average), want in zip(trainer.ema.averages.items(), reference.module.parameters()):
        assert average.dtype == torch.float32
        torch.testing.assert_close(average, want.detach(), rtol=1e-6, atol=1e-8, msg=name)
        assert not torch.allclose(average, live[name]), name  # the average is not the live tensor


def test_evaluation_reports_live_ema_and_their_max_in_the_summary_and_metrics(tmp_path):
    """(MLflow gets the same ``eval_top1*`` values from the same dict; a tracking store costs 4 s, left out.)"""
    from peft_dist.train.trainer import build_model

    batches, evals = fixed_batches(n=2, bs=4), fixed_batches(n=2, bs=4, seed=3)
    cfg = tiny_cfg(tmp_path, "lora", *EMA, "train.steps=6", "train.eval_every_epochs=1", "train.protocol=paper")
    trainer = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, evals)
    summary = trainer.fit()

    def top1(model):  # the eval split, counted here
        model.eval()
        with torch.no_grad():
            return sum(int((model(x).argmax(-1) == y).sum()) for x, y in evals) / sum(len(y) for _, y in evals)

    model, _ = build_model(cfg)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, average in trainer.ema.averages.items():
            params[name].copy_(average)
    assert summary["top1_ema"] == top1(model)
    assert summary["top1"] == top1(trainer.model)  # the live adapters are back after the EMA's evaluation
    assert summary["top1_max"] == max(summary["top1"], summary["top1_ema"])
    history = summary["eval_history"]
    assert len(history) == 3 and all(e["top1_max"] == max(e["top1"], e["top1_ema"]) for e in history)
    assert summary["top1_paper_protocol"] == max(e["top1_max"] for e in history)
    records = [json.loads(line) for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "eval_top1_ema" in r]
    assert [(r["step"], r["eval_top1"], r["eval_top1_ema"], r["eval_top1_max"]) for r in evaluated] == \
        [(e["step"], e["top1"], e["top1_ema"], e["top1_max"]) for e in history]


def test_ema_resume_is_bitwise(tmp_path):
    batches = fixed_batches(n=2, bs=4)

    def run(name, *extra, stop_before=None):
        cfg = tiny_cfg(tmp_path / name, "lora", *EMA, "train.steps=6", "train.save_every_steps=3", *extra)
        trainer = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches)
        if stop_before is not None:
            stop_before_step(trainer, stop_before)
        trainer.fit()
        return trainer

    straight = run("straight")
    with pytest.raises(KeyboardInterrupt):
        run("resumed", stop_before=4)
    assert (tmp_path / "resumed/lora/checkpoints/step-00000003/ema.safetensors").is_file()
    resumed = run("resumed", "train.resume=auto")
    assert resumed.start_step == 3
    for name, average in straight.ema.averages.items():
        assert torch.equal(resumed.ema.averages[name], average), name
    reference = straight.engine.state_dict()
    for name, tensor in resumed.engine.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def fsdp2_ranks(rank: int, world: int, port: int, overrides: list[str], batches, out_file: str) -> None:
    """The EMA run under fsdp2; rank 0 saves the gathered averages, the summary and how each average is laid out."""
    from dist_workers import init_gloo
    from launcher.env import read_dist_env
    from peft_dist.config import load_config

    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    try:
        share = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in batches]
        trainer = Trainer(load_config(None, overrides), read_dist_env(), torch.device("cpu"), share, share)
        summary = trainer.fit()
        params = dict(trainer.engine.module.named_parameters())
        layout = {n: (type(a).__name__, a.placements == params[n].placements, tuple(a.to_local().shape))
                  for n, a in trainer.ema.averages.items()}
        averages = trainer.ema.full_tensors()  # collective
        if rank == 0:  # tensors as safetensors, the rest as JSON: nothing pickled
            save_file({n: a.contiguous() for n, a in averages.items()}, out_file + ".safetensors")
            with open(out_file + ".json", "w") as f:
                json.dump({"layout": layout, "top1_ema": summary["top1_ema"],
                           "shapes": {n: list(p.to_local().shape) for n, p in params.items() if p.requires_grad}}, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_fsdp2_keeps_the_ema_sharded_like_its_parameters_and_equal_to_one_process(tmp_path):
    from conftest import TINY_VIT, spawn_two_ranks

    batches = fixed_batches(n=2, bs=8)
    extra = [*EMA, "data.batch_size=8", "train.steps=3", "optim.name=sgd", "optim.lr=0.1"]
    one = Trainer(tiny_cfg(tmp_path / "one", "lora", *extra), DistEnv(), torch.device("cpu"), batches, batches)
    one_summary = one.fit()
    kw = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()) + "}"
    overrides = ["model.name=vit_tiny_patch16_224", "model.num_classes=5", f"model.kwargs={kw}",
                 "data.source=synthetic", "method.name=lora", "train.progress=false", "tracking.enabled=false",
                 "optim.weight_decay=0.01", *extra, "dist.engine=fsdp2",
                 f"train.out_dir={tmp_path / 'two'}"]  # tiny_cfg's settings
    spawn_two_ranks(fsdp2_ranks, overrides, batches, str(tmp_path / "two"))
    two = json.loads((tmp_path / "two.json").read_text())
    averages = load_file(tmp_path / "two.safetensors")
    for name, (kind, same_placement, local_shape) in two["layout"].items():
        assert kind == "DTensor" and same_placement and local_shape == two["shapes"][name], name
    assert two["top1_ema"] == one_summary["top1_ema"]
    for name, average in one.ema.averages.items():
        torch.testing.assert_close(averages[name], average, rtol=1e-5, atol=1e-6, msg=name)
