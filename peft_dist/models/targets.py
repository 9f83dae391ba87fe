"""Where adapters go in a timm ViT: the six weight matrices of every block, with q/k/v as row slices of the fused
``attn.qkv`` Linear (rows ordered [q; k; v], spec ``spt_arc_hta.md`` notation section)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

TARGET_NAMES = ("q", "k", "v", "proj", "fc1", "fc2")
QKV_SLICES = ("q", "k", "v")


def check_targets(targets: list[str], allowed: tuple[str, ...] = TARGET_NAMES) -> None:
    """``method.targets``: non-empty, known names, none twice; the error names the key and the allowed values."""
    from peft_dist.config import ConfigError

    if not targets:
        raise ConfigError(f"method.targets: empty; allowed: any of {', '.join(allowed)}")
    for t in targets:
        if t not in allowed:
            raise ConfigError(f"method.targets: unknown target {t!r}; allowed: {', '.join(allowed)}")
    if len(set(targets)) != len(targets):
        raise ConfigError(f"method.targets: {list(targets)} lists a matrix twice")


_MODULE_OF = {"q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1",
              "fc2": "mlp.fc2"}


@dataclass(frozen=True)
class Target:
    """One adaptable weight matrix: ``rows`` of the Linear at ``path`` (all rows unless it is a q/k/v slice)."""

    block: int
    name: str
    path: str
    rows: slice


def vit_blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise TypeError(f"{type(model).__name__} has no ViT-style `blocks`; this method supports timm ViTs")
    return blocks


def find_targets(model: nn.Module, names: tuple[str, ...] | list[str] = TARGET_NAMES) -> list[Target]:
    """All targets of the given kinds, block by block, in TARGET_NAMES order."""
    unknown = [n for n in names if n not in TARGET_NAMES]
    if unknown:
        raise ValueError(f"unknown target {unknown[0]!r}; allowed: {', '.join(TARGET_NAMES)}")
    out = []
    for i, block in enumerate(vit_blocks(model)):
        for name in TARGET_NAMES:
            if name not in names:
                continue
            linear = block.get_submodule(_MODULE_OF[name])
            weight = base_linear(linear).weight
            d_out = weight.shape[0]
            if name in QKV_SLICES:
                third = d_out // 3
                j = QKV_SLICES.index(name)
                rows = slice(j * third, (j + 1) * third)
            else:
                rows = slice(0, d_out)
            out.append(Target(block=i, name=name, path=f"blocks.{i}.{_MODULE_OF[name]}", rows=rows))
    return out


def group_by_path(targets: list[Target]) -> dict[str, list[Target]]:
    grouped: dict[str, list[Target]] = {}
    for t in targets:
        grouped.setdefault(t.path, []).append(t)
    return grouped


def base_linear(module: nn.Module) -> nn.Linear:
    """The frozen ``nn.Linear`` inside an adapted module (or the module itself)."""
    while not isinstance(module, nn.Linear) and hasattr(module, "base"):
        module = module.base
    if not isinstance(module, nn.Linear):
        raise TypeError(f"expected an nn.Linear, found {type(module).__name__}")
    return module


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)
