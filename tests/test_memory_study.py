"""``peft-dist study``: a small grid on a tiny ViT (CSV with one row per point and the required columns, Markdown,
PNGs, ratios against paper figures, a method this checkout lacks skipped with a note), grid-file errors that name the
file and key, the shipped grids validate, and the synthetic SPT allocation trains exactly its budget."""
import csv
import json

import pytest
import yaml

import peft_dist
from conftest import REPO, TINY_VIT, run_measuring_cpu
from peft_dist.config import ConfigError
from peft_dist.memory.study import CSV_COLUMNS, load_study, parse_filters, run_grid, synthetic_spt_allocation

TINY_BASE = {"model": {"num_classes": 5, "kwargs": {**TINY_VIT}}, "optim": {"weight_decay": 0.0}}


def write_grid(tmp_path, **changes):
    grid = {
        "study": "tiny",
        "base": TINY_BASE,
        "grid": {"backbone": ["vit_tiny_patch16_224"], "method": ["lora-4", "sparse_masked", "not-installed"],
                 "engine": ["fsdp2"], "world_size": [1, 2], "batch_size": [4]},
        "methods": {"lora-4": {"name": "lora", "rank": 4}, "sparse_masked": {"name": "sparse_masked"},
                    "not-installed": {"name": "no_such_method_yet"}},
        "paper": {"units": "MiB", "values": {"lora-4": {"vit_tiny_patch16_224": 1.0}}},
        "ratios": [{"numerator": "lora-4", "denominator": "sparse_masked", "target_max": 1.0}],
        **changes,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.mark.timeout(120)
def test_a_small_grid_writes_csv_markdown_plots_and_ratios(tmp_path, capsys):
    study = load_study(write_grid(tmp_path))
    out = tmp_path / "out"
    rows = run_grid(study, out, jobs=1)
    assert len(rows) == 6  # one row per grid point, the skipped ones included
    with (out / "tiny.csv").open() as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == CSV_COLUMNS
    assert [r["status"] for r in table if r["method"] == "not-installed"] == ["skipped: method not installed"] * 2
    ok = [r for r in table if r["status"] == "ok"]
    assert len(ok) == 4
    for r in ok:
        parts = sum(int(r[k]) for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes",
                                        "buffers_bytes"))
        assert parts == int(r["peak_bytes"]) and r["source"] == "estimated"
    by = {(r["method"], r["world_size"]): r for r in ok}
    # full-size fp32 gradients of the 12·d² weight entries of each block, moments twice that; LoRA's are tiny
    d, depth = TINY_VIT["embed_dim"], TINY_VIT["depth"]
    matrices = 4 * 12 * d * d * depth
    assert matrices < int(by[("sparse_masked", "1")]["grads_bytes"]) < matrices + 4 * 2_000
    assert int(by[("sparse_masked", "1")]["optimizer_bytes"]) >= 2 * matrices
    assert int(by[("lora-4", "1")]["grads_bytes"]) < matrices / 20
    # sharding the frozen weights over 2 ranks: about half of them per rank
    assert int(by[("lora-4", "2")]["params_frozen_bytes"]) < 0.6 * int(by[("lora-4", "1")]["params_frozen_bytes"])
    assert by[("lora-4", "1")]["paper_mib"] == "1.0"
    text = (out / "tiny.md").read_text()
    assert "| lora-4 |" in text and "lora-4 / sparse_masked" in text and "meets" in text
    assert "not-installed on vit_tiny_patch16_224 (fsdp2, world 1): skipped: method not installed" in text
    assert (out / "tiny_vs_world.png").stat().st_size > 0 and (out / "tiny_breakdown.png").stat().st_size > 0
    assert not (out / "tiny_vs_backbone.png").exists()  # one backbone: nothing to compare along that axis
    assert "lora-4 / sparse_masked" in capsys.readouterr().out


