"""The CPU estimator (fake tensors + torch's MemTracker) against real runs on a tiny ViT: parameter, gradient and
optimizer bytes equal the profiler's exact counts of a real engine step to the byte for every registered method, and
the estimated peak is within 15 % of the peak a real (non-fake) MemTracker run records; depth extrapolation equals a
full-depth trace byte for byte; fsdp2 on a fake world shards the frozen weights; data-dependent reads get
placeholders; engines that are modelled rather than traced; errors and the ``peft-dist memory`` command."""
import argparse
import json

import re

import pytest
import torch
import torch.distributed as dist

import peft_dist
from conftest import TINY_VIT
from launcher.env import DistEnv
from peft_dist.config import ConfigError, load_config
from peft_dist.memory.estimator import (_tracker_classes, add_memory_arguments, compute_dtype_name, estimate,
                                        estimate_for_dry_run, resolve_plan, run_memory)
from peft_dist.memory.profiler import MemoryProfiler, read_memory_json

TINY = ["model.name=vit_tiny_patch16_224", "model.num_classes=5",
        "model.kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}",
        "data.source=synthetic", "data.batch_size=4", "data.eval_batch_size=6", "tracking.enabled=false",
        "train.precision=fp32", "optim.weight_decay=0.01"]


def tiny_config(*overrides, depth=None):
    items = list(TINY)
    if depth is not None:
        items[2] = items[2].replace("depth: 2", f"depth: {depth}")
    return load_config(None, [*items, *overrides])


def _spt_options(tmp_path, structured_type):
    from peft_dist.memory.study import synthetic_spt_allocation
    from peft_dist.methods.spt_sensitivity import write_allocation

    backbone = peft_dist.create_backbone("vit_tiny_patch16_224", num_classes=5, **TINY_VIT)
    doc = synthetic_spt_allocation(backbone, structured_type, rank=4, structured_ops=("q", "v"),
                                   unstructured_per_fc1=64)
    path = write_allocation(tmp_path / f"{structured_type}.json", doc)
    return [f"method.allocation={path}", f"method.budget={doc['budgets'][0]['budget_m']}"]


def method_overrides(name, tmp_path):
    if name == "spt_lora":
        return _spt_options(tmp_path, "lora")
    if name == "spt_adapter":
        return _spt_options(tmp_path, "adapter")
    if name in ("snell", "snella"):  # a fused qkv slice and a plain matrix: every code path, a third of the ops
        return ["method.rank=4", "method.targets=[v,fc1]"]
    return []


def real_engine_run(cfg, steps=1):
    """What the trainer does (peft_dist.train.trainer.Trainer.train_step) with the single engine, on CPU."""
    from peft_dist.engines.engine import Engine
    from peft_dist.train.trainer import build_model

    model, method = build_model(cfg)
    engine = Engine(model, method, cfg, DistEnv(), torch.device("cpu"), steps, 0)
    profiler = MemoryProfiler(0, torch.device("cpu"))
    engine.phase = profiler.phase
    for step in range(steps):
        engine.forward_backward(torch.randn(cfg.data.batch_size, 3, 32, 32),
                                torch.randint(0, cfg.model.num_classes, (cfg.data.batch_size,)))
        if step == 0:
            profiler.capture_state(engine.module, engine.optimizer)
        with profiler.phase("optimizer"):
            engine.step(step)
        if step == 0:
            profiler.capture_state(engine.module, engine.optimizer)
    return profiler.finish()


@pytest.mark.timeout(300)
def test_every_method_exact_state_bytes_and_peak_within_15_percent_of_a_real_trace(tmp_path):
    names = peft_dist.method_names()
    assert {"lora", "full", "sparse_masked"} <= set(names)
    for name in names:
        cfg = tiny_config(f"method.name={name}", *method_overrides(name, tmp_path))
        measured = real_engine_run(cfg)
        fake = estimate(cfg, 1, device="cpu", eval_batch_size=0)
        real = estimate(cfg, 1, device="cpu", eval_batch_size=0, fake=False)
        for field in ("params_frozen_bytes", "params_trainable_bytes", "buffers_bytes", "grads_bytes",
                      "optimizer_state_bytes"):
            assert getattr(fake, field) == getattr(measured, field), (name, field)
            assert getattr(real, field) == getattr(measured, field), (name, field)
        assert fake.grads_bytes > 0 and fake.optimizer_state_bytes > 0, name
        assert fake.source == "estimated" and set(fake.phase_peak_allocated_bytes) == \
            {"forward", "backward", "optimizer"}, name
        ratio = fake.peak_allocated_bytes / real.peak_allocated_bytes
        assert 0.85 <= ratio <= 1.15, (name, ratio, fake.phase_peak_allocated_bytes, real.phase_peak_allocated_bytes)
        assert fake.activations_bytes == fake.peak_allocated_bytes - fake.static_bytes, name


