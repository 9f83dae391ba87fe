"""The CPU estimator against a measured run of the same configuration (issue 22).

Measured: a real training run through the trainer (``peft_dist.train.trainer``), 2 optimizer steps and the final
evaluation, with the memory profiler's live-storage tracker on (``memory.cpu_tracking``): the phase peaks are the
bytes of the tensor storages alive at once (every op's inputs and outputs, freed when Python frees them), the state
categories are counted from the tensors after the first step. Estimated: ``peft_dist.memory.estimate`` of the same
config (fake tensors, depth extrapolation for ViT-B). Compared per category (frozen / trainable parameters, buffers,
gradients, optimizer state, activations = peak − state) and the peak; every ratio estimate / measurement lies in
[0.95, 1.05]; ``EXPLAINED`` below would widen a range where the docstring explains a larger difference (none needs
it today). The differences that remain inside 5 %, measured on this machine (tiny ViT, rank 0):

* SNELL-8, every engine: the estimate is ~19 KB low (1.3 % of a ~1.4 MB peak under ddp/fsdp2): SNELL's kernel takes
  its threshold from a data-dependent gather of the magnitudes near the quantile (``functional/kernelized.py``),
  which fake tensors take as empty (the estimate's note counts those selections). On ViT-B it is far below 1 %.
* ZeRO-3: DeepSpeed's gathers and per-module bookkeeping that a single-process trace cannot see: 90 KB for LoRA
  (activations 0.981), 221 KB for SNELL (0.956, its trainable factors are 4x LoRA's and are gathered too).
* fsdp2 rank 1 holds a few hundred bytes less trainable state than rank 0 (uneven rows of tiny tensors; the
  estimator traces rank 0): ratio 1.03 of a 6 KB figure, within the tolerance as it stands.

Cases: ViT-B/16 at batch 8 (224², fp32, 10 classes) for full, linear, LoRA-8, SNELL-8, SPT-LoRA, ARC, HTA and
sparse_masked under ``single`` (one test per method, one row of the table each; SNELL-8 on the tiny ViT, see
``ON_TINY_VIT``, and SPT-LoRA there too, estimated with real tensors: ``REAL_TENSOR_ESTIMATE``); a tiny ViT (depth 2, width 48) at
4 images per rank for LoRA and SNELL under ddp, fsdp2, DeepSpeed ZeRO-2 and ZeRO-3 at world 2 on gloo (one spawn for
the eight runs, every rank a row). The tables print through ``capsys.disabled()``.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from peft_dist.config import load_config
from peft_dist.memory.profiler import CATEGORIES, MIB, MemoryReport, read_memory_json

COMMON = ["data.source=synthetic", "tracking.enabled=false", "train.precision=fp32", "optim.weight_decay=0.01",
          "data.num_workers=0", "train.progress=false", "train.steps=2", "train.overwrite=true"]
VIT_B = ["model.name=vit_base_patch16_224", "model.num_classes=10", "data.img_size=224",
         "data.synthetic_classes=10", "data.synthetic_samples=16", "data.batch_size=8", "data.eval_batch_size=8"]
"""ViT-B/16, batch 8: 16 training images (2 steps), 4 evaluation images."""
TINY = ["model.name=vit_tiny_patch16_224", "model.num_classes=5",
        "model.kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}", "data.img_size=32",
        "data.synthetic_classes=5", "data.synthetic_samples=16", "data.batch_size=4", "data.eval_batch_size=4"]
"""The tiny ViT at 4 images per rank: 2 ranks × 4 × 2 steps = 16 training images, 4 evaluation images."""

SINGLE_METHODS = {
    "full": ["method.name=full"],
    "linear": ["method.name=linear"],
    "lora-8": ["method.name=lora", "method.rank=8", "method.alpha=8"],
    "snell-8": ["method.name=snell", "method.rank=8"],
    "spt_lora": None,  # an allocation file, written per test (see _spt_overrides)
    "arc": ["method.name=arc"],
    "hta": ["method.name=hta"],
    "sparse_masked": ["method.name=sparse_masked"],
}
ON_TINY_VIT = {"snell-8", "spt_lora", "arc", "hta", "sparse_masked"}
"""Measured on the tiny ViT instead of ViT-B, beyond this file's CI budget on ViT-B: SNELL's kernel build (every
adapted matrix's kernel and its threshold search each step) costs ~30 s per ViT-B step on 2 idle CPU cores and
minutes on a loaded one; SPT-LoRA's ViT-B run took 8 minutes on a loaded machine; ARC, HTA and sparse_masked took
32-53 s each under CI's two test workers (the 30-minute budget keeps full, linear and LoRA-8 on ViT-B).
``PEFT_DIST_MEMORY_VIT_B=all`` measures them all on ViT-B."""
REAL_TENSOR_ESTIMATE = {"spt_lora"}
"""Estimated with real tensors (the estimator's ``fake=False``): SPT's sparse delta gathers the input columns its
index touches (``torch.unique`` in ``functional/sparse_delta.py``), a size fake tensors cannot know."""
MULTI_RANK = [(method, engine, stage) for engine, stage in (("ddp", 0), ("fsdp2", 0), ("deepspeed", 2),
                                                             ("deepspeed", 3)) for method in ("lora", "snell")]
FIELDS = [*CATEGORIES, "peak_allocated"]
LOW, HIGH = 0.95, 1.05
EXPLAINED: dict[tuple[str, str, str], tuple[float, float]] = {}
"""(method, engine label, field) → the allowed ratio range, where the module docstring explains the difference."""


def _value(report: MemoryReport, name: str) -> int:
    return int(getattr(report, f"{name}_bytes") or 0)


def _ratio(estimated: int, measured: int) -> float | None:
    if measured == 0:
        return None if estimated == 0 else float("inf")
    return estimated / measured


def compare(rows: list[tuple[str, str, int, MemoryReport, MemoryReport]]) -> tuple[str, list[str]]:
    """The table (method × engine × world: estimate, measurement, ratio per field) and the fields out of range."""
    head = f"{'method':<14}{'engine':<12}{'world':>5}  " + "".join(f"{f[:11]:>27}" for f in FIELDS)
    lines = ["estimate / measurement in MiB (ratio); activations = peak − state, as on CUDA", head]
    failures = []
    for method, engine, world, measured, estimated in rows:
        cells = []
        for name in FIELDS:
            e, m = _value(estimated, name), _value(measured, name)
            r = _ratio(e, m)
            cells.append(f"{e / MIB:9.3f}/{m / MIB:9.3f} ({'—' if r is None else f'{r:.3f}'})".rjust(27))
            low, high = EXPLAINED.get((method, engine, name), (LOW, HIGH))
            if r is not None and not low <= r <= high:
                failures.append(f"{method} {engine} {name}: estimate {e:,} B, measured {m:,} B, ratio {r:.3f}")
        lines.append(f"{method:<14}{engine:<12}{world:>5}  " + "".join(cells))
    return "\n".join(lines), failures


def _spt_overrides(tmp_path, tiny: bool) -> list[str]:
    import peft_dist
    from peft_dist.memory.study import synthetic_spt_allocation
    from peft_dist.methods.spt_sensitivity import write_allocation

    with torch.device("meta"):
        backbone = peft_dist.create_backbone("vit_tiny_patch16_224", num_classes=5, img_size=32, patch_size=8,
                                             depth=2, embed_dim=48, num_heads=3) if tiny else \
            peft_dist.create_backbone("vit_base_patch16_224", num_classes=10)
    # the study's SPT setting (configs/studies/snell_table_a8.yaml), scaled to the tiny ViT's 48-wide fc1
    doc = synthetic_spt_allocation(backbone, "lora", rank=8 if not tiny else 4, structured_ops=("q", "v"),
                                   unstructured_per_fc1=8192 if not tiny else 512)
    path = write_allocation(tmp_path / "spt_lora.json", doc)
    return ["method.name=spt_lora", f"method.allocation={path}", f"method.budget={doc['budgets'][0]['budget_m']}"]


def _estimate(cfg, world: int, label: str = "") -> MemoryReport:
    from peft_dist.memory.estimator import estimate

    # an SPT allocation names every block of the full model: traced at full depth, not extrapolated from 2-4 blocks
    return estimate(cfg, world, device="cpu", extrapolate=cfg.method.name != "spt_lora",
                    fake=label not in REAL_TENSOR_ESTIMATE)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("label", list(SINGLE_METHODS))
def test_vit_b_single_process_estimate_matches_a_measured_run(label, tmp_path, capsys):
    """ViT-B/16, batch 8, fp32, one process: the method measured through the trainer and estimated (one row of the
    table per method; ``pytest -s`` or the captured-output-disabled print shows it)."""
    from launcher.env import DistEnv
    from peft_dist.train.trainer import train

    started = time.perf_counter()
    tiny = label in ON_TINY_VIT and os.environ.get("PEFT_DIST_MEMORY_VIT_B") != "all"
    method = SINGLE_METHODS[label] or _spt_overrides(tmp_path, tiny)
    run = tmp_path / label
    cfg = load_config(None, [*COMMON, *(TINY if tiny else VIT_B), *method, f"train.out_dir={run}"])
    train(cfg, DistEnv(), torch.device("cpu"))
    [measured] = read_memory_json(run)
    assert measured.peak_allocated_bytes is not None and measured.peak_rss_bytes
    assert set(measured.phase_peak_allocated_bytes) == {"forward", "backward", "optimizer", "eval"}
    table, failures = compare([(label, "single", 1, measured, _estimate(cfg, 1, label))])
    with capsys.disabled():
        print(f"\n{table}\n({'tiny ViT batch 4' if tiny else 'ViT-B/16 batch 8'} fp32, "
              f"{time.perf_counter() - started:.0f} s; {measured.notes[-1]})")
    assert not failures, "\n".join(failures)


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_multi_rank_estimates_match_measured_runs(tmp_path, capsys):
    """The tiny ViT on 2 gloo ranks: LoRA and SNELL under ddp, fsdp2, ZeRO-2 and ZeRO-3, every rank compared."""
    from conftest import spawn_two_ranks
    from dist_workers import measured_memory_runs

    runs, labels = [], []
    for method, engine, stage in MULTI_RANK:
        label = engine if engine != "deepspeed" else f"zero-{stage}"
        options = ["method.rank=8"] if method == "snell" else []
        runs.append([*COMMON, *TINY, f"method.name={method}", *options, f"dist.engine={engine}",
                     f"dist.zero_stage={max(stage, 1)}", f"train.out_dir={tmp_path / f'{method}_{label}'}"])
        labels.append((method, label))
    started = time.perf_counter()
    spawn_two_ranks(measured_memory_runs, runs)
    rows = []
    for overrides, (method, label) in zip(runs, labels):
        ranks = read_memory_json(overrides[-1].split("=", 1)[1])
        assert [r.rank for r in ranks] == [0, 1]
        estimated = _estimate(load_config(None, overrides), 2)
        rows += [(method, label, 2, measured, estimated) for measured in ranks]
    table, failures = compare(rows)
    with capsys.disabled():
        print(f"\n{table}\n(tiny ViT, 4 images per rank, fp32, gloo; {time.perf_counter() - started:.0f} s)")
    assert not failures, "\n".join(failures)


def test_cpu_tracking_off_leaves_only_rss_and_the_tracker_counts_storages_exactly(tmp_path):
    """``memory.cpu_tracking=false``: no phase peaks, the RSS alone; on: a storage is counted once however many views
    use it, from the op that makes it until it is freed, and a storage resize is followed."""
    from peft_dist.memory.profiler import MemoryProfiler

    off = MemoryProfiler(0, torch.device("cpu"), config=load_config(None, ["memory.cpu_tracking=false"]).memory)
    with off.phase("forward"):
        torch.ones(1000)
    report = off.finish()
    assert off.tracker is None and report.peak_allocated_bytes is None and report.peak_rss_bytes > 0
    assert report.phase_peak_allocated_bytes == {}

    profiler = MemoryProfiler(0, torch.device("cpu"))
    kept = torch.zeros(256)  # made outside any phase: counted when an op first reads it
    with profiler.phase("forward"):
        a = torch.ones(1000)  # 4,000 B
        views = [a[:10], a.view(10, 100), a.t() if a.dim() == 2 else a[::2]]
        b = kept + 1  # reads kept (1,024 B), makes 1,024 B
        del a, views
        c = torch.empty(2000)  # 8,000 B after a's 4,000 B are gone
    assert profiler.report.phase_peak_allocated_bytes["forward"] == 1024 + 1024 + 8000
    with profiler.phase("backward"):
        c.untyped_storage().resize_(0)
        d = torch.empty(10)
    assert profiler.report.phase_peak_allocated_bytes["backward"] == 1024 + 1024 + 8000  # the entry level
    assert profiler.tracker.live == 1024 + 1024 + 40
    del b, c, d
    report = profiler.finish()
    assert report.peak_allocated_bytes == 10048 and report.activations_bytes == 10048
    assert any("bookkeeping" in n for n in report.notes)
    assert json.loads(json.dumps(report.to_dict()))["peak_allocated_bytes"] == 10048


def test_tracking_the_first_steps_measures_the_peaks_of_tracking_every_step(tmp_path):
    """``memory.cpu_tracked_steps=2`` over 6 steps with evaluations after steps 3 and 6: the tracker stands aside
    after step 2 and comes back for the first evaluation, and the report holds the same phase peaks and state as
    tracking everything (shapes repeat; the gradients and state alive while it stood aside are observed again)."""
    from launcher.env import DistEnv
    from peft_dist.train.trainer import Trainer
    from test_baselines import fixed_batches, tiny_cfg

    batches = fixed_batches(n=3)
    reports = {}
    for steps in (0, 2):
        cfg = tiny_cfg(tmp_path / str(steps), "snell", "train.steps=6", "train.eval_every_epochs=1",
                       "data.eval_batch_size=8", f"memory.cpu_tracked_steps={steps}")
        trainer = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches[:1])
        trainer.fit()
        reports[steps] = (read_memory_json(tmp_path / str(steps) / "snell" / "memory.json")[0], trainer.profiler)
    (every, every_profiler), (first, first_profiler) = reports[0], reports[2]
    assert first.phase_peak_allocated_bytes == every.phase_peak_allocated_bytes
    assert set(every.phase_peak_allocated_bytes) == {"forward", "backward", "optimizer", "eval"}
    assert first.categories() == every.categories()
    assert first_profiler.steps_seen == every_profiler.steps_seen == 6
    assert first_profiler.phase_seconds < every_profiler.phase_seconds / 2


def test_state_made_while_the_tracker_stood_aside_counts_at_its_return():
    """A gradient allocated in an untracked step and still alive at the first evaluation is part of its peak,
    though no op of the evaluation reads it."""
    from peft_dist.memory.profiler import MemoryProfiler

    profiler = MemoryProfiler(0, torch.device("cpu"), config=load_config(None, ["memory.cpu_tracked_steps=1"]).memory)
    layer = torch.nn.Linear(64, 64, bias=False)  # 16 KiB weight
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    profiler.capture_state(layer, optimizer)
    for _ in range(2):  # the second step is untracked: its gradient is a new storage
        layer.weight.grad = None
        with profiler.phase("backward"):
            layer(torch.ones(1, 64)).sum().backward()
        with profiler.phase("optimizer"):
            optimizer.step()
    with profiler.phase("eval"):
        torch.ones(256)  # 1 KiB, reads nothing
    assert profiler.report.phase_peak_allocated_bytes["eval"] == 16384 + 16384 + 1024
