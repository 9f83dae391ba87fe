"""The training loop: config → backbone → method → engine → fit → evaluate → artifacts.

Readable top to bottom (nanoGPT's rule): :meth:`Trainer.fit` is the loop, :meth:`Trainer.train_step` one optimizer
step over ``grad_accum`` micro-batches, :meth:`Trainer.evaluate` top-1 all-reduced over ranks. Rank 0 alone writes
files, logs to MLflow and draws the progress bar.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm import tqdm

from launcher.env import DistEnv
from launcher.preemption import PREEMPTED_MARKER, REQUEUE_EXIT_CODE, STOP_EXIT_CODE, Preempted, PreemptionFlag, \
    Stopped
from peft_dist.config import ConfigError, RunConfig, resolve_global_batch
from peft_dist.engines import parallelize
from peft_dist.engines.process_group import all_reduce_sum, distinct_over_ranks
from peft_dist.memory import MemoryProfiler, MemoryReport
from peft_dist.memory.profiler import memory_document, memory_metrics
from peft_dist.methods.base import TrainPlan, count_trainable
from peft_dist.methods.registry import build_method
from peft_dist.models.backbone import create_backbone
from peft_dist.tracking import make_tracker
from peft_dist.tracking.mlflow_logger import RUN_ID_FILE
from peft_dist.train.checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from peft_dist.train.ema import TrainableEma
from peft_dist.train.errors import Diverged


PAPER_PROTOCOL_LABEL = "paper (best test epoch: selected on the test split, not a held-out estimate)"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: RunConfig, on_meta_for_engine: bool = False):
    """The backbone with the method applied (identical on every rank: same seed before creation). With
    ``on_meta_for_engine`` (the trainer, under sharded initialization: :func:`sharded_init`) it stays on the meta
    device, recorded, and the engine materializes its shards with the same values after sharding
    (``peft_dist.models.materialize``); the dry run, the estimator and evaluation get the plain model."""
    seed_everything(cfg.train.seed)

    def backbone(checkpoint=None):
        return create_backbone(cfg.model.name, cfg.model.num_classes, checkpoint,
                               drop_path_rate=cfg.model.drop_path_rate, **cfg.model.kwargs)

    def with_method(model):
        method = build_method(cfg.method.name, **cfg.method.options)
        method.apply(model)
        return method

    if on_meta_for_engine:
        from peft_dist.models.materialize import build_on_meta

        return build_on_meta(backbone, with_method, cfg.model.checkpoint)
    model = backbone(cfg.model.checkpoint)
    return model, with_method(model)


def sharded_init(cfg: RunConfig) -> bool:
    """Engines that shard the frozen weights build them on meta and fill only each rank's shards (ZeRO-1/2
    replicate the frozen weights on every rank anyway: they build in full)."""
    return cfg.dist.init == "sharded" and (cfg.dist.engine == "fsdp2" or
                                           cfg.dist.engine == "deepspeed" and cfg.dist.zero_stage == 3)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_adapters(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Loader batches are ``Batch(images, labels, skipped sample ids)``; plain ``(images, labels)`` pairs are
    accepted too."""
    if len(batch) == 3:
        return batch[0], batch[1], tuple(batch[2])
    return batch[0], batch[1], ()


def _batches_per_epoch(loader: Iterable) -> int:
    n = getattr(loader, "batches_per_epoch", None)
    return int(n) if n is not None else len(loader)  # type: ignore[arg-type]


RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "memory.json", "adapter.safetensors",
             PREEMPTED_MARKER, "checkpoints", RUN_ID_FILE)
"""What a started or finished run leaves in its out_dir (a run with ``resume: none`` never writes over these)."""


def check_out_dir(out_dir: Path, resume: str, overwrite: bool) -> list[Path]:
    """The run files in ``out_dir`` that a new run (``resume: none``) would replace; refused unless ``overwrite``."""
    for parent in out_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"train.out_dir: {parent} is a file, not a directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.out_dir: {out_dir} is a file, not a directory")
    if resume != "none" or not out_dir.is_dir():
        return []
    found = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    if found and not overwrite:
        raise ConfigError(f"train.out_dir: {out_dir} already holds a run ({', '.join(p.name for p in found)}); "
                          "continue it with train.resume=auto, or replace it with train.overwrite=true")
    return found


