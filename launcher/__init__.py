"""How processes start: the distributed environment (torchrun variables today, SLURM next) and local spawning."""
from launcher.env import DistEnv, EnvError, read_dist_env

__all__ = ["DistEnv", "EnvError", "read_dist_env"]
