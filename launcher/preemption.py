"""Cooperative preemption (spec ecosystem.md §4): a signal only sets a flag; the ranks agree on it in the step's
all-reduce (``Trainer.agree_after_backward``), every rank saves the same checkpoint, and the process exits with
:data:`REQUEUE_EXIT_CODE`, which the ``slurm/`` batch scripts turn into ``scontrol requeue``.

SLURM sends ``SIGUSR1`` ahead of the time limit with ``#SBATCH --signal=USR1@90``; ``SIGTERM`` is what a preempting
scheduler (or ``scancel``) sends. Under ``srun`` every task gets the signal; under torchrun add
``--signals-to-handle=SIGTERM,SIGINT,SIGUSR1``.
"""
from __future__ import annotations

import signal
import threading

REQUEUE_EXIT_CODE = 75
"""EX_TEMPFAIL: "try again later" — the batch script requeues the job on exactly this status."""
DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
PREEMPTED_MARKER = "preempted.json"
"""Written into train.out_dir by rank 0 next to the checkpoint; removed when a run starts."""


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits the process with REQUEUE_EXIT_CODE."""

    def __init__(self, step: int):
        super().__init__(REQUEUE_EXIT_CODE)
        self.step = step


class PreemptionFlag:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self, signals=DEFAULT_SIGNALS) -> "PreemptionFlag":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in signals:
            previous = signal.signal(sig, self._handle)
            owner = getattr(previous, "__self__", None)
            if isinstance(owner, PreemptionFlag):  # a trainer built but never run still holds it: chain past it
                previous = owner._previous.get(sig, signal.SIG_DFL)
            self._previous[sig] = previous
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 — signal handler signature
        self.requested = True
        self.signal_name = signal.Signals(signum).name
