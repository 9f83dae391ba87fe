"""Run directories and divergence: a rejected run leaves a finished run's record untouched, a new run never writes
into an old one without ``train.overwrite``, non-finite settings are refused, and a diverging run stops before the
bad update, keeps its last good checkpoint and says so in one line."""
import json
import subprocess

import pytest
import torch

from conftest import PYTHON, REPO, TINY_VIT, stop_before_step
from launcher.env import DistEnv
from peft_dist.config import ConfigError, load_config
from peft_dist.train.errors import Diverged
from peft_dist.train.trainer import Trainer, train
from test_baselines import fixed_batches, tiny_cfg


def finished_run(tmp_path, *extra):
    batches = fixed_batches(n=2)
    cfg = tiny_cfg(tmp_path, "lora", "train.steps=4", "train.save_every_steps=2", *extra)
    Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches).fit()
    return tmp_path / "lora", batches


def test_a_rejected_run_leaves_the_finished_record_alone(tmp_path):
    out, batches = finished_run(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    cfg = tiny_cfg(tmp_path, "lora", "model.num_classes=7", "data.source=shards", f"data.path={tmp_path / 'none'}",
                   "train.overwrite=true")
    with pytest.raises(Exception, match="not found|no such|_info.json"):
        Trainer(cfg, DistEnv(), torch.device("cpu"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_new_run_refuses_a_directory_that_holds_one(tmp_path):
    out, batches = finished_run(tmp_path)
    cfg = tiny_cfg(tmp_path, "lora", "train.steps=2", "optim.lr=1e-3")
    with pytest.raises(ConfigError, match=r"train.out_dir: .* already holds a run \(config.yaml, metrics.jsonl, "
                                          r"summary.json.*checkpoints\); continue it with train.resume=auto, or "
                                          r"replace it with train.overwrite=true"):
        Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches)
    assert json.loads((out / "summary.json").read_text())["steps"] == 4  # untouched

    cfg = tiny_cfg(tmp_path, "lora", "train.steps=2", "optim.lr=1e-3", "train.overwrite=true")
    Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches).fit()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2] and json.loads((out / "summary.json").read_text())["steps"] == 2
    assert not (out / "checkpoints").exists()  # the old run's checkpoints are gone (this one saved none)


def test_an_out_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "lora").write_text("not a directory")
    with pytest.raises(ConfigError, match=r"train.out_dir: .*lora is a file, not a directory"):
        Trainer(tiny_cfg(tmp_path, "lora"), DistEnv(), torch.device("cpu"), fixed_batches(), fixed_batches())


@pytest.mark.parametrize("override, key", [("optim.lr=.inf", "optim.lr"), ("optim.lr=.nan", "optim.lr"),
                                           ("train.label_smoothing=.nan", "train.label_smoothing")])
def test_non_finite_settings_are_refused(override, key):
    with pytest.raises(ConfigError, match=rf"{key}: got (nan|inf); allowed: a finite number"):
        load_config(None, [override])


def test_divergence_stops_before_the_bad_update_and_keeps_the_last_checkpoint(tmp_path):
    """Step 3's batch holds NaN images: the run stops there, the step-2 checkpoint stays the newest, the adapters of
    step 2 are what the model holds, no adapter file or normal summary is written, and the summary says failed."""
    batches = fixed_batches(n=4)
    bad = (torch.full_like(batches[2][0], float("nan")), batches[2][1])
    stream = [batches[0], batches[1], bad, batches[3]]
    cfg = tiny_cfg(tmp_path, "lora", "train.steps=4", "train.save_every_steps=2")
    with pytest.raises(Diverged, match=r"training diverged at step 3: the loss is nan .*the last good checkpoint is "
                                       r".*step-00000002"):
        train(cfg, DistEnv(), torch.device("cpu"), stream, batches)
    out = tmp_path / "lora"
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
    assert not (out / "adapter.safetensors").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]


