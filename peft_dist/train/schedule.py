"""Learning-rate schedules (``optim.schedule``), built for the engines' per-optimizer-step ``scheduler.step()``.

``cosine`` (the default)
    The project's own: linear warm-up from ``warmup_start_lr`` to ``lr`` over ``warmup_steps`` optimizer steps
    (or ``warmup_epochs`` converted to steps), then a cosine to ``min_lr``, updated every step.

``timm_epoch`` — the papers' schedule
    SNELL, SNELLA and SPT build timm's ``CosineLRScheduler`` through ``create_scheduler`` (t_initial = epochs,
    warmup_t = 10, warmup_lr_init = 1e-6, lr_min = 1e-5, warmup_prefix False; spec snell_snella §5.1, spt_arc_hta
    §1.6) and call ``lr_scheduler.step(epoch)`` *after* training epoch ``epoch``. So epoch ``e`` trains at the
    schedule's value for ``e - 1``, and epochs 0 and 1 both train at warmup_lr_init (timm sets it when the
    scheduler is built, and ``step(0)`` sets it again). :class:`TimmEpochSchedule` holds timm's own scheduler —
    its values are never re-derived here — and calls ``step(epoch)`` when the engine's per-step ``step()`` completes
    an epoch. DeepSpeed's engine calls the same ``step()`` once per optimizer step, so it works there unchanged.
"""
from __future__ import annotations

import math
from typing import Any

import torch

SCHEDULES = ("cosine", "timm_epoch")


def cosine_factor(step: int, total_steps: int, warmup_steps: int, base_lr: float, warmup_start_lr: float,
                  min_lr: float) -> float:
    """Multiplier on ``base_lr`` at ``step`` (``cosine``): linear warm-up from warmup_start_lr, then cosine to
    min_lr over the remaining steps."""
    if warmup_steps > 0 and step < warmup_steps:
        lr = warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup_steps
    else:
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        lr = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    return lr / base_lr


def build_schedule(optimizer: torch.optim.Optimizer, optim_cfg, total_steps: int, warmup_steps: int,
                   steps_per_epoch: int | None = None):
    """The scheduler ``optim.schedule`` names; the engine calls its ``step()`` after every optimizer step.

    ``warmup_steps`` is what the trainer converts ``optim.warmup_epochs`` to (``warmup_epochs x steps_per_epoch``).
    ``timm_epoch`` needs the epoch length (``steps_per_epoch``, which the trainer passes); its warm-up is timm's
    ``warmup_t`` = ``optim.warmup_epochs``, fractional or 0 included. Without ``steps_per_epoch`` (an engine built
    outside the trainer) the length is inferred from a whole number of warm-up epochs, or refused."""
    if optim_cfg.schedule == "cosine":
        cfg = optim_cfg
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: cosine_factor(s, total_steps, warmup_steps, cfg.lr, cfg.warmup_start_lr, cfg.min_lr))
    if optim_cfg.schedule == "timm_epoch":
        if steps_per_epoch is None:
            warmup_epochs = int(optim_cfg.warmup_epochs)
            if warmup_epochs < 1 or warmup_epochs != optim_cfg.warmup_epochs or warmup_steps % warmup_epochs:
                raise ValueError(f"optim.schedule=timm_epoch: the epoch length is not given and a warm-up of "
                                 f"{warmup_steps} steps is not optim.warmup_epochs={optim_cfg.warmup_epochs} whole "
                                 "epochs to infer it from")
            steps_per_epoch = warmup_steps // warmup_epochs
        return TimmEpochSchedule(optimizer, optim_cfg, steps_per_epoch, epochs=-(-total_steps // steps_per_epoch))
    raise ValueError(f"optim.schedule: got {optim_cfg.schedule!r}; allowed: {', '.join(SCHEDULES)}")


class TimmEpochSchedule:
    """timm's ``CosineLRScheduler`` stepped the official way, behind the per-optimizer-step ``step()`` the engines
    call: after every ``steps_per_epoch`` steps it calls timm's ``step(epoch)`` with the 0-based index of the epoch
    just finished (spec snell_snella §5.1: the lr lags one epoch)."""

    def __init__(self, optimizer: torch.optim.Optimizer, optim_cfg, steps_per_epoch: int, epochs: int):
        from timm.scheduler import CosineLRScheduler

        if steps_per_epoch < 1 or epochs < 1:
            raise ValueError(f"timm_epoch schedule: steps_per_epoch={steps_per_epoch}, epochs={epochs}; both >= 1")
        self.optimizer = optimizer
        self.steps_per_epoch = steps_per_epoch
        self.steps_done = 0
        # construction sets every group's lr to warmup_lr_init (timm does it itself when warmup_t > 0)
        self.timm = CosineLRScheduler(optimizer, t_initial=epochs, lr_min=optim_cfg.min_lr,
                                      warmup_t=float(optim_cfg.warmup_epochs),
                                      warmup_lr_init=optim_cfg.warmup_start_lr,
                                      warmup_prefix=optim_cfg.warmup_prefix, t_in_epochs=True)

    def step(self) -> None:
        self.steps_done += 1
        if self.steps_done % self.steps_per_epoch == 0:
            self.timm.step(self.steps_done // self.steps_per_epoch - 1)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (the checkpoint stores them as JSON): the step count and timm's own state (its
        construction settings; timm's scheduler is otherwise a function of the epoch it is stepped with)."""
        plain = (int, float, str, bool, type(None), list, tuple, dict)
        timm_state = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.timm.state_dict().items()
                      if isinstance(v, plain)}
        return {"schedule": "timm_epoch", "steps_done": self.steps_done, "steps_per_epoch": self.steps_per_epoch,
                "timm": timm_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was saved, and set the lr the next step trains at (a resumed run continues at
        the same lr whatever the restored optimizer's param groups hold)."""
        if state.get("schedule") != "timm_epoch":
            raise ValueError(f"the checkpoint's scheduler is {state.get('schedule', 'cosine')!r}, this run's is "
                             "timm_epoch (optim.schedule)")
        if int(state["steps_per_epoch"]) != self.steps_per_epoch:
            raise ValueError(f"the checkpoint's scheduler has {state['steps_per_epoch']} steps per epoch, this run "
                             f"{self.steps_per_epoch}")
        self.timm.load_state_dict(dict(state["timm"]))
        self.steps_done = int(state["steps_done"])
        epochs_done = self.steps_done // self.steps_per_epoch
        if epochs_done:
            self.timm.step(epochs_done - 1)
        else:
            self.timm.update_groups(self.timm.warmup_lr_init if self.timm.warmup_t else self.timm.base_values)