@pytest.mark.parametrize("overrides, world, depth, traced", [
    (["method.name=full"], 1, 6, "2, 3 and 4 of 6"),
    # SNELL's (2, n, r/2) factors over 32 ranks: B (2, 192, 1) shards evenly along dim 1, A (2, 48, 1) falls back
    # to dim 0 and pads 16x; the extrapolated peaks must still equal the full trace
    (["method.name=snell", "method.rank=2", "method.mode=merged", "method.targets=[fc1]", "dist.engine=fsdp2",
      "dist.activation_checkpointing=true"], 32, 8, "(2, 3 and 4|4, 5 and 6) of 8"),  # torch 2.14: 4, 5, 6
])
def test_depth_extrapolation_equals_the_full_trace(overrides, world, depth, traced):
    cfg = tiny_config(*overrides, depth=depth)
    fast = estimate(cfg, world, device="cpu", eval_batch_size=0)
    full = estimate(cfg, world, device="cpu", eval_batch_size=0, extrapolate=False)
    assert any(re.search(f"depth extrapolation: traced {traced}", n) for n in fast.notes), fast.notes
    assert not any("extrapolation" in n for n in full.notes)
    assert fast.phase_peak_allocated_bytes == full.phase_peak_allocated_bytes
    for field in ("params_frozen_bytes", "params_trainable_bytes", "grads_bytes", "optimizer_state_bytes"):
        assert getattr(fast, field) == getattr(full, field), field
    assert fast.peak_breakdown_bytes == full.peak_breakdown_bytes


def test_fsdp2_fake_world_shards_frozen_weights_and_lowers_the_peak():
    cfg = tiny_config("method.name=lora", "dist.engine=fsdp2")
    one, four = (estimate(cfg, w, device="cpu", eval_batch_size=0) for w in (1, 4))
    assert four.world_size == 4
    # frozen weights are dim-0 sharded; tensors with dim-0 below the world size (cls_token, pos_embed) land on rank 0
    assert one.params_frozen_bytes / 4 <= four.params_frozen_bytes < one.params_frozen_bytes / 4 + 16_000
    assert four.peak_allocated_bytes < one.peak_allocated_bytes
    assert "All Gather" in four.peak_breakdown_bytes or "Unsharded Param" in four.peak_breakdown_bytes


