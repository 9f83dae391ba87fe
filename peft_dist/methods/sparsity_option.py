"""The per-matrix sparsity option shared by ``snell`` and ``sparse_masked`` (spec snell_snella.md §3.1, §5).

``method.sparsity`` is one number (the zeroed fraction s of every adapted matrix) or a map whose keys are
``default``, a matrix kind (``q``, ``fc1``, ...) or one matrix (``blocks.3.fc1``); the most specific key wins.
"""
from __future__ import annotations

import re

from peft_dist.config import ConfigError, check_range
from peft_dist.models.targets import TARGET_NAMES

MATRIX_KEY = re.compile(r"^blocks\.(\d+)\.(q|k|v|proj|fc1|fc2)$")


def check_sparsity_option(value: float | dict[str, float]) -> None:
    if not isinstance(value, dict):
        check_range("method.sparsity", value, low=0.0, high=1.0)
        return
    if not value:
        raise ConfigError("method.sparsity: empty map; give a number or keys default/<kind>/blocks.<i>.<kind>")
    for key, s in value.items():
        if key != "default" and key not in TARGET_NAMES and not MATRIX_KEY.match(key):
            raise ConfigError(f"method.sparsity.{key}: unknown key; allowed: default, "
                              f"{', '.join(TARGET_NAMES)} or blocks.<i>.<kind> (e.g. blocks.3.fc1)")
        check_range(f"method.sparsity.{key}", s, low=0.0, high=1.0)


def lookup_sparsity(value: float | dict[str, float], block: int, kind: str) -> float | None:
    """s of matrix ``blocks.{block}.{kind}``; None when a map has neither that matrix, its kind nor ``default``."""
    if not isinstance(value, dict):
        return float(value)
    for key in (f"blocks.{block}.{kind}", kind, "default"):
        if key in value:
            return float(value[key])
    return None
