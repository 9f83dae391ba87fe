"""SPT unstructured tuning: our sparse-delta Linear vs the official approach, side by side in one run.

Official approach (spec ``spt_arc_hta.md`` §1.5, re-implemented here from its description): clone W0 and
scatter-add δ at every forward, save that clone and the gathered input columns X[..., cols] (B·N·K numbers), and in
backward take the diagonal of the K×K product G[:, rows]ᵀ·X[:, cols]. Ours
(:mod:`peft_dist.methods.functional.sparse_delta`): save only X, rebuild W0 + scatter(δ) transiently, form the dense
weight gradient Gᵀ·X once and gather it.

For each ViT-B shape (a q/k/v/proj 768×768 slice and fc1 3072×768) with K selected entries per matrix, the two
implementations alternate (interleaved repetitions) over the same input; we report the median forward+backward step
time and the bytes autograd saves for backward (``saved_tensors_hooks``; parameters and index buffers excluded
because they exist either way). Both must give the same gradients (checked).

    python benchmarks/spt_sparse_delta.py            # ViT-B shapes, batch 8 (1,576 tokens), K = 5,000
    python benchmarks/spt_sparse_delta.py --quick    # small shapes, a smoke test

The last line printed is one JSON object with ``saved_bytes_ratio_vs_official`` and ``step_speedup_vs_official``
(official / ours, over all shapes; > 1 means ours is better).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from peft_dist.methods.functional.sparse_delta import sparse_delta_linear


class OfficialStyleSparseLinear(torch.autograd.Function):
    """Clone + scatter forward, saved B·N·K gather and K×K-diagonal backward (the cost model of spec §1.5)."""

    @staticmethod
    def forward(ctx, x, weight, delta, rows, cols):
        effective = weight.clone()
        effective[rows, cols] += delta
        ctx.save_for_backward(effective, x[..., cols], rows)
        return x.matmul(effective.t())

    @staticmethod
    def backward(ctx, grad_out):
        effective, x_cols, rows = ctx.saved_tensors
        grad_x = grad_out.matmul(effective)
        g_rows = grad_out.reshape(-1, grad_out.shape[-1])[:, rows]
        products = g_rows.t().mm(x_cols.reshape(-1, x_cols.shape[-1]))  # K×K, only its diagonal is used
        return grad_x, None, torch.diagonal(products).clone(), None, None


def saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes of distinct storages saved for backward by ``fn()`` (tensors in ``exclude`` not counted)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def run_shape(d_out: int, d_in: int, tokens: tuple[int, int], k: int, reps: int, device: torch.device,
              seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=g).div_(d_in ** 0.5).to(device)
    flat = torch.randperm(d_out * d_in, generator=g)[:k].sort().values
    rows, cols = (flat // d_in).to(device), (flat % d_in).to(device)
    index = flat.to(torch.int32).to(device)
    x = torch.randn(*tokens, d_in, generator=g).to(device).requires_grad_(True)
    grad_out = torch.randn(*tokens, d_out, generator=g).to(device)
    delta_ours = (torch.randn(k, generator=g) * 1e-2).to(device).requires_grad_(True)
    delta_official = delta_ours.detach().clone().requires_grad_(True)

    def ours():
        return sparse_delta_linear(x, weight, delta_ours, index)

    def official():
        return OfficialStyleSparseLinear.apply(x, weight, delta_official, rows, cols)

    def step(fn, delta):
        x.grad = None
        delta.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn().backward(grad_out)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    # Same maths: both must give the same gradients before any timing counts.
    step(ours, delta_ours)
    gx_ours, gd_ours = x.grad.clone(), delta_ours.grad.clone()
    step(official, delta_official)
    torch.testing.assert_close(x.grad, gx_ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(delta_official.grad, gd_ours, rtol=1e-4, atol=1e-3)

    times = {"ours": [], "official": []}
    for _ in range(reps):  # interleaved so drift on a shared machine hits both alike
        times["ours"].append(step(ours, delta_ours))
        times["official"].append(step(official, delta_official))
    params = [weight, delta_ours, delta_official, index, rows, cols]
    bytes_ours = saved_bytes(ours, params)
    bytes_official = saved_bytes(official, params)
    t_ours, t_official = statistics.median(times["ours"]), statistics.median(times["official"])
    return {"shape": [d_out, d_in], "tokens": list(tokens), "k": k,
            "saved_bytes_ours": bytes_ours, "saved_bytes_official": bytes_official,
            "saved_bytes_ratio": bytes_official / bytes_ours,
            "step_s_ours": t_ours, "step_s_official": t_official, "step_speedup": t_official / t_ours}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and 2 repetitions (smoke test)")
    parser.add_argument("--batch", type=int, default=8, help="images per step (197 tokens each, ViT-B/16)")
    parser.add_argument("--k", type=int, default=5000, help="selected entries per matrix")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        shapes, tokens, k, reps = [(96, 96), (384, 96)], (2, 50), 400, 2
    else:
        shapes, tokens, k, reps = [(768, 768), (3072, 768)], (args.batch, 197), args.k, args.reps
    results = []
    for d_out, d_in in shapes:
        r = run_shape(d_out, d_in, tokens, k, reps, device)
        results.append(r)
        print(f"{d_out}x{d_in}, {tokens[0]}x{tokens[1]} tokens, K={k}: saved {r['saved_bytes_ours'] / 2**20:.2f} MiB "
              f"(ours) vs {r['saved_bytes_official'] / 2**20:.2f} MiB (official) = {r['saved_bytes_ratio']:.1f}x less; "
              f"step {1e3 * r['step_s_ours']:.1f} ms vs {1e3 * r['step_s_official']:.1f} ms = "
              f"{r['step_speedup']:.1f}x faster")
    summary = {
        "saved_bytes_ratio_vs_official": sum(r["saved_bytes_official"] for r in results)
        / sum(r["saved_bytes_ours"] for r in results),
        "step_speedup_vs_official": sum(r["step_s_official"] for r in results) / sum(r["step_s_ours"] for r in results),
        "k_per_matrix": k, "tokens": list(tokens), "device": str(device), "threads": torch.get_num_threads(),
        "quick": args.quick, "shapes": results,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