def measure_real_buffers(rank: int, world: int, port: int, result_file: str) -> None:
    """A spawned rank: one real step of the tiny LoRA run under ddp and under DeepSpeed ZeRO-2 on gloo, recording
    what torch and DeepSpeed actually allocate: the DDP reducer's bucket sizes (its own logging data), ZeRO's
    gradient staging buffers while backward runs and once it has finished, its gradient partition, and the fp32
    master partition + Adam state after the step (counted from the optimizer's own tensors)."""
    from dist_workers import init_gloo
    from launcher.env import read_dist_env
    from peft_dist.engines import parallelize
    from peft_dist.train.trainer import build_model

    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)
    out = {}
    try:
        cfg = tiny_config("method.name=lora", "dist.engine=ddp")
        model, method = build_model(cfg)
        engine = parallelize(model, method, cfg, read_dist_env(), torch.device("cpu"), 1, 0)
        engine.forward_backward(x, y)
        sizes = engine.model._get_ddp_logging_data()["bucket_sizes"]
        out["ddp_bucket_bytes"] = sum(int(v) for v in str(sizes).split(","))

        cfg = tiny_config("method.name=lora", "dist.engine=deepspeed", "dist.zero_stage=2")
        model, method = build_model(cfg)
        engine = parallelize(model, method, cfg, read_dist_env(), torch.device("cpu"), 1, 0)
        zero = engine.optimizer
        during = []

        def staging_bytes():
            return sum(t.untyped_storage().nbytes() for b in zero.ipg_buckets.values() for t in b.buffer)

        def after_block0(module, inputs, output):  # block 0's output gradient: later blocks' hooks have run
            output.register_hook(lambda grad: during.append(staging_bytes()))

        model.blocks[0].register_forward_hook(after_block0)
        engine.forward_backward(x, y)
        out["zero_staging_during_backward"] = during
        out["zero_staging_after_backward"] = staging_bytes()
        out["zero_grad_partition_bytes"] = sum(t.numel() * t.element_size()
                                               for ts in zero.averaged_gradients.values() for t in ts)
        engine.step(0)
        master = sum(t.numel() * t.element_size() for t in zero.single_partition_of_fp32_groups)
        adam = sum(v.numel() * v.element_size() for st in zero.optimizer.state.values() for v in st.values()
                   if torch.is_tensor(v))
        out["zero_optimizer_state_bytes"] = master + adam
    finally:
        dist.destroy_process_group()
    with open(f"{result_file}.rank{rank}", "w") as f:
        json.dump(out, f)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_modelled_engines_ddp_and_deepspeed_against_their_real_buffers(tmp_path):
    """ddp and ZeRO are modelled, not traced: each modelled figure is compared with what a real 2-rank gloo run
    allocates."""
    from conftest import spawn_two_ranks

    spawn_two_ranks(measure_real_buffers, str(tmp_path / "real"))
    real = [json.loads((tmp_path / f"real.rank{r}").read_text()) for r in range(2)]
    single = estimate(tiny_config("method.name=lora"), 1, device="cpu", eval_batch_size=0)
    ddp = estimate(tiny_config("method.name=lora", "dist.engine=ddp"), 2, device="cpu", eval_batch_size=0)
    # DDP's bucket copy of the trainable gradients: as large as the reducer's real buckets, on every phase's peak
    for rank in real:
        assert rank["ddp_bucket_bytes"] == real[0]["ddp_bucket_bytes"] > 0
    buckets = real[0]["ddp_bucket_bytes"]
    assert ddp.peak_breakdown_bytes["DDP buckets (modelled)"] == buckets
    # the profiler's gradients are the parameters' .grad: the buckets are in the peak (the rest), not in grads
    assert ddp.grads_bytes == single.grads_bytes
    assert ddp.peak_allocated_bytes - single.peak_allocated_bytes == buckets
    zero2 = estimate(tiny_config("method.name=lora", "dist.engine=deepspeed", "dist.zero_stage=2"), 2, device="cpu",
                     eval_batch_size=0)
    staging = zero2.peak_breakdown_bytes["ZeRO gradient staging buffer (reduce_bucket_size, modelled)"]
    # ZeRO's flat partitions are padded for alignment: the real ones may exceed the even split by a few elements
    padding = 64 * 4
    for rank in real:
        # the staging buffer DeepSpeed really holds in backward (sized by the engine's bucket, not 5e8 elements)
        assert rank["zero_staging_during_backward"] and set(rank["zero_staging_during_backward"]) == {staging}
        assert rank["zero_staging_after_backward"] == 0  # released by ZeRO's backward epilogue
        assert 0 <= rank["zero_grad_partition_bytes"] - zero2.grads_bytes <= padding
        assert 0 <= rank["zero_optimizer_state_bytes"] - zero2.optimizer_state_bytes <= 3 * padding
    # allocated in backward, released by its epilogue: in the backward peak, not in the optimizer phase's
    assert zero2.phase_peak_allocated_bytes["backward"] >= zero2.static_bytes + staging
    assert zero2.phase_peak_allocated_bytes["optimizer"] < zero2.static_bytes + staging
    assert any("modelled (not traced)" in n for n in zero2.notes)


def test_data_dependent_reads_get_placeholders_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    Tracker, _ = _tracker_classes()
    mode = FakeTensorMode()
    tracker = Tracker(fake=True)
    with mode, tracker:
        tracker.begin_phase("forward")
        x = torch.randn(1000)
        threshold = float(x.abs().max())  # a host read: no value exists
        picked = x[x.abs() > threshold]  # a data-dependent shape
        nz = torch.nonzero(x > 0)
        kept = torch.randn(256, 256)
    assert threshold == 0.0 and picked.shape == (0,) and nz.shape == (0, 1)
    assert tracker.placeholder_reads == 1 and tracker.empty_selections == 2
    assert tracker.phase_peak["forward"] >= 4 * 1000 + 4 * 256 * 256
    assert kept.shape == (256, 256)


@pytest.mark.parametrize("overrides, world, target, message", [
    (["method.name=lora"], 2, "cuda", r"dist.engine=single but --world-size 2"),
    (["method.name=lora", "dist.engine=fsdp2", "dist.frozen_dtype=bf16"], 2, "cpu", r"dist.frozen_dtype=bf16 needs"),
    (["method.name=lora"], 0, "cuda", r"--world-size: got 0"),
    (["method.name=lora"], 1, "tpu", r"--device: got 'tpu'"),
])
def test_plan_errors_name_the_setting(overrides, world, target, message):
    with pytest.raises(ConfigError, match=message):
        resolve_plan(tiny_config(*overrides), world, target)


