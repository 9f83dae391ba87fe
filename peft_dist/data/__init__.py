"""Data: shard writer (``peft-dist shards``), streaming loaders, transforms, digits and synthetic sources.

Spec ecosystem §5. The public names load lazily: the CLI imports ``peft_dist.data.shards`` to build its parser,
and that must not pull in webdataset, timm and scikit-learn for every command.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Batch": "peft_dist.data.loader",
    "TrainLoader": "peft_dist.data.loader",
    "EvalLoader": "peft_dist.data.loader",
    "build_train_loader": "peft_dist.data.loader",
    "build_eval_loader": "peft_dist.data.loader",
    "write_shards": "peft_dist.data.shards",
    "DatasetInfo": "peft_dist.data.info",
    "read_info": "peft_dist.data.info",
    "DataError": "peft_dist.data.info",
    "MissingDataError": "peft_dist.data.info",
    "CorruptSampleError": "peft_dist.data.info",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
