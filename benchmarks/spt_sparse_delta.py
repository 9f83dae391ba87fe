"""SPT unstructured tuning: our sparse-delta Linear vs today's earlier path and the official approach, in one run.

Official approach (spec ``spt_arc_hta.md`` §1.5, re-implemented here from its description): clone W0 and
scatter-add δ at every forward, save that clone and the gathered input columns X[..., cols] (B·N·K numbers), and in
backward take the diagonal of the K×K product G[:, rows]ᵀ·X[:, cols]. The earlier path of peft-dist ("today's"
before issue 20, re-implemented here): save the whole input X (B·N·d_in), form the dense Gᵀ·X and gather it. Ours
(:mod:`peft_dist.methods.functional.sparse_delta`): save X only at the C distinct columns the K entries touch
(B·N·C, C ≤ min(K, d_in)), or X itself where that is not smaller, and form Gᵀ·X on those columns.

For the ViT-B shapes (a q/k/v/proj 768×768 slice, fc1 3072×768, fc2 768×3072), K ∈ {300, 800, 3000} entries per
matrix and batch 8 and 64 (197 tokens per image), we report the bytes autograd saves for backward
(``saved_tensors_hooks``; parameters and index buffers excluded because they exist either way) and, at the timed
batch (8), the median forward+backward time of the three, interleaved over the same input. All three must give the
same gradients (checked). Batch 64 is measured for bytes only (one forward each: timing it would take minutes).

    python benchmarks/spt_sparse_delta.py            # the grid above
    python benchmarks/spt_sparse_delta.py --quick    # small shapes, a smoke test

The last line printed is one JSON object: ``saved_bytes_vs_official_k{K}_b{B}`` and ``saved_bytes_vs_today_k{K}_b{B}``
(ours over theirs, the largest over the shapes: at most 1 means never above either), ``saved_bytes_ratio_vs_official``
and ``step_speedup_vs_official`` (official / ours, summed over the shapes at the timed batch; > 1: ours is better).
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


class WholeInputSparseLinear(torch.autograd.Function):
    """peft-dist's path before issue 20: save the whole input, dense Gᵀ·X in backward, gathered at the entries."""

    @staticmethod
    def forward(ctx, x, weight, delta, index):
        ctx.save_for_backward(x, weight, delta, index)
        effective = weight.reshape(-1).index_add(0, index, delta).view(weight.shape)
        return x.matmul(effective.t())

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, delta, index = ctx.saved_tensors
        effective = weight.reshape(-1).index_add(0, index, delta).view(weight.shape)
        dense = grad_out.reshape(-1, grad_out.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
        return grad_out.matmul(effective), None, dense.reshape(-1).index_select(0, index), None


IMPLEMENTATIONS = ("ours", "today", "official")


def run_shape(d_out: int, d_in: int, tokens: tuple[int, int], k: int, reps: int, device: torch.device,
              seed: int = 0) -> dict:
    """Saved bytes of the three implementations; with ``reps`` > 0 also their interleaved step times."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=g).div_(d_in ** 0.5).to(device)
    flat = torch.randperm(d_out * d_in, generator=g)[:k].sort().values
    rows, cols = (flat // d_in).to(device), (flat % d_in).to(device)
    index = flat.to(torch.int32).to(device)  # SPT's index buffers are int32
    index64 = flat.to(device)
    x = torch.randn(*tokens, d_in, generator=g).to(device).requires_grad_(True)
    grad_out = torch.randn(*tokens, d_out, generator=g).to(device)
    start = (torch.randn(k, generator=g) * 1e-2).to(device)
    deltas = {name: start.clone().requires_grad_(True) for name in IMPLEMENTATIONS}
    calls = {
        "ours": lambda: sparse_delta_linear(x, weight, deltas["ours"], index),
        "today": lambda: WholeInputSparseLinear.apply(x, weight, deltas["today"], index64),
        "official": lambda: OfficialStyleSparseLinear.apply(x, weight, deltas["official"], rows, cols),
    }

    def step(name):
        x.grad = None
        deltas[name].grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        calls[name]().backward(grad_out)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - began

    params = [weight, index, index64, rows, cols, *deltas.values()]
    result = {"shape": [d_out, d_in], "tokens": list(tokens), "k": k,
              "touched_columns": int(torch.unique(cols).numel())}
    for name in IMPLEMENTATIONS:
        result[f"saved_bytes_{name}"] = saved_bytes(calls[name], params)
    result["saved_bytes_ratio"] = result["saved_bytes_official"] / result["saved_bytes_ours"]
    if reps <= 0:
        return result
    # Same maths: all three must give the same gradients before any timing counts.
    grads = {}
    for name in IMPLEMENTATIONS:
        step(name)
        grads[name] = (x.grad.clone(), deltas[name].grad.clone())
    for name in ("today", "official"):
        torch.testing.assert_close(grads[name][0], grads["ours"][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grads[name][1], grads["ours"][1], rtol=1e-4, atol=1e-3)
    times = {name: [] for name in IMPLEMENTATIONS}
    for _ in range(reps):  # interleaved so drift on a shared machine hits all alike
        for name in IMPLEMENTATIONS:
            times[name].append(step(name))
    for name in IMPLEMENTATIONS:
        result[f"step_s_{name}"] = statistics.median(times[name])
    result["step_speedup"] = result["step_s_official"] / result["step_s_ours"]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and 2 repetitions (smoke test)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        shapes, ks, batches, tokens_per_image, timed_batch, reps = \
            [(96, 96), (384, 96), (96, 384)], (30, 400), (2, 4), 50, 2, 2
    else:
        shapes, ks, batches, tokens_per_image, timed_batch, reps = \
            [(768, 768), (3072, 768), (768, 3072)], (300, 800, 3000), (8, 64), 197, 8, args.reps
    results = []
    summary: dict = {}
    for batch in batches:
        for k in ks:
            worst = {"official": 0.0, "today": 0.0}
            for d_out, d_in in shapes:
                r = run_shape(d_out, d_in, (batch, tokens_per_image), k, reps if batch == timed_batch else 0, device)
                results.append(r)
                for other in worst:
                    worst[other] = max(worst[other], r["saved_bytes_ours"] / r[f"saved_bytes_{other}"])
                timing = "" if "step_s_ours" not in r else \
                    (f"; step {1e3 * r['step_s_ours']:.1f} / {1e3 * r['step_s_today']:.1f} / "
                     f"{1e3 * r['step_s_official']:.1f} ms")
                print(f"{d_out}x{d_in}, batch {batch}, K={k} ({r['touched_columns']} columns): saved "
                      f"{r['saved_bytes_ours'] / 2**20:.2f} MiB (ours) / {r['saved_bytes_today'] / 2**20:.2f} "
                      f"(today's) / {r['saved_bytes_official'] / 2**20:.2f} (official){timing}", flush=True)
            summary[f"saved_bytes_vs_official_k{k}_b{batch}"] = worst["official"]
            summary[f"saved_bytes_vs_today_k{k}_b{batch}"] = worst["today"]
    timed = [r for r in results if "step_s_ours" in r]
    summary.update({
        "saved_bytes_ratio_vs_official": sum(r["saved_bytes_official"] for r in timed)
        / sum(r["saved_bytes_ours"] for r in timed),
        "step_speedup_vs_official": sum(r["step_s_official"] for r in timed) / sum(r["step_s_ours"] for r in timed),
        "step_speedup_vs_today": sum(r["step_s_today"] for r in timed) / sum(r["step_s_ours"] for r in timed),
        "k_per_matrix": list(ks), "batches": list(batches), "timed_batch": timed_batch,
        "tokens_per_image": tokens_per_image, "device": str(device), "threads": torch.get_num_threads(),
        "quick": args.quick, "shapes": results,
    })
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
