"""Sharded initialization (dist.init=sharded, fsdp2): the model is built on meta, sharded, and each rank fills only
its shards, with exactly the values of the plain CPU build of the same seed (random init, every method) or of the
checkpoint; per rank, start-up host memory is about one shard of ViT-B, against more than the whole model when
every rank builds it in full (dist.init=full). Budget: about 90 s on 2 idle cores."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import peft_dist
from conftest import TINY_VIT, free_port, spawn_two_ranks
from sharded_init_workers import full_values_after_build, startup_peak_memory

TINY = ["model.name=vit_tiny_patch16_224", "model.num_classes=5",
        "model.kwargs={" + ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()) + "}", "data.img_size=32"]


def plain_build(overrides):
    from peft_dist.config import load_config
    from peft_dist.train.trainer import build_model

    model, _ = build_model(load_config(None, overrides + ["dist.engine=single"]))
    return model.state_dict()


@pytest.mark.parametrize("method", [m for m in peft_dist.method_names() if not m.startswith("spt")])
def test_replay_gives_the_plain_build_and_rng(method):
    """One process, no sharding: the recorded meta build replayed on CPU equals the plain build bit for bit, and
    leaves torch's RNG where the plain build does (dropout, later draws)."""
    from peft_dist.config import load_config
    from peft_dist.models.materialize import is_deferred, materialize
    from peft_dist.train.trainer import build_model

    overrides = TINY + [f"method.name={method}"]
    expected = plain_build(overrides)
    rng_after_plain = torch.get_rng_state()
    model, _ = build_model(load_config(None, overrides + ["dist.engine=fsdp2"]), on_meta_for_engine=True)
    assert is_deferred(model) and all(p.is_meta for p in model.parameters())
    materialize(model, torch.device("cpu"))
    got = model.state_dict()
    assert got.keys() == expected.keys()
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []
    assert torch.equal(torch.get_rng_state(), rng_after_plain)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """The same weights as .safetensors, .pth and JAX-layout .npz; another head size, so the head stays random."""
    from conftest import tiny_vit
    from npz_format import vit_to_jax_npz

    folder = tmp_path_factory.mktemp("ckpt")
    model = tiny_vit(num_classes=7, seed=11)
    save_file(model.state_dict(), str(folder / "tiny.safetensors"))
    torch.save(model.state_dict(), folder / "tiny.pth")
    vit_to_jax_npz(model, folder / "tiny.npz")
    return {suffix: folder / f"tiny.{suffix}" for suffix in ("safetensors", "pth", "npz")}


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_checkpoints):
    return tiny_checkpoints["safetensors"]


