"""LoRA folded into the frozen GEMM (issue 20 item 3, ``functional.low_rank``) against a plain LoRA built from
``nn.Linear``s: same outputs and gradients in fp64 (q/k/v slices of the fused qkv and a whole matrix), gradcheck,
what backward keeps, the paths that keep the parallel branch, and unchanged parameter names."""
import math

import pytest
import torch
from torch import nn

from peft_dist.methods.functional.low_rank import merged_low_rank_linear
from peft_dist.methods.lora import LoRALinear

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


class PlainLoRA(nn.Module):
    """The obvious LoRA: the frozen Linear plus, per slice, ``up(down(x))·scale`` from two bias-free nn.Linears
    sharing the tested module's A and B, added to that slice's output columns."""

    def __init__(self, lora: LoRALinear):
        super().__init__()
        self.base, self.scale, self.slices = lora.base, lora.scale, dict(lora.slices)
        self.down, self.up = nn.ModuleDict(), nn.ModuleDict()
        for name in self.slices:
            A, B = lora.lora_A[name], lora.lora_B[name]
            self.down[name] = nn.Linear(A.shape[1], A.shape[0], bias=False, dtype=A.dtype)
            self.down[name].weight = A
            self.up[name] = nn.Linear(B.shape[1], B.shape[0], bias=False, dtype=B.dtype)
            self.up[name].weight = B

    def forward(self, x):
        y = self.base(x)
        parts, end = [], 0
        for name, rows in self.slices.items():  # the slices in row order, a gap keeps the frozen output
            parts += [y[..., end:rows.start], y[..., rows] + self.up[name](self.down[name](x)) * self.scale]
            end = rows.stop
        return torch.cat(parts + [y[..., end:]], -1)


def lora_layer(d_in, d_out, slices, rank=4, dtype=F64, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, dtype=dtype).requires_grad_(False)
    layer = LoRALinear(base, slices, rank, alpha=2.0 * rank)
    with torch.no_grad():
        for B in layer.lora_B.values():
            B.normal_()  # B starts at zero: give the update something to do
    return layer


QKV = {"q": slice(0, 6), "k": slice(6, 12), "v": slice(12, 18)}
QV = {"q": slice(0, 6), "v": slice(12, 18)}  # k's rows keep W0: the merged weight copies rows no slice owns
WHOLE = {"fc1": slice(0, 10)}


@pytest.mark.parametrize("slices,d_out", [(QKV, 18), (QV, 18), (WHOLE, 10)], ids=["qkv", "qv", "whole"])
def test_merged_lora_equals_plain_lora_in_fp64(slices, d_out):
    layer = lora_layer(7, d_out, slices)
    plain = PlainLoRA(layer)
    x = torch.randn(3, 5, 7, dtype=F64, requires_grad=True)
    G = torch.randn(3, 5, d_out, dtype=F64)
    params = [x, *layer.lora_A.values(), *layer.lora_B.values()]
    assert layer._merges_into_frozen_gemm(x)
    y = layer(x)
    ours = torch.autograd.grad(y, params, G)
    y_plain = plain(x)
    theirs = torch.autograd.grad(y_plain, params, G)
    torch.testing.assert_close(y, y_plain, rtol=0, atol=1e-12)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_merged_function_passes_gradcheck_with_a_trainable_weight_and_bias():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, dtype=F64, generator=g, requires_grad=True)
    W = torch.randn(6, 5, dtype=F64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=F64, generator=g, requires_grad=True)
    factors = [torch.randn(2, 5, dtype=F64, generator=g, requires_grad=True) if i % 2 == 0 else
               torch.randn(3, 2, dtype=F64, generator=g, requires_grad=True) for i in range(4)]
    rows = [(0, 3), (3, 6)]
    assert torch.autograd.gradcheck(lambda x, W, b, *f: merged_low_rank_linear(x, W, b, rows, 0.7, f),
                                    (x, W, b, *factors))


def _saved_bytes(fn, exclude):
    from test_spt import _activation_bytes

    return _activation_bytes(fn, exclude)


def test_merged_lora_saves_only_the_input_and_no_more_than_plain_lora():
    layer = lora_layer(16, 18, QKV, dtype=torch.float32)
    x = torch.randn(4, 9, 16, requires_grad=True)
    params = list(layer.parameters())
    ours = _saved_bytes(lambda: layer(x), params + [x])
    plain = _saved_bytes(lambda: PlainLoRA(layer)(x), params + [x])
    assert ours == 0  # x itself (excluded: the caller holds it) and parameters; never the merged weight
    assert plain > 0  # the plain LoRA keeps its T×r down-projections besides x


def test_dropout_and_bf16_keep_the_parallel_branch():
    layer = lora_layer(7, 18, QKV, dtype=torch.float32)
    x = torch.randn(2, 7)
    assert layer._merges_into_frozen_gemm(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer._merges_into_frozen_gemm(x)
    assert not layer._merges_into_frozen_gemm(x.to(torch.bfloat16))
    dropped = LoRALinear(layer.base, QKV, 4, 8.0, dropout=0.5)
    assert not dropped._merges_into_frozen_gemm(x)
    dropped.eval()  # dropout is the identity in eval: the merged GEMM is exact again
    assert dropped._merges_into_frozen_gemm(x)


def test_parameter_names_and_shapes_are_unchanged():
    """Saved adapters (adapter.safetensors) hold these keys: the merged forward must not rename or reshape them."""
    layer = lora_layer(7, 18, QKV, rank=4)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items() if k.startswith("lora_")}
    assert shapes == {"lora_A.q": (4, 7), "lora_A.k": (4, 7), "lora_A.v": (4, 7),
                      "lora_B.q": (6, 4), "lora_B.k": (6, 4), "lora_B.v": (6, 4)}
    assert math.isclose(layer.scale, 2.0)
