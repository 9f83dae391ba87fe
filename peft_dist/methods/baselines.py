"""The reference points every PEFT table compares against (spec ``spt_arc_hta.md`` §4.1): full fine-tuning,
linear probing and BitFit. None of them injects a module, so each merges trivially."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch import nn

from peft_dist.methods.base import Method, head_parameters
from peft_dist.methods.registry import register_method


@dataclass
class NoOptions:
    pass


@register_method("full", NoOptions)
class FullFineTuning(Method):
    """Every parameter trains (85.8 M on ViT-B/16)."""

    def trainable_set(self, model: nn.Module) -> Iterator[nn.Parameter]:
        yield from model.parameters()


@register_method("linear", NoOptions)
class LinearProbe(Method):
    """Only the classification head trains."""

    def trainable_set(self, model: nn.Module) -> Iterator[nn.Parameter]:
        yield from head_parameters(model)


@register_method("bitfit", NoOptions)
class BitFit(Method):
    """Every bias of the backbone (including LayerNorm biases) plus the head (Zaken et al. 2022)."""

    def trainable_set(self, model: nn.Module) -> Iterator[nn.Parameter]:
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                yield p
        yield from head_parameters(model)
