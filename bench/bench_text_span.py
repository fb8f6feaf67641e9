"""Benchmark: fast TEXT SPAN vs the authors' direct loop on a ViT-L-14-sized synthetic problem.

Default size (the paper's setting): 64 heads (last 4 layers x 16 heads), 10,000 images, d' = 768,
3,500 texts, m = 20, rank 80. The fast version runs on every head; the direct loop
(``text_span_reference``, O(K d' M) per step) runs on the first ``--direct-heads`` heads, and its
time is extrapolated per head to all heads (the output says so). Both compute in float64 on one
thread, in this process, on the same data; picks are compared head by head. Times are reported as
wall clock and as this process's CPU time; the speed-up uses CPU time, which other jobs sharing the
machine disturb less (the wall-clock ratio is printed too).

Synthetic heads look like real ones: each writes into its own 64-dimensional subspace (a head's
W_OV has rank head_dim), which contains ten pool texts ("concepts") with large, decaying variances
and 54 random directions with smaller ones; plus a mean output and faint isotropic noise. Pool texts
are correlated unit vectors (a shared component plus clusters), as CLIP text embeddings are.

    python bench/bench_text_span.py [--small] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
from clipdecomp.text_span import text_span_heads, text_span_reference

SIZES = {
    "full": dict(layers=4, heads=16, images=10_000, dim=768, texts=3_500, m=20, rank=80, head_dim=64),
    "small": dict(layers=2, heads=4, images=2_000, dim=256, texts=1_000, m=10, rank=40, head_dim=32),
}


def make_pool(n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """[n, dim] correlated unit vectors: shared component + one of 20 clusters + individual part."""
    common, clusters = torch.randn(dim, generator=gen), torch.randn(20, dim, generator=gen)
    which = torch.randint(0, 20, (n,), generator=gen)
    return F.normalize(0.8 * common + clusters[which] + 0.7 * torch.randn(n, dim, generator=gen), dim=-1)


def make_heads(cfg: dict, pool: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """[K, L, H, d'] float32 head outputs: per head a 64-d subspace holding 10 pool texts, + mean + noise."""
    k, dim, head_dim = cfg["images"], cfg["dim"], cfg["head_dim"]
    out = torch.empty(k, cfg["layers"], cfg["heads"], dim)
    n_concepts = 10
    for layer in range(cfg["layers"]):
        for head in range(cfg["heads"]):
            concepts = pool[torch.randperm(len(pool), generator=gen)[:n_concepts]]
            others = torch.randn(head_dim - n_concepts, dim, generator=gen)
            basis = torch.linalg.qr(torch.cat([concepts, others]).T).Q.T  # [head_dim, d'] orthonormal
            stds = torch.cat(
                [torch.logspace(0, -0.7, n_concepts), 0.3 * torch.logspace(0, -1, head_dim - n_concepts)]
            )
            z = torch.randn(k, head_dim, generator=gen) * stds
            mean = 0.5 * torch.randn(dim, generator=gen) / dim**0.5
            noise = 1e-3 * torch.randn(k, dim, generator=gen)
            out[:, layer, head] = 0.05 * (z @ basis) + mean + 0.05 * noise
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a quick run on a small problem")
    parser.add_argument("--direct-heads", type=int, default=2, help="heads the slow direct loop runs on")
    parser.add_argument("--json", help="write the results as JSON to this path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = SIZES["small" if args.small else "full"]
    n_heads = cfg["layers"] * cfg["heads"]
    direct_heads = min(args.direct_heads, n_heads)
    print(
        f"problem: {n_heads} heads, K={cfg['images']} images, d'={cfg['dim']}, M={cfg['texts']} texts, "
        f"m={cfg['m']}, rank={cfg['rank']}; float64 on 1 thread",
        flush=True,
    )

    gen = torch.Generator().manual_seed(args.seed)
    pool = make_pool(cfg["texts"], cfg["dim"], gen)
    start = time.perf_counter()
    heads = make_heads(cfg, pool, gen)
    print(f"synthetic data: {time.perf_counter() - start:.1f} s", flush=True)

    start, cpu = time.perf_counter(), time.process_time()
    fast = text_span_heads(heads, pool, m=cfg["m"], rank=cfg["rank"], reconstruct=True)
    fast_total, fast_cpu = time.perf_counter() - start, time.process_time() - cpu
    fast_per_head, fast_cpu_per_head = fast_total / n_heads, fast_cpu / n_heads
    print(
        f"fast   (text_span_heads, all {n_heads} heads, with reconstructions): {fast_total:.1f} s wall, "
        f"{fast_cpu:.1f} s CPU = {fast_cpu_per_head:.3f} s CPU/head",
        flush=True,
    )

    labels = list(fast)[:direct_heads]
    direct_times, direct_cpu, same, max_recon_diff = [], [], [], 0.0
    for i, label in enumerate(labels):
        layer, head = divmod(i, cfg["heads"])
        start, cpu = time.perf_counter(), time.process_time()
        slow = text_span_reference(heads[:, layer, head], pool, m=cfg["m"], rank=cfg["rank"])
        direct_times.append(time.perf_counter() - start)
        direct_cpu.append(time.process_time() - cpu)
        same.append(slow.indices.tolist() == fast[label].indices.tolist())
        max_recon_diff = max(
            max_recon_diff, float((slow.reconstruction - fast[label].reconstruction).abs().max())
        )
        print(
            f"direct (text_span_reference) {label}: {direct_times[-1]:.1f} s wall, {direct_cpu[-1]:.1f} s "
            f"CPU, "
            f"same picks: {same[-1]}",
            flush=True,
        )
    direct_per_head, direct_cpu_per_head = float(np.mean(direct_times)), float(np.mean(direct_cpu))
    ratio, wall_ratio = direct_cpu_per_head / fast_cpu_per_head, direct_per_head / fast_per_head
    print(
        f"direct loop timed on {direct_heads} of {n_heads} heads; extrapolated to all heads: "
        f"{direct_cpu_per_head * n_heads:.0f} s CPU ({direct_cpu_per_head:.1f} s CPU/head)"
    )
    print(
        f"speed-up (direct / fast, CPU time per head): {ratio:.1f}x   (target at full size >= 20x; wall "
        f"clock: {wall_ratio:.1f}x)"
    )
    print(
        f"identical picks on the {direct_heads} compared heads: {all(same)}; "
        f"max |reconstruction difference| (float32 outputs) = {max_recon_diff:.2e}"
    )
    explained = [float(r.cumulative_explained[-1]) for r in fast.values()]
    print(f"variance explained by {cfg['m']} texts (fast, over heads): median {np.median(explained):.3f}")

    if args.json:
        results = {
            "config": dict(
                cfg,
                heads_total=n_heads,
                seed=args.seed,
                threads=torch.get_num_threads(),
                dtype="float64",
                size="small" if args.small else "full",
            ),
            "fast_wall_seconds_total": fast_total,
            "fast_cpu_seconds_total": fast_cpu,
            "fast_cpu_seconds_per_head": fast_cpu_per_head,
            "direct_heads_timed": direct_heads,
            "direct_wall_seconds_per_head": direct_per_head,
            "direct_cpu_seconds_per_head": direct_cpu_per_head,
            "direct_cpu_seconds_extrapolated_total": direct_cpu_per_head * n_heads,
            "speedup_cpu": ratio,
            "speedup_wall": wall_ratio,
            "identical_picks": all(same),
            "compared_heads": labels,
            "max_reconstruction_difference_float32": max_recon_diff,
            "median_explained": float(np.median(explained)),
            "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "machine": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "processor": platform.processor() or platform.machine(),
            },
        }
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
