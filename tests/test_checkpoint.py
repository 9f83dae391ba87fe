"""Checkpoints: resume continues bit-exactly, an interrupted save leaves the previous one loadable, and a
2-rank checkpoint loads on 1 rank (DCP resharding)."""
import pytest
import torch

from conftest import spawn_two_ranks
from dist_workers import train_shard_of_global_batches
from launcher.env import DistEnv
from peft_dist.models.backbone import CheckpointError
from peft_dist.train import checkpoint as ckpt
from peft_dist.train.trainer import Trainer
from test_baselines import fixed_batches, tiny_cfg


class Interrupted(Exception):
    pass


def run(tmp_path, name, *extra, stop_after=None, batches=None):
    batches = batches or fixed_batches(n=3)
    cfg = tiny_cfg(tmp_path, name, "method.dropout=0.1", "train.steps=6", "train.log_every=1", *extra)
    trainer = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches)
    if stop_after is not None:
        original = trainer.train_step

        def train_step(step, stream):
            if step == stop_after:
                raise Interrupted(f"killed before step {step}")
            return original(step, stream)

        trainer.train_step = train_step
    trainer.fit()
    return trainer


def test_resume_is_bitwise_identical(tmp_path):
    straight = run(tmp_path, "lora")
    reference = straight.engine.state_dict()

    with pytest.raises(Interrupted):
        run(tmp_path / "b", "lora", "train.save_every_steps=2", stop_after=5)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b" / "lora")] == ["step-00000002", "step-00000004"]
    resumed = run(tmp_path / "b", "lora", "train.save_every_steps=2", "train.resume=auto")
    assert resumed.start_step == 4
    got = resumed.engine.state_dict()
    assert got.keys() == reference.keys()
    for k in reference:
        assert torch.equal(got[k], reference[k]), k
    lines = (tmp_path / "b" / "lora" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6  # steps 1-4 from the first run, 5-6 appended by the resumed one (none repeated)


def test_crash_during_save_keeps_previous(tmp_path, monkeypatch):
    run(tmp_path, "lora", "train.save_every_steps=2", "train.steps=2")
    good = ckpt.list_checkpoints(tmp_path / "lora")
    assert [p.name for p in good] == ["step-00000002"]

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated) in the middle of writing")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="simulated"):
        run(tmp_path, "lora", "train.save_every_steps=2", "train.steps=4", "train.resume=auto")
    monkeypatch.undo()
    assert (tmp_path / "lora" / "checkpoints" / ".tmp-step-00000004").is_dir()
    assert ckpt.resolve_resume("auto", tmp_path / "lora").path == good[0]
    resumed = run(tmp_path, "lora", "train.steps=3", "train.resume=auto")
    assert resumed.start_step == 2


def test_missing_checkpoint_names_path(tmp_path):
    with pytest.raises(CheckpointError, match=f"train.resume: checkpoint not found: {tmp_path}/nowhere"):
        ckpt.resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    partial = tmp_path / "half"
    partial.mkdir()
    with pytest.raises(CheckpointError, match="is not a complete checkpoint"):
        ckpt.resolve_resume(str(partial), tmp_path)


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_two_rank_checkpoint_resumes_on_one_rank(tmp_path):
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(2)]
    from test_ddp import overrides

    ov = overrides(tmp_path / "run", "ddp", "lora") + ["train.steps=2", "train.save_every_steps=2"]
    spawn_two_ranks(train_shard_of_global_batches, ov, batches, str(tmp_path / "a.pt"))
    saved = torch.load(tmp_path / "a.pt", weights_only=True)["adapters"]
    one = [o.replace("dist.engine=ddp", "dist.engine=single") for o in ov] + ["train.resume=auto", "train.steps=3"]
    from peft_dist.config import load_config

    cfg = load_config(None, one)
    trainer = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches)
    assert trainer.start_step == 2
    restored = trainer.engine.state_dict()
    for k in saved:
        assert torch.equal(restored[k], saved[k]), k
    opt_state = trainer.engine.optimizer.state
    assert opt_state and all(int(s["step"]) == 2 for s in opt_state.values())
    trainer.fit()


def test_signal_checkpoints_and_exits_for_requeue_then_resume_matches(tmp_path):
    """SIGUSR1 mid-run: the step finishes, a checkpoint is written, the run exits with the requeue status; the
    resumed run ends with exactly the adapters of an uninterrupted run."""
    import os
    import signal

    from launcher.preemption import PREEMPTED_MARKER, REQUEUE_EXIT_CODE, Preempted

    reference = run(tmp_path / "a", "lora").engine.state_dict()
    batches = fixed_batches(n=3)
    cfg = tiny_cfg(tmp_path / "b", "lora", "method.dropout=0.1", "train.steps=6", "train.log_every=1")
    trainer = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches)
    original = trainer.train_step

    def train_step(step, stream):
        out = original(step, stream)
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives mid-run, like `scancel --signal=USR1`
        return out

    trainer.train_step = train_step
    with pytest.raises(Preempted) as e:
        trainer.fit()
    # the ranks agree on a signal in the step's one all-reduce (after backward): one that arrives after it, as here
    # at the end of step 3, is acted on at the end of step 4
    assert e.value.code == REQUEUE_EXIT_CODE and e.value.step == 4
    assert (tmp_path / "b" / "lora" / PREEMPTED_MARKER).is_file()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handler removed again
    resumed = run(tmp_path / "b", "lora", "train.resume=auto")
    assert resumed.start_step == 4
    assert not (tmp_path / "b" / "lora" / PREEMPTED_MARKER).exists()
    got = resumed.engine.state_dict()
    for k in reference:
        assert torch.equal(got[k], reference[k]), k


def test_a_trainer_that_never_ran_does_not_keep_the_signal_handler(tmp_path):
    """A Trainer installs its SIGUSR1/SIGTERM handler when it is built (a signal while starting up requeues); one
    that is built and dropped must not leave it behind for the next run to restore."""
    import signal

    from launcher.preemption import PreemptionFlag

    def held_by_a_trainer(sig) -> bool:
        return isinstance(getattr(signal.getsignal(sig), "__self__", None), PreemptionFlag)

    batches = fixed_batches(n=1)
    Trainer(tiny_cfg(tmp_path / "a", "lora", "train.steps=1"), DistEnv(), torch.device("cpu"), batches, batches)
    assert held_by_a_trainer(signal.SIGUSR1)  # the dropped trainer's handler
    Trainer(tiny_cfg(tmp_path / "b", "lora", "train.steps=1"), DistEnv(), torch.device("cpu"), batches,
            batches).fit()
    assert not held_by_a_trainer(signal.SIGUSR1) and not held_by_a_trainer(signal.SIGTERM)
