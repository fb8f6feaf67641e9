"""Throughput and peak memory of the decomposition on one GPU, against the plain forward pass.

For random-init open_clip ViTs (default ViT-L-14 then ViT-H-14, fp16 weights as used for inference),
this script, model by model,

1. finds, by doubling, the largest batch size (up to ``--max-batch``) at which each mode runs
   without running out of memory: ``plain`` (``encode_image``), ``head`` (``decompose``, per-head
   terms in every layer) and ``patch`` (per-patch terms of the last 4 layers);
2. at the largest batch that fits *all* modes, times each mode (median of ``--repeats`` after a
   warm-up, CUDA synchronised) and records images/s and ``torch.cuda.max_memory_allocated``;
3. prints ratios against ``plain`` measured in the same process, and with ``--json`` writes them all:
   the first model to that file, each further one beside it (``gpu.json``, ``gpu_ViT-H-14.json``).

Per patch it also reports the size of the result (``heads``, fp32) and the peak memory the call adds
beyond the plain forward's peak, as a multiple of that result (issue 17's target: at most 1.5).
A model is skipped when less than ``--budget-s`` seconds remain of the run's budget.

It is meant to be run once, in a few minutes, on a lent GPU:

    python bench/bench_gpu.py --json bench/results/gpu.json      # ViT-L-14 and ViT-H-14, fp16

On a machine without CUDA it runs the same steps on the CPU (``--device cpu``, for checking the
script itself with a small model: ``--model ViT-B-32 --max-batch 4``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import clipdecomp
import torch

MODES = ("plain", "head", "patch")


def _call(bundle, mode: str, images: torch.Tensor) -> int:
    """Run one mode; the bytes of its per-patch result (0 for the other modes)."""
    with torch.no_grad():
        if mode == "plain":
            bundle.model.encode_image(images)
        elif mode == "head":
            clipdecomp.decompose(bundle, images)
        else:
            heads = clipdecomp.decompose(bundle, images, spatial=True, layers=range(-4, 0)).heads
            return heads.numel() * heads.element_size()
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images(bundle, batch: int) -> torch.Tensor:
    size = tuple(bundle.model.visual.image_size)
    weight = bundle.model.visual.conv1.weight
    return torch.randn(batch, 3, *size, device=weight.device, dtype=weight.dtype)


def _fits(bundle, mode: str, batch: int) -> bool:
    try:
        _call(bundle, mode, _images(bundle, batch))
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        if bundle.device.type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(bundle, mode: str, max_batch: int) -> int:
    """The largest power of two up to ``max_batch`` at which ``mode`` runs (0 if not even batch 1)."""
    batch, best = 1, 0
    while batch <= max_batch and _fits(bundle, mode, batch):
        best, batch = batch, batch * 2
    return best


def measure(bundle, mode: str, batch: int, repeats: int) -> dict:
    """Median seconds per call, images/s and peak allocated memory (GPU) at ``batch``."""
    device = bundle.device
    images = _images(bundle, batch)
    _call(bundle, mode, images)  # warm-up: kernel selection, cached output maps
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    seconds = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = _call(bundle, mode, images)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    row = {
        "mode": mode,
        "batch": batch,
        "seconds": median,
        "images_per_s": batch / median,
        "raw_seconds": seconds,
        "result_mb": result / 2**20,
    }
    if device.type == "cuda":
        row["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return row


def run_model(arch: str, args) -> dict:
    """Largest batches, then times and peaks of every mode at the largest batch they all fit."""
    precision = args.precision if args.device != "cpu" else "fp32"  # CPU kernels are fp32
    torch.manual_seed(0)
    bundle = clipdecomp.load(arch, device=args.device, precision=precision)
    started = time.perf_counter()
    fits = {mode: largest_batch(bundle, mode, args.max_batch) for mode in MODES}
    print(
        f"{arch} {precision} on {args.device}: largest batch that fits "
        + ", ".join(f"{mode} {batch}" for mode, batch in fits.items()),
        flush=True,
    )
    batch = min(fits.values())
    if batch == 0:
        raise SystemExit("Not even batch 1 fits in memory for every mode.")
    rows = {mode: measure(bundle, mode, batch, args.repeats) for mode in MODES}
    for mode, row in rows.items():
        memory = f", peak {row['peak_mb']:.0f} MB" if "peak_mb" in row else ""
        ratio = row["seconds"] / rows["plain"]["seconds"]
        speed = f"{row['images_per_s']:8.1f} images/s"
        print(f"  {mode:5s} batch {batch}: {speed}, x{ratio:.2f} the plain time{memory}")
    device_name = (
        torch.cuda.get_device_name() if bundle.device.type == "cuda" else platform.processor() or "CPU"
    )
    report = {
        "model": arch,
        "precision": precision,
        "device": device_name,
        "torch": torch.__version__,
        "largest_batch": fits,
        "batch": batch,
        "rows": rows,
        "time_ratio": {m: rows[m]["seconds"] / rows["plain"]["seconds"] for m in ("head", "patch")},
        "seconds": time.perf_counter() - started,
    }
    if "peak_mb" in rows["plain"]:
        report["memory_ratio"] = {m: rows[m]["peak_mb"] / rows["plain"]["peak_mb"] for m in ("head", "patch")}
        patch = rows["patch"]
        report["patch_memory_vs_result"] = (patch["peak_mb"] - rows["plain"]["peak_mb"]) / patch["result_mb"]
        print(
            f"  patch: result {patch['result_mb']:.0f} MB; (peak - plain peak) / result "
            f"x{report['patch_memory_vs_result']:.2f} (target <= 1.5)"
        )
    print(f"{arch}: {report['seconds']:.0f} s", flush=True)
    del bundle
    if args.device != "cpu":
        torch.cuda.empty_cache()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", default=["ViT-L-14", "ViT-H-14"], help="open_clip architectures"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--max-batch", type=int, default=1024, help="largest batch size tried")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--budget-s", type=float, default=420, help="skip further models after this many seconds"
    )
    parser.add_argument(
        "--json", type=Path, help="write the first model's measurements here, others beside it"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    for number, arch in enumerate(args.models):
        if number and time.perf_counter() - started > args.budget_s:
            print(f"skipped {arch}: the {args.budget_s:.0f} s budget is spent")
            continue
        report = run_model(arch, args)
        if args.json:
            path = (
                args.json
                if number == 0
                else args.json.with_name(f"{args.json.stem}_{arch}{args.json.suffix}")
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2))
            print(f"wrote {path}", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