@pytest.mark.parametrize("changes, message", [
    ({"grids": {}}, r"grid.yaml: unknown key 'grids'"),
    ({"grid": {"backbone": ["x"], "method": ["lora"], "depth": [2]}}, r"grid.yaml: grid.depth: unknown axis"),
    ({"grid": {"method": ["lora"]}}, r"grid.yaml: grid.backbone: required"),
    ({"grid": {"backbone": ["vit_tiny_patch16_224"], "method": ["lora"], "dtype": ["fp16"]}},
     r"grid.dtype: got 'fp16'; allowed: fp32, bf16"),
    ({"methods": {"x": {"rank": 4}}}, r"grid.yaml: methods.x: expected a mapping with 'name'"),
    ({"mode": "guess"}, r"grid.yaml: mode: got 'guess'"),
    ({"methods": {"lora-4": {"name": "lora", "rank": 0}, "sparse_masked": {"name": "sparse_masked"}}},
     r"grid.yaml: point backbone=vit_tiny_patch16_224, method=lora-4, .*method.rank: got 0"),
    ({"grid": {"backbone": ["vit_tiny_patch16_224"], "method": ["lora-4"], "engine": ["single"],
               "world_size": [2]}},
     r"point .*engine=single, world_size=2, attention=sdpa: dist.engine=single but --world-size 2"),
    ({"grid": {"backbone": ["vit_tiny_patch16_224"], "method": ["lora-4"], "attention": ["flash"]}},
     r"grid.attention: got 'flash'; allowed: sdpa, explicit"),
])
def test_grid_file_errors_name_the_file_and_key(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_study(write_grid(tmp_path, **changes))


def test_filters_select_points_and_reject_unknown_axes(tmp_path):
    assert parse_filters(["world_size=1,2", "method=lora-4"]) == {"world_size": ["1", "2"], "method": ["lora-4"]}
    with pytest.raises(ConfigError, match=r"--filter 'depth=2': expected AXIS=V1"):
        parse_filters(["depth=2"])
    study = load_study(write_grid(tmp_path))
    with pytest.raises(ConfigError, match=r"--filter: no grid point"):
        run_grid(study, tmp_path / "o", filters={"method": ["nothing"]}, quiet=True)


def test_shipped_grids_validate():
    grids = sorted((REPO / "configs" / "studies").glob("*.yaml"))
    assert {g.stem for g in grids} >= {"snell_table_a8", "fsdp2_scaling_vith"}
    for path in grids:
        study = load_study(path)
        assert study.points(), path
    anchor = load_study(REPO / "configs" / "studies" / "snell_table_a8.yaml")
    assert {p["backbone"] for p in anchor.points()} == {"vit_base_patch16_224", "vit_large_patch16_224",
                                                        "vit_huge_patch14_224"}
    assert {(r.numerator, r.denominator) for r in anchor.ratios} >= {("snell-8", "lora-8"),
                                                                    ("snell-8", "sparse_masked")}
    assert anchor.paper["sparse_masked"]["vit_huge_patch14_224"] == 16119


@pytest.mark.parametrize("structured_type", ["lora", "adapter"])
def test_synthetic_spt_allocation_trains_exactly_its_budget(tmp_path, structured_type):
    from peft_dist.methods.spt_sensitivity import write_allocation

    backbone = peft_dist.create_backbone("vit_tiny_patch16_224", num_classes=5, **TINY_VIT)
    doc = synthetic_spt_allocation(backbone, structured_type, rank=4, structured_ops=("q", "v"),
                                   unstructured_per_fc1=100)
    entry = doc["budgets"][0]
    assert entry["per_op"] == [2, 0, 2, 0, 0, 0] and entry["unstructured_total"] == 200
    path = write_allocation(tmp_path / "a.json", doc)
    model = peft_dist.create_backbone("vit_tiny_patch16_224", num_classes=5, **TINY_VIT)
    peft_dist.apply_method(model, f"spt_{structured_type}", allocation=str(path), budget=entry["budget_m"])
    counts = peft_dist.count_trainable(model)
    assert counts["trainable_params_without_head"] == entry["total"]
    assert json.loads(path.read_text())["metadata"]["synthetic"].endswith("synthetic_spt_allocation")


@pytest.mark.slow
@pytest.mark.timeout(480)  # a hang guard only: what the test bounds is the study's CPU time
def test_anchor_study_costs_under_three_cpu_minutes_and_meets_the_snell_over_lora_target(tmp_path):
    """SNELL Table A8(b)/A12 setting (ViT-B/L/H, batch 8, fp32, one device), estimated on CPU for the methods the
    ratios need (LoRA-8, SNELL-8, sparse_masked) with both attention kinds: 18 points (the whole grid, every method
    twice, is 60 and takes about three minutes on 2 cores; CI's budget takes the subset)."""
    import sys

    r, cpu_seconds = run_measuring_cpu([sys.executable, "-m", "peft_dist.cli", "study", "--grid",
                                        "configs/studies/snell_table_a8.yaml", "--filter",
                                        "method=lora-8,snell-8,sparse_masked", "--out", str(tmp_path)],
                                       cwd=REPO, capture_output=True, text=True, timeout=450)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    print(f"anchor study: {cpu_seconds:.0f} CPU seconds")
    assert cpu_seconds < 180, cpu_seconds  # its cost, which other tests sharing the cores do not inflate
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["failed"] == 0 and summary["ok"] == summary["points"]
    ratios = {(x["ratio"], x["backbone"], x["attention"]): x for x in summary["ratios"]}
    for backbone in ("vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"):
        for attention in ("sdpa", "explicit"):
            over_lora = ratios[("snell-8 / lora-8", backbone, attention)]
            assert over_lora["ours"] <= 1.02 and over_lora["meets_target"], over_lora
            over_masked = ratios[("snell-8 / sparse_masked", backbone, attention)]
            # the paper's own SNELL/GPS ratio is 0.69 (B), 0.60 (L, H): with timm's attention ours is at or below
            # it at every size; the explicit attention matrix adds the same bytes to both, which lifts the ratio to
            # 0.67 / 0.61 / 0.62, within 0.02 of the paper's
            if attention == "sdpa":
                assert over_masked["ours"] <= over_masked["paper"] + 0.005, over_masked
            else:
                assert abs(over_masked["ours"] - over_masked["paper"]) <= 0.025, over_masked
    assert "| snell-8 |" in (tmp_path / "snell_table_a8.md").read_text()