def test_plan_mirrors_the_engines_precision_rules():
    cfg = tiny_config("method.name=lora", "train.precision=auto", "dist.engine=fsdp2",
                      "dist.activation_checkpointing=true")
    gpu, cpu = resolve_plan(cfg, 8, "cuda"), resolve_plan(cfg, 8, "cpu")
    assert gpu.fsdp_mixed_precision and gpu.autocast_dtype is None and gpu.activation_checkpointing
    assert not cpu.fsdp_mixed_precision
    single = resolve_plan(tiny_config("method.name=lora", "train.precision=auto", "dist.activation_checkpointing=true"),
                          1, "cuda")
    assert single.autocast_dtype == torch.bfloat16 and single.activation_checkpointing  # every engine applies it
    # fp16: autocast on every engine that takes it, FSDP2 with no bf16 policy (FSDP2Engine); the others refuse
    for engine, world in (("single", 1), ("ddp", 2), ("fsdp2", 2)):
        plan = resolve_plan(tiny_config("method.name=lora", "train.precision=fp16", f"dist.engine={engine}"), world,
                            "cuda")
        assert plan.autocast_dtype == torch.float16 and not plan.fsdp_mixed_precision, engine
        assert compute_dtype_name(plan) == "fp16"
    with pytest.raises(ConfigError, match=r"^train.precision=fp16: not available with dist.engine=deepspeed"):
        resolve_plan(tiny_config("method.name=lora", "train.precision=fp16", "dist.engine=deepspeed"), 2, "cuda")


def test_memory_command_writes_a_report_and_compares_with_a_real_run(tmp_path, capsys):
    """``peft-dist memory --compare`` against the memory.json of a real one-step training run of the same
    configuration: the exact state fields agree byte for byte (ratio 1.000); activations and peak, measured on CPU
    by the profiler's live-storage tracker over 2 steps (the second holds the Adam state, as the estimate's step
    does), within 5 % (tests/test_memory_measured.py compares every method and engine)."""
    from launcher.env import DistEnv
    from peft_dist.train.trainer import train

    run = tmp_path / "run"
    train(tiny_config("method.name=lora", "data.img_size=32", "data.synthetic_samples=8", "data.synthetic_classes=5",
                      "data.num_workers=0", "train.steps=2", "train.progress=false", f"train.out_dir={run}"),
          DistEnv(), torch.device("cpu"))
    [measured] = read_memory_json(run)
    assert measured.source == "measured" and measured.optimizer_state_bytes > 0

    parser = argparse.ArgumentParser()
    add_memory_arguments(parser)
    out = tmp_path / "estimate.json"
    args = parser.parse_args([*TINY, "method.name=lora", "--device", "cpu", "--out", str(out)])
    assert run_memory(args) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"].startswith("peft-dist/memory-report") and doc["context"]["method"] == "lora"
    [report] = read_memory_json(out)
    assert set(report.phase_peak_allocated_bytes) == {"forward", "backward", "optimizer", "eval"}
    assert report.source == "estimated" and report.peak_allocated_bytes > report.static_bytes
    exact = ("params_frozen_bytes", "params_trainable_bytes", "buffers_bytes", "grads_bytes", "optimizer_state_bytes")
    for field in exact:
        assert getattr(report, field) == getattr(measured, field), field
    capsys.readouterr()
    args = parser.parse_args([*TINY, "method.name=lora", "--device", "cpu", "--compare", str(run / "memory.json")])
    assert run_memory(args) == 0
    text = capsys.readouterr().out
    assert "estimated memory: vit_tiny_patch16_224 + lora" in text and "est/meas" in text
    rows = {line.split()[0]: line.split() for line in text[text.index("est/meas"):].splitlines()[1:] if line.strip()}
    for field in exact:  # a field the run measured as 0 (this tiny ViT has no buffers) has no ratio
        assert rows[field][-1] == ("1.000" if getattr(measured, field) else "—"), rows[field]
    for field in ("activations_bytes", "peak_allocated_bytes"):
        assert 0.95 <= float(rows[field][-1]) <= 1.05, rows[field]


