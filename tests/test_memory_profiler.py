"""The profiler's exact counts (parameters frozen/trainable, buffers, gradients, AdamW state; DTensor shards), the
memory.json schema written by a real training run, the report file reader's errors, MLflow metric names and the
memory config's validation."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

import peft_dist
from conftest import tiny_vit
from peft_dist.config import ConfigError, load_config
from peft_dist.memory.profiler import (MEMORY_SCHEMA, MemoryProfiler, MemoryReport, compare_reports,
                                       format_memory_table, local_bytes, memory_metrics, read_memory_json,
                                       state_bytes, write_memory_json)


def test_state_bytes_counts_every_category_exactly():
    model = tiny_vit()
    method = peft_dist.apply_method(model, "lora", rank=4, targets=["q", "v"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    opt = torch.optim.AdamW(method.param_groups(model, 0.01), lr=1e-3)
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    before = state_bytes(model, opt)
    opt.step()
    after = state_bytes(model, opt)
    elems = sum(p.numel() for p in trainable)
    assert before["params_frozen_bytes"] == 4 * sum(p.numel() for p in frozen)
    assert before["params_trainable_bytes"] == 4 * elems
    assert before["grads_bytes"] == 4 * elems and before["optimizer_state_bytes"] == 0
    # AdamW: exp_avg and exp_avg_sq in fp32 plus one fp32 scalar step per parameter
    assert after["optimizer_state_bytes"] == 8 * elems + 4 * len(trainable)
    assert after["buffers_bytes"] == sum(b.numel() * b.element_size() for b in model.buffers())


def test_local_bytes_counts_only_this_ranks_shard_of_a_dtensor():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from peft_dist.memory.estimator import fake_process_group

    with fake_process_group(4):
        mesh = init_device_mesh("cpu", (4,))
        t = distribute_tensor(torch.randn(16, 6), mesh, [Shard(0)])
        assert local_bytes(t) == 4 * 6 * 4 and dist.get_world_size() == 4
    assert local_bytes(torch.zeros(3, 5, dtype=torch.bfloat16)) == 30


def _kernel_peak_rss() -> int:
    """VmHWM of /proc/self/status (Linux): the resident-set high-water mark, in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:]
            assert unit == "kB"
            return int(value) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def test_profiler_on_cpu_keeps_the_larger_counts_and_reports_rss():
    model = tiny_vit()
    method = peft_dist.apply_method(model, "linear")
    opt = torch.optim.AdamW(method.param_groups(model, 0.0), lr=1e-3)
    profiler = MemoryProfiler(0, torch.device("cpu"))
    with profiler.phase("forward"):
        loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    with profiler.phase("backward"):
        loss.backward()
    profiler.capture_state(model, opt)  # gradients exist, no optimizer state yet
    with profiler.phase("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)
    profiler.capture_state(model, opt)  # optimizer state exists, gradients are gone
    high_water_before = _kernel_peak_rss()
    report = profiler.finish()
    high_water_after = _kernel_peak_rss()
    head = model.get_classifier()
    assert report.grads_bytes == 4 * sum(p.numel() for p in head.parameters())
    assert report.optimizer_state_bytes == 8 * sum(p.numel() for p in head.parameters()) + 4 * 2
    # no CUDA allocator: the live-storage tracker measures the peaks (every parameter and the batch are read in the
    # forward, so they are counted from there on; test_memory_measured.py compares it with the estimator)
    params = sum(p.numel() * 4 for p in model.parameters())
    phases = report.phase_peak_allocated_bytes
    assert set(phases) == {"forward", "backward", "optimizer"}
    assert phases["forward"] > params + 2 * 3 * 32 * 32 * 4 and phases["backward"] >= params + report.grads_bytes
    assert phases["optimizer"] >= params + report.optimizer_state_bytes
    assert report.peak_allocated_bytes == max(phases.values())
    assert report.activations_bytes == report.peak_allocated_bytes - report.static_bytes > 0
    # the process's peak RSS as the kernel reports it through another interface (/proc VmHWM, a high-water mark:
    # it only grows), read just before and just after the report was taken. The two interfaces may disagree by the
    # RSS deltas each thread batches before folding them in (64 pages per thread): a few MiB of slack on a ~1 GB
    # process, while a unit slip (ru_maxrss is in kB on Linux, bytes on macOS) is far outside it
    slack = 8 * 2**20
    assert high_water_before - slack <= report.peak_rss_bytes <= high_water_after + slack
    assert report.peak_bytes == report.peak_allocated_bytes
    assert profiler.steps_seen == 1


def test_training_run_writes_the_report_schema(tmp_path):
    from launcher.env import DistEnv
    from peft_dist.train.trainer import train

    cfg = load_config(None, [
        "model.name=vit_tiny_patch16_224", "model.num_classes=5",
        "model.kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}", "data.source=synthetic",
        "data.img_size=32", "data.batch_size=4", "data.eval_batch_size=8", "data.synthetic_samples=16",
        "data.num_workers=0", "data.synthetic_classes=5", "method.name=lora", "train.steps=2",
        "train.progress=false", "tracking.enabled=false", f"train.out_dir={tmp_path}"])
    train(cfg, DistEnv(), torch.device("cpu"))
    doc = json.loads((tmp_path / "memory.json").read_text())
    assert doc["schema"] == MEMORY_SCHEMA
    [report] = read_memory_json(tmp_path)
    from peft_dist.train.trainer import build_model

    model, _ = build_model(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    elems = sum(p.numel() for p in trainable)
    assert report.source == "measured" and report.world_size == 1
    assert report.params_trainable_bytes == 4 * elems
    assert report.params_frozen_bytes == 4 * sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert report.grads_bytes == 4 * elems
    assert report.optimizer_state_bytes == 8 * elems + 4 * len(trainable)


def test_report_files_round_trip_and_errors_name_the_file(tmp_path):
    r = MemoryReport(rank=1, device="cuda:1", world_size=2, params_frozen_bytes=10, grads_bytes=3,
                     peak_allocated_bytes=100, phase_peak_allocated_bytes={"forward": 100}, notes=["x"])
    path = write_memory_json(tmp_path / "m.json", [r], model="m")
    [back] = read_memory_json(path)
    assert back == r and back.static_bytes == 13
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ranks": [{"rank": 0, "device": "cpu", "peak_bytez": 1}]}))
    with pytest.raises(ValueError, match=r"bad.json ranks\[0\]: unknown field 'peak_bytez'"):
        read_memory_json(bad)
    (tmp_path / "nojson.json").write_text("{")
    with pytest.raises(ValueError, match=r"nojson.json: not a JSON memory report"):
        read_memory_json(tmp_path / "nojson.json")
    with pytest.raises(FileNotFoundError, match=r"memory report not found: .*missing.json"):
        read_memory_json(tmp_path / "missing.json")


def test_metrics_table_and_comparison_text():
    m = MemoryReport(rank=0, device="cuda", params_frozen_bytes=2**20, activations_bytes=3 * 2**20,
                     peak_allocated_bytes=4 * 2**20, phase_peak_allocated_bytes={"backward": 4 * 2**20})
    e = MemoryReport(rank=0, device="cuda", source="estimated", params_frozen_bytes=2**20,
                     activations_bytes=6 * 2**20, peak_allocated_bytes=7 * 2**20)
    metrics = memory_metrics([m])
    assert metrics["memory/rank0/peak_allocated_bytes"] == 4 * 2**20
    assert metrics["memory/rank0/peak_allocated_backward_bytes"] == 4 * 2**20
    assert "memory/rank0/peak_reserved_bytes" not in metrics  # unknown values are not logged as 0
    title, header, row = format_memory_table([m]).splitlines()
    assert title == "memory per rank (MiB)"  # a CUDA allocator peak: no RSS note
    cells = dict(zip(re.split(r"\s{2,}", header.strip()), re.split(r"\s{2,}", row.strip())))
    assert cells == {"rank": "0", "frozen": "1.0", "trainable": "0.0", "buffers": "0.0", "grads": "0.0",
                     "optimizer": "0.0", "activations": "3.0", "peak alloc": "4.0", "peak reserved": "—"}
    lines = compare_reports(m, e).splitlines()
    assert lines[0].split() == ["field", "measured", "estimated", "est/meas"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    # estimated / measured per field; no ratio where the measurement is 0
    assert rows == {"params_frozen_bytes": ["1.0", "1.0", "1.000"], "params_trainable_bytes": ["0.0", "0.0", "—"],
                    "buffers_bytes": ["0.0", "0.0", "—"], "grads_bytes": ["0.0", "0.0", "—"],
                    "optimizer_state_bytes": ["0.0", "0.0", "—"], "activations_bytes": ["3.0", "6.0", "2.000"],
                    "peak_allocated_bytes": ["4.0", "7.0", "1.750"]}


@pytest.mark.parametrize("override, message", [
    ("memory.snapshot_steps=-1", r"memory.snapshot_steps: got -1; allowed: >= 0"),
    ("memory.snapshot_max_entries=0", r"memory.snapshot_max_entries: got 0; allowed: >= 1"),
    ("memory.snapshot=true", r"memory.snapshot: unknown key"),
])
def test_memory_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.source=synthetic", override])
