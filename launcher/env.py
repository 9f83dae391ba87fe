"""Read the distributed environment a process was started in (spec ecosystem.md §4).

Precedence: torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...; also what
``peft-dist launch`` and srun+torchrun set) win; otherwise an ``srun`` task is read from SLURM's variables
(``SLURM_PROCID``, ``SLURM_LOCALID``, the step's task count and tasks on this node, the first host of the step's
node list — expanded here, no ``scontrol`` needed — and a port derived from the job id); otherwise it is a single
process.

The batch script itself also carries ``SLURM_PROCID=0`` and the job's ``SLURM_NTASKS``, but it is no srun task: only
a job step has ``SLURM_STEP_ID`` (``SLURM_STEPID`` before 21.08), and the batch step (``batch``, 4294967294) and the
extern step (``extern``, 4294967295) are not task steps. Such a process runs as a single process; taking it for
rank 0 of ``SLURM_NTASKS`` would wait for ranks that never start.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping


class EnvError(RuntimeError):
    """The launch environment is inconsistent; the message names the variable."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"
    """Where the values came from: ``torchrun``, ``slurm`` or ``single``."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = environ.get(key)
    if raw is None or raw == "":
        if default is None:
            raise EnvError(f"environment variable {key} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise EnvError(f"environment variable {key}={raw!r} is not an integer") from None


def _check(env: DistEnv, names: tuple[str, str, str, str]) -> DistEnv:
    rank_var, world_var, local_var, port_var = names
    if env.world_size < 1:
        raise EnvError(f"{world_var}={env.world_size}: must be >= 1")
    if not 0 <= env.rank < env.world_size:
        raise EnvError(f"{rank_var}={env.rank}: must be in [0, {world_var}={env.world_size})")
    if not 0 <= env.local_rank < max(env.local_world_size, 1):
        raise EnvError(f"{local_var}={env.local_rank}: must be in [0, local world size {env.local_world_size})")
    if not 0 < env.master_port < 65536:
        raise EnvError(f"{port_var}={env.master_port}: must be a TCP port (1-65535)")
    return env


def read_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    environ = os.environ if environ is None else environ
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _from_torchrun(environ)
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and in_srun_step(environ):
        return _from_slurm(environ)
    return DistEnv()


NON_TASK_STEPS = ("batch", "extern", "interactive", "4294967294", "4294967295", "4294967293")
"""SLURM's special step ids (``SLURM_BATCH_SCRIPT``, ``SLURM_EXTERN_CONT``, ``SLURM_INTERACTIVE_STEP``), by name or
number, as they appear in ``SLURM_STEP_ID``."""


def in_srun_step(environ: Mapping[str, str]) -> bool:
    """Whether this process is a task of an ``srun`` job step (not the batch script or an ``salloc`` shell)."""
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID"))
    return step is not None and step.strip() != "" and step.strip() not in NON_TASK_STEPS


def _from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    world = _int(environ, "WORLD_SIZE", 1)
    rank = _int(environ, "RANK", 0)
    env = DistEnv(rank=rank, world_size=world, local_rank=_int(environ, "LOCAL_RANK", rank),
                  local_world_size=_int(environ, "LOCAL_WORLD_SIZE", world),
                  master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                  master_port=_int(environ, "MASTER_PORT", 29500), source="torchrun")
    return _check(env, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"))


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    # the step's own variables first: an srun of fewer tasks or nodes than the allocation is its own world
    nodelist_var = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                         if environ.get(k)), None)
    if nodelist_var is None:
        raise EnvError("SLURM_JOB_NODELIST is not set (needed for the master address of an srun task)")
    hosts = expand_hostlist(environ[nodelist_var])
    world_var = "SLURM_STEP_NUM_TASKS" if environ.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
    job_id = _int(environ, "SLURM_JOB_ID", 0)
    port = _int(environ, "MASTER_PORT", port_from_job_id(job_id))
    env = DistEnv(rank=_int(environ, "SLURM_PROCID"), world_size=_int(environ, world_var),
                  local_rank=_int(environ, "SLURM_LOCALID", 0),
                  local_world_size=tasks_on_this_node(environ),
                  master_addr=environ.get("MASTER_ADDR", hosts[0]), master_port=port, source="slurm")
    return _check(env, ("SLURM_PROCID", world_var, "SLURM_LOCALID", "MASTER_PORT"))


def port_from_job_id(job_id: int) -> int:
    """A port every task of a job derives alike, spread over 20000-39999 so concurrent jobs rarely collide."""
    return 20000 + job_id % 20000


def tasks_on_this_node(environ: Mapping[str, str]) -> int:
    """This node's task count: entry ``SLURM_NODEID`` of ``SLURM_STEP_TASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE``
    (``"2(x3),1"``: nodes 0-2 run 2 tasks, node 3 runs 1), or ``SLURM_NTASKS_PER_NODE``."""
    var = next((k for k in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")
                if environ.get(k)), None)
    if var is None:
        return _int(environ, "SLURM_NTASKS")
    per_node = expand_tasks_per_node(environ[var], var)
    node = _int(environ, "SLURM_NODEID", 0)
    if not 0 <= node < len(per_node):
        raise EnvError(f"SLURM_NODEID={node}: must be in [0, {len(per_node)}), the nodes listed in {var}="
                       f"{environ[var]!r}")
    return per_node[node]


def expand_tasks_per_node(raw: str, var: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """``"2(x3),1"`` → [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in raw.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise EnvError(f"{var}={raw!r}: expected e.g. '4', '4(x2)' or '2(x3),1'")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def expand_hostlist(spec: str) -> list[str]:
    """Expand a SLURM host list: ``gpu[01-04,07],login1`` → gpu01 gpu02 gpu03 gpu04 gpu07 login1.

    Zero padding follows the range's start; several bracket groups in one name expand as a product."""
    hosts: list[str] = []
    for part in _split_top_level(spec.strip()):
        hosts.extend(_expand_one(part, spec))
    if not hosts:
        raise EnvError(f"SLURM_JOB_NODELIST={spec!r}: no hosts")
    return hosts


def _split_top_level(spec: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in spec:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise EnvError(f"SLURM_JOB_NODELIST={spec!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise EnvError(f"SLURM_JOB_NODELIST={spec!r}: unbalanced '['")
    parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_one(name: str, spec: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if not m:
        return [name]
    head, tail = name[:m.start()], name[m.end():]
    out = []
    for item in m.group(1).split(","):
        if "-" in item:
            lo, _, hi = item.partition("-")
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise EnvError(f"SLURM_JOB_NODELIST={spec!r}: bad range {item!r}")
            width = len(lo)
            values = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        elif item.isdigit():
            values = [item]
        else:
            raise EnvError(f"SLURM_JOB_NODELIST={spec!r}: bad element {item!r}")
        for v in values:
            out.extend(_expand_one(head + v + tail, spec))
    return out