def test_divergence_from_the_cli_is_one_line(tmp_path):
    kw = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()) + "}"
    r = subprocess.run([PYTHON, "-m", "peft_dist.cli", "train", "data.source=synthetic", "model.name=vit_tiny_patch16_224",
                        f"model.kwargs={kw}", "model.num_classes=10", "data.img_size=32", "data.batch_size=8",
                        "method.name=lora", "optim.lr=1e30",
                        "train.steps=6", "train.progress=false", "tracking.enabled=false",
                        f"train.out_dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("peft-dist: error: training diverged at step"), r.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


class Interrupted(Exception):
    pass


def interrupted_then_resumed(tmp_path, *extra, stop_before=2):
    """A 6-step run killed (an exception) right after its step-2 checkpoint, then resumed."""
    batches = fixed_batches(n=3)
    cfg = tiny_cfg(tmp_path, "lora", "train.steps=6", "train.save_every_steps=2", "train.log_every=1", *extra)
    first = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches)
    stop_before_step(first, stop_before, Interrupted)
    with pytest.raises(Interrupted):
        first.fit()
    first.tracker.finish("KILLED")
    cfg = tiny_cfg(tmp_path, "lora", "train.steps=6", "train.save_every_steps=2", "train.log_every=1",
                   "train.resume=auto", *extra)
    resumed = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches)
    return first, resumed, resumed.fit()


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first, resumed, summary = interrupted_then_resumed(tmp_path, "tracking.enabled=true", f"tracking.uri={uri}")
    assert first.tracker.run_id and summary["mlflow_run_id"] == first.tracker.run_id
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(first.tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_at_step"] == "2"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3, 4, 5, 6]
    experiment = client.get_experiment_by_name("peft-dist")
    assert len(client.search_runs([experiment.experiment_id])) == 1  # no second run per requeue


def test_memory_of_a_resumed_run_is_measured_like_a_fresh_one(tmp_path):
    _, _, summary = interrupted_then_resumed(tmp_path)
    fresh = finished_run(tmp_path / "fresh")[0]
    expected = json.loads((fresh / "summary.json").read_text())["state_memory_bytes_per_rank"]
    assert summary["state_memory_bytes_per_rank"] == expected and expected[0] > 0


def test_timed_checkpoints_and_their_slurm_default(tmp_path):
    from peft_dist.config import TrainConfig

    assert TrainConfig().checkpoint_interval_minutes({"SLURM_JOB_ID": "7"}) == 30.0
    assert TrainConfig().checkpoint_interval_minutes({}) == 0.0
    assert TrainConfig(save_every_minutes=0).checkpoint_interval_minutes({"SLURM_JOB_ID": "7"}) == 0.0
    batches = fixed_batches(n=2)
    cfg = tiny_cfg(tmp_path, "lora", "train.steps=4", "train.save_every_minutes=1e-9", "train.keep_checkpoints=10")
    Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches).fit()
    from peft_dist.train.checkpoint import list_checkpoints

    assert [p.name for p in list_checkpoints(tmp_path / "lora")] == [f"step-0000000{i}" for i in (1, 2, 3, 4)]


def poison_gradient_at(trainer, step_to_poison):
    """The head's weight gradient becomes NaN during the given step (the loss stays finite)."""
    calls = {"n": 0}
    weight = trainer.engine.module.head.weight

    def hook(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == step_to_poison + 1 else grad

    weight.register_hook(hook)


def test_a_non_finite_gradient_norm_stops_the_run(tmp_path):
    batches = fixed_batches(n=2)
    trainer = Trainer(tiny_cfg(tmp_path, "lora", "train.steps=4"), DistEnv(), torch.device("cpu"), batches, batches)
    poison_gradient_at(trainer, 2)
    with pytest.raises(Diverged, match=r"training diverged at step 3: the gradient norm is nan"):
        trainer.fit()


def test_skip_drops_exactly_the_non_finite_step(tmp_path):
    batches = fixed_batches(n=2)
    cfg = tiny_cfg(tmp_path, "lora", "train.steps=4", "train.on_nonfinite=skip")
    trainer = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches)
    poison_gradient_at(trainer, 2)
    summary = trainer.fit()
    assert summary["status"] == "finished" and summary["nonfinite_steps_skipped"] == 1
    steps = {int(s["step"]) for s in trainer.engine.optimizer.state.values()}
    assert steps == {3}  # Adam applied steps 1, 2 and 4 only
    assert all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())


def test_skip_still_stops_a_run_that_keeps_diverging(tmp_path):
    batches = fixed_batches(n=2)
    cfg = tiny_cfg(tmp_path, "lora", "train.steps=6", "train.on_nonfinite=skip", "train.max_nonfinite_skips=2",
                   "optim.lr=1e30")
    with pytest.raises(Diverged, match=r"after 2 skipped step\(s\) in a row"):
        Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches).fit()
