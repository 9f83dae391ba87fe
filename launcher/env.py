"""Read the distributed environment a process was started in.

torchrun (and ``peft-dist launch``, which is torchrun underneath) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. A process started without them is a single process.
"""
from __future__ import annotations

import os
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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(environ: Mapping[str, str], key: str, default: int) -> int:
    raw = environ.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise EnvError(f"environment variable {key}={raw!r} is not an integer") from None


def read_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    environ = os.environ if environ is None else environ
    world = _int(environ, "WORLD_SIZE", 1)
    rank = _int(environ, "RANK", 0)
    local_rank = _int(environ, "LOCAL_RANK", rank)
    local_world = _int(environ, "LOCAL_WORLD_SIZE", world)
    if world < 1:
        raise EnvError(f"WORLD_SIZE={world}: must be >= 1")
    if not 0 <= rank < world:
        raise EnvError(f"RANK={rank}: must be in [0, WORLD_SIZE={world})")
    if not 0 <= local_rank < max(local_world, 1):
        raise EnvError(f"LOCAL_RANK={local_rank}: must be in [0, LOCAL_WORLD_SIZE={local_world})")
    port = _int(environ, "MASTER_PORT", 29500)
    if not 0 < port < 65536:
        raise EnvError(f"MASTER_PORT={port}: must be a TCP port (1-65535)")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                   master_addr=environ.get("MASTER_ADDR", "127.0.0.1"), master_port=port)
