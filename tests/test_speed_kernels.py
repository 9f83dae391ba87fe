"""Survivor-only weight gradients of SNELL/SNELLA (issue 20 item 1, ``kernelized.survivor_weight_grad``): in fp64
the survivor path gives the dense path's gradients and those of autograd through the official dense expression
(``reference_delta_weight``: cdist, quantile, detached magnitude), for SNELL under both thresholds and SNELLA's MixK,
over several slices and row blocks; and when ``auto`` takes it."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from peft_dist.methods.functional import kernelized as kz
from peft_dist.methods.functional.kernelized import (
    KernelConfig,
    SliceSpec,
    kernelized_linear,
    reference_delta_weight,
    uses_survivor_grad,
)

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def problem(kind, d_in=11, rows=(7, 9), rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for n in rows:
        tensors += [torch.rand(2, d_in, rank // 2, generator=g, dtype=F64) * 2 - 1,
                    torch.rand(2, n, rank // 2, generator=g, dtype=F64) * 2 - 1]
        if kind == "mixk":
            tensors += [torch.tensor([v], dtype=F64) for v in (0.7, 1.3, 0.2)]
    x = torch.randn(3, 5, d_in, generator=g, dtype=F64)
    W = torch.randn(sum(rows), d_in, generator=g, dtype=F64)
    G = torch.randn(3, 5, sum(rows), generator=g, dtype=F64)
    return [t.requires_grad_() for t in tensors], x.requires_grad_(), W, G


def fused_grads(kind, threshold, sparsity, survivor_grad, mode="merged", chunk=20):
    tensors, x, W, G = problem(kind)
    rows = (7, 9)
    slices = [SliceSpec(0, rows[0], sparsity), SliceSpec(rows[0], sum(rows), sparsity)]
    cfg = KernelConfig(kind=kind, threshold=threshold, survivor_grad=survivor_grad, chunk_entries=chunk)
    if mode == "merged":
        y = kernelized_linear(x, W, None, slices, tensors, cfg)
    else:
        y = kernelized_linear(x, None, None, slices, tensors, cfg, out_features=sum(rows))
    return torch.autograd.grad(y, [x, *tensors], G)


def reference_grads(kind, threshold, sparsity, mode="merged"):
    """Autograd through the official dense expression, one matrix per slice (the test's independent reference)."""
    tensors, x, W, G = problem(kind)
    per = 5 if kind == "mixk" else 2
    deltas = [reference_delta_weight(*tensors[i * per:i * per + 2], sparsity, kind, threshold, True,
                                     *tensors[i * per + 2:(i + 1) * per]) for i in range(2)]
    dW = torch.cat(deltas, 0)
    y = F.linear(x, W + dW) if mode == "merged" else F.linear(x, dW)
    return torch.autograd.grad(y, [x, *tensors], G)


CASES = list(itertools.product(["piecewise", "mixk"], ["code", "paper"], [0.9, 0.6]))


@pytest.mark.parametrize("kind,threshold,sparsity", CASES)
def test_survivor_gradients_equal_the_dense_path_and_the_reference(kind, threshold, sparsity):
    """chunk_entries=20 gives several row blocks per SNELL slice (MixK's softmax keeps its matrix in one block)."""
    survivors = fused_grads(kind, threshold, sparsity, "always")
    dense = fused_grads(kind, threshold, sparsity, "never")
    reference = reference_grads(kind, threshold, sparsity)
    for s, d, r in zip(survivors, dense, reference):
        torch.testing.assert_close(s, d, rtol=0, atol=1e-12)
        torch.testing.assert_close(s, r, rtol=0, atol=1e-11)
    assert any(float(g.abs().max()) > 0 for g in survivors[1:])  # the factors do learn


@pytest.mark.parametrize("kind", ["piecewise", "mixk"])
def test_survivor_gradients_in_the_faithful_delta(kind):
    survivors = fused_grads(kind, "code", 0.9, "always", mode="faithful")
    reference = reference_grads(kind, "code", 0.9, mode="faithful")
    for s, r in zip(survivors, reference):
        torch.testing.assert_close(s, r, rtol=0, atol=1e-11)


def test_survivor_gradient_is_zero_off_the_survivors_and_sampled_on_them():
    g = torch.Generator().manual_seed(3)
    GT, XT = torch.randn(6, 40, generator=g, dtype=F64), torch.randn(9, 40, generator=g, dtype=F64)
    m = torch.rand(6, 9, generator=g, dtype=F64)
    m[m < 0.8] = 0.0
    out = torch.full((6, 9), float("nan"), dtype=F64)  # every entry must be written
    kz.survivor_weight_grad(GT.t(), XT.t(), m, out)
    torch.testing.assert_close(out, (GT @ XT.t()) * m, rtol=0, atol=1e-12)
    kz.survivor_weight_grad(GT.t(), XT.t(), torch.zeros_like(m), out)  # nothing survives
    assert torch.count_nonzero(out) == 0


def test_auto_takes_the_survivor_path_only_where_it_applies():
    auto = KernelConfig()
    tau = 0.1
    fp32 = torch.float32
    sparse, dense_enough = SliceSpec(0, 4, 0.9), SliceSpec(0, 4, 1.0 - kz.SURVIVOR_MAX_DENSITY - 0.05)
    assert uses_survivor_grad(auto, sparse, tau, fp32, fp32)
    assert not uses_survivor_grad(auto, dense_enough, tau, fp32, fp32)  # measured slower above the cut-over
    assert uses_survivor_grad(KernelConfig(survivor_grad="always"), dense_enough, tau, fp32, fp32)
    assert not uses_survivor_grad(KernelConfig(survivor_grad="never"), sparse, tau, fp32, fp32)
    assert not uses_survivor_grad(auto, sparse, None, fp32, fp32)  # plain kernel / dense MixK: no survivors
    assert not uses_survivor_grad(auto, sparse, tau, torch.bfloat16, fp32)  # bf16 gradients stay dense
    with pytest.raises(ValueError, match="survivor_grad"):
        KernelConfig(survivor_grad="sometimes")


def test_dispatch_mode_tracers_get_the_dense_path_unless_they_take_sparse_tensors():
    """torch's MemTracker (the estimator's real trace) cannot read a sparse CSR tensor's storage: under a dispatch
    mode the dense product runs, unless the mode declares ``handles_sparse_csr`` (the benchmark's tracker)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Plain(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class SparseAware(Plain):
        handles_sparse_csr = True

    cfg, spec, fp32 = KernelConfig(survivor_grad="always"), SliceSpec(0, 4, 0.9), torch.float32
    assert uses_survivor_grad(cfg, spec, 0.1, fp32, fp32)
    with Plain():
        assert not uses_survivor_grad(cfg, spec, 0.1, fp32, fp32)
    with SparseAware():
        assert uses_survivor_grad(cfg, spec, 0.1, fp32, fp32)
