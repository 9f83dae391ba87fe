"""``peft-dist launch --nproc N -- train ...``: N local processes through torchrun (standalone rendezvous on a free
port), for CPU runs and single-node GPU runs."""
from __future__ import annotations

import sys


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``peft-dist <argv>`` in ``nproc`` processes; returns the worst exit status."""
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise SystemExit(f"--nproc: got {nproc}; allowed: >= 1")
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise SystemExit("launch: nothing to run; usage: peft-dist launch --nproc N -- train --config F")
    # SIGUSR1 (SLURM's requeue signal, launcher/preemption.py) is forwarded to the workers like SIGTERM, not left
    # to its default action, which would end torchrun and orphan them
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--monitor-interval=0.5",
         "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--module", "peft_dist.cli", *argv])
    try:
        run(args)
    except Exception as e:  # torchrun raises ChildFailedError after printing each failed rank's traceback
        print(f"peft-dist launch: {type(e).__name__}: a rank failed (see above)", file=sys.stderr)
        return 1
    return 0