def test_dry_run_hook_returns_activation_figures():
    from peft_dist.memory.estimator import fake_process_group

    cfg = tiny_config("method.name=lora", "dist.engine=fsdp2")
    with fake_process_group(2):  # the dry run calls it inside its own fake group
        figures = estimate_for_dry_run(cfg, 2)
    assert figures["peak_allocated_bytes"] > figures["activations_bytes"] > 0
    assert "peak_backward_bytes" in figures


@pytest.mark.parametrize("method", [["method.name=lora"],
                                    ["method.name=snella", "method.rank=4", "method.targets=[fc1]"]])
def test_warm_up_state_equals_tracing_a_second_step(method):
    """One traced step after the warm-up optimizer step = the second of two traced steps (SNELLA keeps allocator
    statistics from its step hook, so its second step holds more than its first)."""
    from peft_dist.memory.estimator import trace_step

    cfg = tiny_config(*method)
    plan = resolve_plan(cfg, 1, "cpu")
    one = trace_step(cfg, plan, steps=1, eval_batch_size=0)
    two = trace_step(cfg, plan, steps=2, eval_batch_size=0)
    assert one.phases == two.phases and one.state == two.state


def test_deepspeed_buckets_follow_the_trainable_size_unless_the_user_sets_them(tmp_path):
    from peft_dist.engines.deepspeed_engine import deepspeed_config

    cfg = tiny_config("method.name=lora", "dist.engine=deepspeed", "dist.zero_stage=2")
    zero = deepspeed_config(cfg, 2, cuda=False, trainable_elements=3_000_000)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 3_000_000
    assert deepspeed_config(cfg, 2, False, 10)["zero_optimization"]["reduce_bucket_size"] == 2**20
    user = tmp_path / "ds.json"
    user.write_text('{"zero_optimization": {"reduce_bucket_size": 123456789}}')
    cfg = tiny_config("method.name=lora", "dist.engine=deepspeed", "dist.zero_stage=2",
                      f"dist.deepspeed_config={user}")
    zero = deepspeed_config(cfg, 2, False, 3_000_000)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 123456789 and zero["stage"] == 2


def test_explicit_attention_computes_timm_attention_and_keeps_the_attention_matrix():
    """``attention=explicit`` (the official PETL code's forward, peft_dist/memory/attention.py): the same outputs
    as timm's SDPA forward, and the estimate's peak grows by the B×H×N×N softmax output each block keeps for
    backward (less SDPA's own saved output and log-sum-exp), counted the same by fake and real tensors."""
    from peft_dist.memory.attention import use_attention

    model = peft_dist.create_backbone("vit_tiny_patch16_224", num_classes=5, **TINY_VIT).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    sdpa = model(x)
    assert use_attention(model, "explicit") == TINY_VIT["depth"]
    torch.testing.assert_close(model(x), sdpa)
    use_attention(model, "sdpa")
    assert "forward" not in vars(model.blocks[0].attn)
    with pytest.raises(ValueError, match="allowed: sdpa, explicit"):
        use_attention(model, "flash")

    cfg = tiny_config("method.name=lora", depth=3)
    explicit = estimate(cfg, 1, device="cpu", eval_batch_size=0, attention="explicit")
    real = estimate(cfg, 1, device="cpu", eval_batch_size=0, attention="explicit", fake=False)
    assert explicit.phase_peak_allocated_bytes == real.phase_peak_allocated_bytes
    assert any("attention traced as explicit" in n for n in explicit.notes)
    with pytest.raises(ConfigError, match="attention: got 'flash'"):
        estimate(cfg, 1, device="cpu", attention="flash")
    # ViT-B/16 at batch 8 (SNELL Table A12's setting): 12 blocks x 8 x 12 heads x 197^2 x 4 B = 170.5 MiB more
    # (on the tiny ViT, N = 17, CPU SDPA takes its math path, which keeps the matrix too: no difference there)
    cfg = load_config(None, ["model.name=vit_base_patch16_224", "model.num_classes=100", "data.source=synthetic",
                             "data.batch_size=8", "train.precision=fp32", "method.name=lora", "method.rank=8",
                             "method.alpha=8", "method.targets=[q,k,v,proj,fc1,fc2]"])
    timm_kind, explicit = (estimate(cfg, 1, device="cpu", eval_batch_size=0, attention=kind)
                           for kind in ("sdpa", "explicit"))
    matrices = 12 * 8 * 12 * 197 * 197 * 4
    grown = explicit.peak_allocated_bytes - timm_kind.peak_allocated_bytes
    assert 0.98 * matrices <= grown <= 1.0 * matrices, (grown, matrices)  # SDPA's own saved output: the rest