@pytest.mark.parametrize("suffix", ["safetensors", "pth", "npz"])
def test_replay_loads_each_checkpoint_format_as_the_plain_build(tiny_checkpoints, suffix):
    """One process: the checkpoint read tensor by tensor during the replay gives what the plain build's whole-file
    load gives (the head and the adapters from the RNG stream, as there)."""
    from peft_dist.config import load_config
    from peft_dist.models.materialize import materialize
    from peft_dist.train.trainer import build_model

    overrides = TINY + ["method.name=lora", f"model.checkpoint={tiny_checkpoints[suffix]}"]
    expected = plain_build(overrides)
    model, _ = build_model(load_config(None, overrides + ["dist.engine=fsdp2"]), on_meta_for_engine=True)
    materialize(model, torch.device("cpu"))
    got = model.state_dict()
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []
    assert torch.equal(got["blocks.0.attn.qkv.base.weight"], load_file(str(tiny_checkpoints["safetensors"]))[
        "blocks.0.attn.qkv.weight"])


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("checkpoint", [None, "safetensors", "npz"])
def test_fsdp2_shards_gather_to_the_plain_build(tmp_path, tiny_checkpoints, checkpoint):
    """2 gloo ranks, LoRA: the shards gathered after start-up equal the 1-rank plain build (random init, or the
    checkpoint's weights, read as slices, with a random head and adapters), and a training step runs on them."""
    overrides = TINY + ["method.name=lora", "data.source=synthetic", "train.steps=1", "train.progress=false",
                        "tracking.enabled=false", f"train.out_dir={tmp_path / 'run'}"]
    if checkpoint:
        overrides.append(f"model.checkpoint={tiny_checkpoints[checkpoint]}")
    out = tmp_path / "full.safetensors"
    spawn_two_ranks(full_values_after_build, overrides + ["dist.engine=fsdp2"], str(out))
    got, expected = load_file(str(out)), plain_build(overrides)
    assert got.keys() == expected.keys()
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []
    if checkpoint:
        weights = load_file(str(tiny_checkpoints["safetensors"]))
        assert torch.equal(got["blocks.1.mlp.fc2.weight"], weights["blocks.1.mlp.fc2.weight"])


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_zero3_partitions_gather_to_the_plain_build(tmp_path, tiny_checkpoint):
    """DeepSpeed ZeRO-3 on 2 gloo ranks, LoRA, from the checkpoint: the parameters are partitioned as the replay
    fills them (zero.Init's conversion), and gathered after start-up they equal the 1-rank plain build; a training
    step runs."""
    overrides = TINY + ["method.name=lora", "data.source=synthetic", "train.steps=1", "train.progress=false",
                        "tracking.enabled=false", f"train.out_dir={tmp_path / 'run'}", f"model.checkpoint={tiny_checkpoint}",
                        "data.batch_size=1"]
    out = tmp_path / "full.safetensors"
    spawn_two_ranks(full_values_after_build, overrides + ["dist.engine=deepspeed", "dist.zero_stage=3"], str(out))
    got, expected = load_file(str(out)), plain_build(overrides)
    assert got.keys() == expected.keys()
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []


def test_bad_init_value_is_one_line():
    from peft_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^dist.init: got 'half'; allowed: 'sharded', 'full'$"):
        load_config(None, ["dist.init=half"])


VIT_B_BYTES = 86_567_656 * 4  # vit_base_patch16_224 with a 1000-class head, fp32 (344 MB)


@pytest.fixture(scope="module")
def vit_b_checkpoint(tmp_path_factory):
    import timm

    path = tmp_path_factory.mktemp("vitb") / "vit_b.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model("vit_base_patch16_224", pretrained=False).state_dict(), str(path))
    return path


def run_four_ranks(worker, *args):
    import torch.multiprocessing as mp

    mp.start_processes(worker, args=(4, free_port(), *args), nprocs=4, join=True, start_method="spawn")


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_vit_b_startup_memory_per_rank(tmp_path, vit_b_checkpoint):
    """ViT-B/16 from a local safetensors file on 4 gloo ranks, LoRA: each rank's peak RSS increase during start-up
    is about a quarter of the model plus overhead, well below the model, and its shards equal the file's slices;
    with dist.init=full every rank's increase exceeds the whole model. One training step runs either way."""
    # 32x32 images: the step stays cheap on 2 cores, and the file's 224-pixel position embedding goes through timm's
    # resize filter (a tensor converted whole); the weights are ViT-B's all the same
    base = ["model.name=vit_base_patch16_224", "model.num_classes=10", "model.kwargs={img_size: 32}",
            "data.img_size=32", "method.name=lora",
            "dist.engine=fsdp2", f"model.checkpoint={vit_b_checkpoint}", "train.steps=1", "train.progress=false",
            "tracking.enabled=false", "memory.enabled=false"]
    figures = {}
    for init in ("sharded", "full"):
        out = tmp_path / init
        run_four_ranks(startup_peak_memory, base + [f"dist.init={init}", f"train.out_dir={tmp_path / init}-run"],
                       str(vit_b_checkpoint), str(out))
        figures[init] = [json.loads(open(f"{out}.rank{r}").read()) for r in range(4)]
    print("ViT-B start-up peak RSS increase per rank (MiB):",
          {k: [round(r["peak_increase_mib"]) for r in v] for k, v in figures.items()})
    model_mib = VIT_B_BYTES / 2**20
    for r in figures["sharded"]:
        assert r["mismatched"] == []
        assert r["peak_increase_mib"] < 0.25 * model_mib + 80, r  # a quarter + the largest tensors + overhead
    for r in figures["full"]:
        assert r["mismatched"] == []
        assert r["peak_increase_mib"] > model_mib, r
