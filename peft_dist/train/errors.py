"""How a training run can end badly that is not a bug: kept free of heavy imports, the CLI reports them in one line."""
from __future__ import annotations


class Diverged(RuntimeError):
    """The loss became NaN or infinite: the run stopped before that step's update reached the adapters."""
