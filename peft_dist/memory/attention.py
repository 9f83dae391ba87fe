"""The attention the PETL papers measured their memory with, for the estimator (issue 22, SNELL Table A8(b)/A12).

timm >= 0.9 computes ViT attention with ``F.scaled_dot_product_attention`` (SDPA): its flash / efficient kernels
keep only the output and a log-sum-exp per query for backward. The official SNELL, SPT, ARC and HTA code vendor
timm 0.5's ``Attention.forward``, which forms the B×H×N×N attention matrix explicitly and keeps it (the softmax
output is saved for ``attn @ v``'s backward and for softmax's own). :func:`explicit_attention_forward` is that
forward, line for line (``vision_transformer.py`` of timm 0.5.4, which SNELL's repository copies into its
``models/``). At batch 8 on ViT-B/16 that matrix is 8 × 12 × 197² × 4 B = 14.2 MiB per block. :func:`use_attention` swaps that forward into
every timm ``Attention`` of a model (meta, fake or real); ``estimate(..., attention="explicit")`` traces with it.
"""
from __future__ import annotations

import types

import torch
from torch import nn

ATTENTION_KINDS = ("sdpa", "explicit")
"""``sdpa``: timm's own forward (what peft-dist trains with); ``explicit``: the official code's softmax(QKᵀ)V."""


def explicit_attention_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                               is_causal: bool = False) -> torch.Tensor:
    """timm 0.5.4's ``Attention.forward`` (the official PETL code's), over this module's own (adapted) layers."""
    if attn_mask is not None or is_causal:
        raise ValueError("the explicit (official) attention takes no mask: ViT classification uses none")
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * self.scale
    attn = attn.softmax(dim=-1)
    attn = self.attn_drop(attn)
    x = (attn @ v).transpose(1, 2).reshape(B, N, C)
    x = self.proj(x)
    x = self.proj_drop(x)
    return x


def _explicit_ready(module: nn.Module) -> bool:
    """Whether the official forward computes what this module does (no q/k norm, no gate, no output norm)."""
    identity = lambda name: isinstance(getattr(module, name, None), (nn.Identity, type(None)))  # noqa: E731
    return all(identity(n) for n in ("q_norm", "k_norm", "norm", "gate"))


def use_attention(model: nn.Module, kind: str) -> int:
    """Give every timm ``Attention`` of ``model`` the ``kind`` forward; returns how many were switched."""
    from timm.layers import Attention

    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention: got {kind!r}; allowed: {', '.join(ATTENTION_KINDS)}")
    switched = 0
    for module in model.modules():
        if not isinstance(module, Attention):
            continue
        if kind == "sdpa":
            module.__dict__.pop("forward", None)  # back to the class's own forward
        else:
            if not _explicit_ready(module):
                raise ValueError(f"attention=explicit: {type(module).__name__} has q/k norms, a gate or an output "
                                 "norm that the official forward lacks")
            module.forward = types.MethodType(explicit_attention_forward, module)
        switched += 1
    return switched