def remove_run_files(paths: list[Path]) -> None:
    import shutil

    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class Trainer:
    def __init__(self, cfg: RunConfig, env: DistEnv, device: torch.device,
                 train_loader: Iterable | None = None, eval_loader: Iterable | None = None,
                 preemption: PreemptionFlag | None = None):
        # from the first moment a SLURM signal is a request to requeue (its default action would kill the job); the
        # CLI hands in the flag it installed when the process started and removes it when the process ends
        self.owns_preemption = preemption is None
        self.preemption = PreemptionFlag().install() if preemption is None else preemption
        self.stop_agreed = False  # set with the step's flags: a rank got SIGTERM (stop, no requeue)
        try:
            self.set_up(cfg, env, device, train_loader, eval_loader)
        except BaseException:
            self.release_preemption()
            raise

    def release_preemption(self) -> None:
        if self.owns_preemption:
            self.preemption.uninstall()

    def set_up(self, cfg: RunConfig, env: DistEnv, device: torch.device, train_loader: Iterable | None,
               eval_loader: Iterable | None) -> None:
        self.cfg, self.env, self.device = resolve_global_batch(cfg, env.world_size), env, device
        self.out_dir = Path(cfg.train.out_dir)
        replaced = check_out_dir(self.out_dir, cfg.train.resume, cfg.train.overwrite)
        builds_loaders = train_loader is None or eval_loader is None
        if builds_loaders:  # data errors surface before the model is built
            from peft_dist.data import build_eval_loader, build_train_loader
            train_loader = train_loader or build_train_loader(cfg.data, env.rank, env.world_size, cfg.train.seed)
            eval_loader = eval_loader or build_eval_loader(cfg.data, env.rank, env.world_size)
        self.train_loader, self.eval_loader = train_loader, eval_loader
        data_classes = getattr(getattr(train_loader, "info", None), "num_classes", None)
        if data_classes is not None and data_classes != cfg.model.num_classes:
            raise ConfigError(f"model.num_classes: got {cfg.model.num_classes}, but the data has {data_classes} "
                              f"classes; set model.num_classes={data_classes}")
        self.model, self.method = build_model(cfg, on_meta_for_engine=sharded_init(cfg))
        if builds_loaders:  # loaders handed in (tests, notebooks) bring images of their own size
            from peft_dist.models.backbone import check_image_size

            check_image_size(self.model, cfg.data.img_size)
        self.param_counts = count_trainable(self.model)

        self.steps_per_epoch = max(1, _batches_per_epoch(train_loader) // cfg.train.grad_accum)
        self.total_steps = cfg.train.steps or cfg.train.epochs * self.steps_per_epoch
        warmup = cfg.optim.warmup_steps or round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.engine = parallelize(self.model, self.method, cfg, env, device, self.total_steps, warmup,
                                  steps_per_epoch=self.steps_per_epoch)
        self.ema = None if cfg.train.ema_decay is None else TrainableEma(self.engine.module, cfg.train.ema_decay)

        self.profiler = MemoryProfiler(env.rank, device, enabled=cfg.memory.enabled, config=cfg.memory,
                                       out_dir=self.out_dir, world_size=env.world_size)
        self.engine.phase = self.profiler.phase
        tags = {"world_size": str(env.world_size), "engine": cfg.dist.engine, "method": cfg.method.name,
                "backend": "nccl" if device.type == "cuda" else "gloo", "model": cfg.model.name,
                "precision": self.engine.precision}
        self.skipped: set[int] = set()
        self.images_seen = 0
        self.nonfinite_skipped = self.nonfinite_in_row = 0
        self.start_step = 0
        self.eval_history: list[dict[str, float]] = []
        self.save_interval_s = 60.0 * cfg.train.checkpoint_interval_minutes()
        self.last_save_time, self.last_saved_step = time.monotonic(), -1
        resume_from = resolve_resume(cfg.train.resume, self.out_dir, device)
        if resume_from is not None:  # reads only: a checkpoint that does not fit leaves the directory as it was
            self.restore(resume_from)
        # every check has passed: only now does this run take the directory (and replace an old run, if asked);
        # the barrier keeps rank 0's writes from reaching a rank that has not looked at the directory yet
        if dist.is_initialized():
            dist.barrier()
        if env.is_main:
            remove_run_files(replaced)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out_dir / "config.yaml")
        # resume=auto continues the MLflow run of this directory even before its first checkpoint (a job preempted
        # while starting up is requeued into the same run)
        self.tracker = make_tracker(cfg, env.is_main, tags, resuming=cfg.train.resume != "none")
        if resume_from is not None:
            if env.is_main:
                self.truncate_metrics(self.start_step)
                print(f"resumed from {resume_from.path} at step {self.start_step}{self.resume_note}")
            self.tracker.set_tags({"resumed_at_step": str(self.start_step)})

    def restore(self, verified) -> None:
        state = load_checkpoint(self.engine, verified, self.cfg)
        self.start_step = state.step
        self.engine.scheduler.load_state_dict(state.scheduler)
        self.method.load_state_dict(state.method)
        self.skipped = {int(i) for i in state.trainer["skipped"]}
        self.images_seen = int(state.trainer["images_seen"])
        self.nonfinite_skipped = int(state.trainer.get("nonfinite_steps_skipped", 0))
        self.engine.load_scaler_state(state.scaler)
        if (state.ema is None) != (self.ema is None):
            from peft_dist.models.backbone import CheckpointError

            raise CheckpointError(f"checkpoint {verified.path} was written {'without' if state.ema is None else 'with'}"
                                  f" an EMA, this run has train.ema_decay={self.cfg.train.ema_decay}")
        if self.ema is not None:
            self.ema.load_full_tensors(state.ema)
        self.resume_note = "" if state.rng_restored else " (another world size: each rank keeps its seeded RNG)"

    def truncate_metrics(self, step: int) -> None:
        """Drop records the interrupted run logged after its last checkpoint: they will be logged again."""
        path = self.out_dir / "metrics.jsonl"
        if path.is_file():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            atomic_write_text(path, "".join(ln + "\n" for ln in kept))

    def save(self, step: int) -> Path:
        """A checkpoint after ``step`` optimizer steps (every rank calls this)."""
        trainer_state = {"skipped": sorted(self.skipped), "images_seen": self.images_seen,
                         "nonfinite_steps_skipped": self.nonfinite_skipped,
                         "micro_batches_consumed": step * self.cfg.train.grad_accum}
        path = save_checkpoint(self.engine, self.cfg, self.out_dir, step, trainer_state,
                               self.engine.scheduler.state_dict(), self.method.state_dict(),
                               keep=self.cfg.train.keep_checkpoints, scaler_state=self.engine.scaler_state(),
                               ema=None if self.ema is None else self.ema.full_tensors())
        self.last_saved_step, self.last_save_time = step, time.monotonic()
        return path

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        plan = TrainPlan(self.total_steps, self.steps_per_epoch, -(-self.total_steps // self.steps_per_epoch))
        self.method.on_train_start(self.model, plan)
        batches = self.batch_stream(self.start_step * cfg.train.grad_accum)
        # in a log file (CI, SLURM) redraw rarely instead of once per step
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc="train",
                   disable=not (self.env.is_main and cfg.train.progress), dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 30.0)
        start = window_start = time.perf_counter()
        window_images, window_loss, window_steps = 0, 0.0, 0
        (self.out_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        mode = "a" if self.start_step else "w"
        metrics_file = (self.out_dir / "metrics.jsonl").open(mode) if self.env.is_main else None
        try:
            preempted, _ = self.step_end_flags()
            if preempted:  # signalled while starting up: nothing new to save
                self.exit_for_requeue(self.start_step, save=False)
            for step in range(self.start_step, self.total_steps):
                epoch = step // self.steps_per_epoch
                if step % self.steps_per_epoch == 0:
                    self.start_epoch(epoch)
                loss, lr, images = self.train_step(step, batches)
                window_loss, window_images, window_steps = window_loss + loss, window_images + images, window_steps + 1
                bar.update(1)
                last = step + 1 == self.total_steps
                if (step + 1) % cfg.train.log_every == 0 or last:
                    loss_sum, n, imgs = all_reduce_sum([window_loss, window_steps, window_images], self.device)
                    elapsed = time.perf_counter() - window_start
                    record = {"step": step + 1, "epoch": epoch, "loss": loss_sum / n, "lr": lr,
                              "images_per_s": imgs / max(elapsed, 1e-9)}
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                    if metrics_file:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                    self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step=step + 1)
                    window_start, window_images, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
                preempted, save_due = self.step_flags  # agreed with the step's non-finite check
                # the last step is saved whenever checkpoints are periodic: a kill during the final evaluation
                # then resumes at the end and only evaluates again
                periodic = cfg.train.save_every_steps and (step + 1) % cfg.train.save_every_steps == 0
                if periodic or save_due or (last and (cfg.train.save_every_steps or self.save_interval_s)):
                    self.save(step + 1)
                if not last and preempted:
                    self.exit_for_requeue(step + 1, save=self.last_saved_step != step + 1)
                if not last and self.eval_due(step + 1):
                    self.record_eval(step + 1, self.evaluate_live_and_ema(), metrics_file)
            bar.close()
            train_time = time.perf_counter() - start
            final = self.evaluate_live_and_ema()
            preempted, _ = self.step_end_flags()
            if preempted:  # signalled during the final evaluation: the requeued job evaluates again
                self.exit_for_requeue(self.total_steps, save=self.last_saved_step != self.total_steps)
            self.record_eval(self.total_steps, final, metrics_file, log=False)  # finish() logs the final one
            return self.finish(final["top1"], train_time)
        finally:
            self.release_preemption()
            bar.close()
            if metrics_file:
                metrics_file.close()

    def step_end_flags(self) -> tuple[bool, bool]:
        """(preempted, checkpoint due), agreed by every rank in one all-reduce: any rank's signal counts, and
        rank 0's clock alone decides the timed checkpoint (ranks' clocks drift)."""
        due = self.env.is_main and self.save_interval_s > 0 and \
            time.monotonic() - self.last_save_time >= self.save_interval_s
        requeue, stop, due_sum = all_reduce_sum([float(self.preemption.requested),
                                                 float(self.preemption.stop_requested), float(due)], self.device)
        self.stop_agreed = stop > 0
        return requeue > 0 or stop > 0, due_sum > 0

    def exit_for_requeue(self, step: int, save: bool) -> None:
        """After an agreed signal: checkpoint, then exit for requeue (SIGUSR1) or, when any rank got SIGTERM
        (scancel; SLURM requeues a preempted job itself), stop without a marker (launcher/preemption.py)."""
        if save:
            self.save(step)
        stop = self.stop_agreed
        if self.env.is_main:
            if not stop:  # torchrun reports any worker exit as 1, so leave a marker the batch script can see too
                atomic_write_text(self.out_dir / PREEMPTED_MARKER, json.dumps({"step": step}) + "\n")
            what = f"exiting with status {STOP_EXIT_CODE}, not requeued" if stop else \
                f"exiting with status {REQUEUE_EXIT_CODE} for requeue"
            print(f"{'stopped' if stop else 'preempted'} ({self.preemption.signal_name or 'another rank'}): "
                  f"checkpoint at step {step} {'written' if save else 'kept'}; {what}", flush=True)
        # the marker is on disk before any rank exits: srun --kill-on-bad-exit would kill rank 0 mid-write
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        self.tracker.set_tags({"stopped_at_step" if stop else "preempted_at_step": str(step)})
        raise Stopped(step) if stop else Preempted(step)

    def eval_due(self, steps_done: int) -> bool:
        """Evaluate at an epoch end. ``standard``: after every ``eval_every_epochs`` completed epochs. ``paper``:
        the official epochs — after 0-based epoch ``e`` when ``e % val_interval == 0 or e >= epochs - 10``
        (SNELL/SNELLA/SPT's scripts; val_interval = ``eval_every_epochs``, 10 by default): 100 epochs evaluate
        after epochs 0, 10, ..., 80 and every one of 90-99."""
        if steps_done % self.steps_per_epoch:
            return False
        completed = steps_done // self.steps_per_epoch
        if self.cfg.train.protocol != "paper":
            every = self.cfg.train.eval_every_epochs
            return bool(every and completed % every == 0)
        epoch = completed - 1  # the 0-based index of the epoch just trained
        val_interval = self.cfg.train.eval_every_epochs or 10
        total_epochs = -(-self.total_steps // self.steps_per_epoch)
        return epoch % val_interval == 0 or epoch >= total_epochs - 10

    def batch_stream(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Micro-batches across epoch boundaries (the loader is re-seeded per epoch), from micro-batch ``start``:
        a resumed run skips exactly what the interrupted one consumed, so it sees the same data afterwards."""
        per_epoch = _batches_per_epoch(self.train_loader)
        epoch, skip = divmod(start, per_epoch)
        seeks = hasattr(self.train_loader, "start_batch")  # the data package's loaders resume an epoch themselves
        while True:
            if seeks:
                self.train_loader.set_epoch(epoch, start_batch=skip)
            elif hasattr(self.train_loader, "set_epoch"):
                self.train_loader.set_epoch(epoch)
            for i, batch in enumerate(self.train_loader):
                if seeks or i >= skip:
                    yield _unpack(batch)
            epoch, skip = epoch + 1, 0

    def start_epoch(self, epoch: int) -> None:
        self.method.on_epoch_start(self.model, epoch)
        if self.env.is_main:
            self.tracker.log_artifacts(self.method.write_artifacts(self.model, self.out_dir), "method")

    def train_step(self, step: int, batches: Iterator) -> tuple[float, float, int]:
        """One optimizer step over grad_accum micro-batches; returns (mean loss, lr, images on this rank). The loss
        stays on the device until the step's one host synchronisation (:meth:`agree_after_backward`)."""
        self.engine.train_mode(True)
        accum = self.cfg.train.grad_accum
        loss_sum, images = torch.zeros((), device=self.device), 0
        for micro in range(accum):
            x, y, skipped = next(batches)
            self.skipped.update(skipped)
            loss_sum += self.engine.forward_backward(x, y, sync=micro == accum - 1).float()
            images += y.shape[0]
        loss = loss_sum / accum
        grad_norm = self.engine.grad_norm()
        bad = self.agree_after_backward(loss, grad_norm)
        loss_value = float(loss)
        self.images_seen += images
        if bad and not self.may_apply(step, loss_value, None if grad_norm is None else float(grad_norm), bad):
            self.engine.skip_step()
            return loss_value, self.engine.optimizer.param_groups[0]["lr"], images
        self.nonfinite_in_row = 0
        first = step == self.start_step  # a resumed run measures its state like a fresh one
        if first:
            self.profiler.capture_state(self.engine.module, self.engine.optimizer)
        with self.profiler.phase("optimizer"):
            lr = self.engine.step(step)
            if self.ema is not None:  # after every optimizer step, a scaler-skipped one too (timm's ModelEma)
                self.ema.update()
        if first:  # a fresh optimizer's state exists only after its first step
            self.profiler.capture_state(self.engine.module, self.engine.optimizer)
        return loss_value, lr, images

    def agree_after_backward(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> int:
        """The step's one all-reduce, and its only host synchronisation: how many ranks saw a non-finite loss or
        gradient norm, whether any rank was signalled, and whether rank 0's clock says a timed checkpoint is due
        (kept in ``self.step_flags`` for the end of the step). Returns the non-finite count."""
        finite = torch.isfinite(loss) if grad_norm is None else torch.isfinite(loss) & torch.isfinite(grad_norm)
        due = self.env.is_main and self.save_interval_s > 0 and \
            time.monotonic() - self.last_save_time >= self.save_interval_s
        flags = torch.stack([(~finite).to(torch.float32),
                             torch.tensor(float(self.preemption.requested), device=self.device),
                             torch.tensor(float(self.preemption.stop_requested), device=self.device),
                             torch.tensor(float(due), device=self.device)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags)
        bad, requeue, stop, save_due = flags.tolist()
        self.step_flags = (requeue > 0 or stop > 0, save_due > 0)
        self.stop_agreed = stop > 0
        return int(bad)

    def may_apply(self, step: int, loss: float, grad_norm: float | None, bad: int) -> bool:
        """After ``bad`` ranks saw a non-finite loss or gradient norm: stop the run before the optimizer applies it,
        or, with ``train.on_nonfinite=skip``, drop the step (at most ``max_nonfinite_skips`` in a row)."""
        t = self.cfg.train
        self.nonfinite_in_row += 1
        what = f"the loss is {loss}" if not np.isfinite(loss) else f"the gradient norm is {grad_norm}"
        if t.on_nonfinite == "skip" and self.nonfinite_in_row <= t.max_nonfinite_skips:
            self.nonfinite_skipped += 1
            if self.env.is_main:
                print(f"warning: step {step + 1} skipped: {what} on rank {self.env.rank} (non-finite on {bad} "
                      f"rank(s); {self.nonfinite_in_row} in a row)", file=sys.stderr, flush=True)
            return False
        checkpoints = list_checkpoints(self.out_dir)
        last = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written"
        row = f" after {self.nonfinite_in_row - 1} skipped step(s) in a row" if t.on_nonfinite == "skip" else ""
        raise Diverged(f"training diverged at step {step + 1}{row}: {what} on rank {self.env.rank} (non-finite on "
                       f"{bad} rank(s)); nothing of this step was applied; {last}; lower optim.lr or set "
                       "optim.grad_clip")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Top-1 over the eval split; every sample counted once across ranks (the loader guarantees it)."""
        self.engine.train_mode(False)
        correct = total = 0
        with self.profiler.phase("eval"):
            for batch in self.eval_batches():
                x, y, skipped = _unpack(batch)
                self.skipped.update(skipped)
                pred = self.engine.predict(x).argmax(dim=-1).cpu()
                correct += int((pred[:y.numel()] == y).sum())
                total += int(y.numel())
        correct, total = all_reduce_sum([correct, total], self.device)
        self.engine.train_mode(True)
        return correct / max(total, 1)

    def evaluate_live_and_ema(self) -> dict[str, float]:
        """``top1`` of the live adapters; with ``train.ema_decay`` also ``top1_ema`` (the averages swapped in)
        and ``top1_max``, the larger (SNELLA's FGVC figure)."""
        result = {"top1": self.evaluate()}
        if self.ema is not None:
            reshard_fsdp(self.engine.module)  # an unsharded FSDP2 group would not see the swap (nor the swap back)
            with self.ema.swapped_in():
                result["top1_ema"] = self.evaluate()
                reshard_fsdp(self.engine.module)
            result["top1_max"] = max(result["top1"], result["top1_ema"])
        return result

    def record_eval(self, step: int, result: dict[str, float], metrics_file, log: bool = True) -> None:
        """An evaluation into the summary's history and MLflow; with an EMA also a line of metrics.jsonl."""
        self.eval_history.append({"step": step, "epoch": step / self.steps_per_epoch, **result})
        if metrics_file and self.ema is not None:
            metrics_file.write(json.dumps({"step": step, "epoch": step / self.steps_per_epoch,
                                           **{f"eval_{k}": v for k, v in result.items()}}) + "\n")
            metrics_file.flush()
        if log:
            self.tracker.log_metrics({f"eval_{k}": v for k, v in result.items()}, step=step)

    def eval_batches(self) -> Iterator:
        """The eval loader; when a forward runs collectives (sharded weights), ranks stay in lock-step and a rank
        whose share is exhausted runs dummy forwards (no labels, nothing counted) until every rank is done."""
        if not (self.engine.forward_needs_all_ranks and dist.is_initialized()):
            yield from self.eval_loader
            return
        size = getattr(getattr(self.engine.module, "patch_embed", None), "img_size", (self.cfg.data.img_size,) * 2)
        dummy = (torch.zeros(1, 3, *size), torch.zeros(0, dtype=torch.long), ())
        batches = iter(self.eval_loader)
        while True:
            batch = next(batches, None)
            alive = torch.tensor([0 if batch is None else 1], device=self.device)
            dist.all_reduce(alive, op=dist.ReduceOp.MAX)
            if alive.item() == 0:
                return
            yield dummy if batch is None else batch

    # ------------------------------------------------------------------ outputs
    def finish(self, top1: float, train_time: float) -> dict[str, Any]:
        cfg = self.cfg
        images_total, = all_reduce_sum([self.images_seen], self.device)
        skipped = len(distinct_over_ranks(self.skipped, self.device))
        memory = self.gather_memory(self.profiler.finish())
        summary = {
            "status": "finished",
            "top1": top1,
            "eval_split": cfg.data.eval_split,
            "steps": self.total_steps,
            "epochs": self.total_steps / self.steps_per_epoch,
            **self.param_counts,
            "wall_time_s": train_time,
            "images_per_s": images_total / max(train_time, 1e-9),
            "skipped_samples": int(skipped),
            "nonfinite_steps_skipped": self.nonfinite_skipped,
            "sampling": getattr(self.train_loader, "sampling", "custom"),
            "padded_samples_per_epoch": int(getattr(self.train_loader, "padded_samples_per_epoch", 0)),
            "world_size": self.env.world_size,
            "engine": cfg.dist.engine,
            "precision": self.engine.precision,
            "method": cfg.method.name,
            "model": cfg.model.name,
            "task": self.task_name(),
            "peak_memory_bytes_per_rank": [r.peak_bytes for r in memory],
            # CUDA: the allocator's peak; CPU: the process's max RSS (which also holds earlier work of the process)
            "peak_memory_kind": "allocated" if any(r.peak_allocated_bytes is not None for r in memory) else "rss",
            # parameters + buffers + gradients + optimizer state, counted exactly from the tensors on any device
            "state_memory_bytes_per_rank": [r.static_bytes for r in memory],
            "method_summary": self.method.summary(self.model),
            "protocol": "standard (last epoch)",
            "eval_history": self.eval_history,
        }
        final = self.eval_history[-1]
        if self.ema is not None:
            summary["top1_ema"], summary["top1_max"] = final["top1_ema"], final["top1_max"]
        if self.engine.scaler is not None:
            summary["fp16_scaler"] = {"skipped_steps": self.engine.scaler_skipped_steps,
                                      "final_scale": self.engine.scaler.get_scale()}
        if cfg.train.protocol == "paper":
            # with an EMA the official figure is max(best live, best EMA): the best epoch of the larger of the two
            score = "top1_max" if self.ema is not None else "top1"
            best = max(self.eval_history, key=lambda e: e[score])
            summary["protocol"] = PAPER_PROTOCOL_LABEL
            summary["top1_paper_protocol"] = best[score]
            summary["top1_paper_protocol_epoch"] = best["epoch"]
        adapters = self.engine.state_dict(adapters_only=True)
        if self.env.is_main:
            out = self.out_dir
            summary["mlflow_tracking_uri"] = self.tracker.tracking_uri
            summary["mlflow_run_id"] = self.tracker.run_id
            atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
            atomic_write_text(out / "memory.json", json.dumps(memory_document(memory), indent=2))
            save_adapters(out / "adapter.safetensors", adapters,
                          {"method": cfg.method.name, "model": cfg.model.name})
            artifacts = [out / "config.yaml", out / "summary.json", out / "memory.json", out / "adapter.safetensors",
                         out / "metrics.jsonl"]
            artifacts += self.method.write_artifacts(self.model, out)
            artifacts += [Path(f) for r in memory for f in r.snapshot_files if Path(f).is_file()]
            if cfg.train.protocol == "paper":
                self.tracker.set_tags({"protocol": PAPER_PROTOCOL_LABEL})
                self.tracker.log_metrics({"eval_top1_paper_protocol": summary["top1_paper_protocol"]})
            final_evals = {f"eval_{k}": final[k] for k in ("top1_ema", "top1_max") if k in final}
            if self.engine.scaler is not None:
                final_evals["fp16_scaler_skipped_steps"] = self.engine.scaler_skipped_steps
            self.tracker.log_metrics({"eval_top1": top1, **final_evals, "images_per_s": summary["images_per_s"],
                                      "skipped_samples": summary["skipped_samples"],
                                      **{f"peak_memory_bytes_rank{r.rank}": r.peak_bytes for r in memory},
                                      **memory_metrics(memory)},
                                     step=self.total_steps)
            self.tracker.log_artifacts(artifacts)
        self.tracker.finish()
        return summary

    def task_name(self) -> str | None:
        """The benchmark task the shards were written from (``vtab/cifar``), if the data set records one."""
        info = getattr(self.train_loader, "info", None)
        return getattr(info, "task", None) or (info.get("task") if isinstance(info, dict) else None)

    def gather_memory(self, mine: MemoryReport) -> list[MemoryReport]:
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return [mine]
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine.to_dict())
        return [MemoryReport(**d) for d in gathered]


def reshard_fsdp(module) -> None:
    """Put every FSDP2 group of ``module`` back to its shards (a no-op for other engines' modules)."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def train(cfg: RunConfig, env: DistEnv, device: torch.device, train_loader=None, eval_loader=None,
          preemption: PreemptionFlag | None = None) -> dict:
    trainer = Trainer(cfg, env, device, train_loader, eval_loader, preemption)
    try:
        return trainer.fit()
    except (Preempted, Stopped):
        trainer.tracker.finish("KILLED")
        raise
    except Diverged as e:
        if env.is_main:
            atomic_write_text(trainer.out_dir / "summary.json",
                              json.dumps({"status": "failed", "reason": str(e)}, indent=2) + "\n")
        trainer.tracker.set_tags({"status": "diverged"})
        trainer.tracker.finish("FAILED")
        raise
    except BaseException:
        trainer.tracker.finish("FAILED")
        raise

