"""Cooperative preemption (spec ecosystem.md §4): a signal only sets a flag; the ranks agree on it in the step's
all-reduce (``Trainer.agree_after_backward``), every rank saves the same checkpoint, and the process exits.

Which signal means what, on SLURM:

- ``SIGUSR1`` — *requeue*. ``#SBATCH --signal=USR1@90`` sends it to the job's steps 90 s before the time limit; with
  ``SlurmctldParameters=preempt_send_user_signal`` SLURM also sends it when a job is preempted, at the start of its
  ``GraceTime``; ``scancel --signal=USR1 JOB`` sends it by hand. The process checkpoints, rank 0 writes
  :data:`PREEMPTED_MARKER` (before the last barrier, so no rank exits first and gets rank 0 killed by
  ``srun --kill-on-bad-exit``), and it exits with :data:`REQUEUE_EXIT_CODE`; the ``slurm/`` batch scripts turn either
  into ``scontrol requeue``.
- ``SIGTERM`` — *stop*. ``scancel JOB`` sends it (then SIGKILL after ``KillWait``), and so does a preemption with
  ``PreemptMode=REQUEUE`` or ``CANCEL`` at the end of ``GraceTime``: SLURM requeues a preempted job itself, and a
  cancelled job must stay cancelled. The process checkpoints (the requeued job resumes from it) and exits with
  :data:`STOP_EXIT_CODE`, writing no marker, so the batch script does not requeue.

Under ``srun`` every task gets the signal; under torchrun add ``--signals-to-handle=SIGTERM,SIGINT,SIGUSR1``.
DataLoader workers ignore SIGUSR1 (:func:`ignore_in_worker`): only the training process acts on it.
"""
from __future__ import annotations

import signal
import threading

REQUEUE_EXIT_CODE = 75
"""EX_TEMPFAIL: "try again later" — the batch script requeues the job on exactly this status."""
STOP_EXIT_CODE = 128 + signal.SIGTERM
"""What a shell reports for a process ended by SIGTERM; the batch script does not requeue on it."""
REQUEUE_SIGNALS = (signal.SIGUSR1,)
STOP_SIGNALS = (signal.SIGTERM,)
DEFAULT_SIGNALS = REQUEUE_SIGNALS + STOP_SIGNALS
PREEMPTED_MARKER = "preempted.json"
"""Written into train.out_dir by rank 0 next to the checkpoint; removed by the batch script before srun and when a
run starts training."""


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits the process with REQUEUE_EXIT_CODE."""

    def __init__(self, step: int):
        super().__init__(REQUEUE_EXIT_CODE)
        self.step = step


class Stopped(SystemExit):
    """Raised after a stop signal's checkpoint is written; exits with STOP_EXIT_CODE (no requeue)."""

    def __init__(self, step: int):
        super().__init__(STOP_EXIT_CODE)
        self.step = step


class PreemptionFlag:
    def __init__(self) -> None:
        self.requested = False
        """A requeue signal (SIGUSR1) arrived."""
        self.stop_requested = False
        """A stop signal (SIGTERM) arrived."""
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
        if signum in STOP_SIGNALS:
            self.stop_requested = True
        else:
            self.requested = True
        self.signal_name = signal.Signals(signum).name


def ignore_in_worker(worker_id: int) -> None:  # noqa: ARG001 — DataLoader's worker_init_fn signature
    """DataLoader ``worker_init_fn``: SLURM signals every process of the step, loader workers included. A worker
    started by fork would run the trainer's handler on a copy of its flag, one started by spawn would die of the
    default action and fail the batch the training process needs to reach its checkpoint; so a worker ignores
    SIGUSR1 and leaves the requeue to the training process.

    SIGTERM keeps its default action: the DataLoader ends a worker that does not stop when asked (stuck on a bad
    sample, say) with SIGTERM, and so does multiprocessing at exit; a worker ignoring it made the trainer's exit
    wait in ``join`` forever (seen with one worker and a corrupt sample). The cost: under ``scancel`` (a stop, not
    a requeue) a run with ``data.num_workers > 0`` loses its workers and ends at its last saved checkpoint instead
    of writing one. (Telling the two senders apart needs ``sigwaitinfo`` with SIGTERM blocked in every thread, and
    torch has started threads before ``worker_init_fn`` runs.)"""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
