"""Cost of the decomposition relative to a plain ``model.encode_image`` on the same batch.

Measures, on random-init towers on CPU (open_clip ViTs; Hugging Face CLIP; SigLIP's attention-pool
towers through timm (open_clip's ViT-B-16-SigLIP) and through Hugging Face):

* time: the backend's own forward (``encode_image``; HF's ``pooler_output``) vs ``decompose`` at head
  level (every layer) and per patch (last 4 layers), same batch, same process, median of ``--repeats``
  runs after one warm-up run per mode;
  batch sizes 1, 2, 4, 8 show how the cost per image grows with the batch. Both wall-clock and CPU
  time (``time.process_time``) are recorded; the verdicts use CPU time, which other programs on a
  shared machine disturb far less than wall-clock time.
* peak memory: each (model, mode) runs in a fresh subprocess (so one mode's peak cannot hide
  another's) and reports two figures: the peak resident set added by the call (VmHWM, reset just
  before it, minus VmRSS before it; includes allocator slack) and the peak of live torch tensors
  (torch profiler memory events). tracemalloc does not see torch's allocator at all.
* image count: ``DecompositionCache.build`` over N images (fp16 shards written to a temporary folder)
  vs plain ``encode_image`` over the same images in batches, so cache I/O is included.

Usage: ``python bench/bench_decompose.py [--quick] [--json out.json]``. ``--quick`` uses ViT-B-32 and
ViT-B-16 with small batches. ``--models`` picks towers by name (:data:`MODELS`, or any open_clip spec)
and ``--batches`` the batch sizes, e.g. ``--models hf-clip-B-16 ViT-B-16-SigLIP hf-siglip-B-16
--batches 1 2 4`` for the backend rows. Timings use one thread (``--threads``) so they are comparable
on a shared machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODES = ("plain", "head", "patch")
TARGETS = {"head": 1.3, "patch": 2.0}


def _hf_clip_b16():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(
        CLIPVisionConfig(patch_size=16, projection_dim=512, hidden_act="quick_gelu")
    )


def _hf_siglip_b16():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel(SiglipVisionConfig())  # the defaults are SigLIP-B/16 at 224 px


MODELS = {"hf-clip-B-16": _hf_clip_b16, "hf-siglip-B-16": _hf_siglip_b16}
"""Random-init Hugging Face towers by name; any other name is a clipdecomp.load spec (ViT-B-16-SigLIP...)."""


def _load(arch: str):
    import clipdecomp

    torch.manual_seed(0)
    return MODELS[arch]().eval() if arch in MODELS else clipdecomp.load(arch)


def _run(model, mode: str, images: torch.Tensor) -> float:
    """Run one mode; returns the size in MB of its result (the embedding, or every decomposition field)."""
    import clipdecomp

    with torch.no_grad():
        if mode == "plain":  # the backend's own forward
            out = [clipdecomp.vision_tower(model).features(images)]
        elif mode == "head":
            parts = clipdecomp.decompose(model, images)
        else:
            parts = clipdecomp.decompose(model, images, spatial=True, layers=range(-4, 0))
    if mode != "plain":
        out = [
            t
            for t in (
                parts.embedding,
                parts.attns,
                parts.mlps,
                parts.heads,
                parts.cls_to_cls,
                parts.norm,
                parts.pool_heads,
                parts.pool_mlp,
            )
            if t is not None
        ]
    return sum(t.numel() * t.element_size() for t in out) / 2**20


def _images(model, batch: int) -> torch.Tensor:
    import clipdecomp

    size = clipdecomp.vision_tower(model).image_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch))


def time_model(arch: str, batch_sizes: list[int], repeats: int) -> list[dict]:
    """Median wall and CPU seconds per mode and batch size; modes interleaved so drift affects all alike."""
    bundle = _load(arch)
    for mode in MODES:  # warm-up: first calls pay one-off allocation and kernel-selection costs
        _run(bundle, mode, _images(bundle, 1))
    rows = []
    for batch in batch_sizes:
        images = _images(bundle, batch)
        wall: dict[str, list[float]] = {mode: [] for mode in MODES}
        cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(repeats):
            for mode in MODES:
                start, start_cpu = time.perf_counter(), time.process_time()
                _run(bundle, mode, images)
                wall[mode].append(time.perf_counter() - start)
                cpu[mode].append(time.process_time() - start_cpu)
        row = {"model": arch, "batch": batch}
        for clock, values in (("wall", wall), ("cpu", cpu)):
            median = {mode: statistics.median(v) for mode, v in values.items()}
            row |= {f"{m}_{clock}_s": median[m] for m in MODES}
            row |= {f"{m}_{clock}_ratio": median[m] / median["plain"] for m in ("head", "patch")}
        row["plain_cpu_s_per_image"] = row["plain_cpu_s"] / batch
        row["raw"] = {"wall": wall, "cpu": cpu}
        print(
            f"{arch:9s} B={batch:<2d} plain {row['plain_cpu_s']:6.2f} s CPU "
            f"({row['plain_cpu_s_per_image']:.2f} s/img, wall {row['plain_wall_s']:.2f}) | "
            f"head x{row['head_cpu_ratio']:.2f} (wall x{row['head_wall_ratio']:.2f}) | "
            f"patch x{row['patch_cpu_ratio']:.2f} (wall x{row['patch_wall_ratio']:.2f})",
            flush=True,
        )
        rows.append(row)
    return rows


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def _torch_peak_mb(bundle, mode: str, images: torch.Tensor) -> float:
    """Peak bytes held by torch's CPU allocator during one call, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _run(bundle, mode, images)
    with tempfile.TemporaryDirectory() as folder:
        prof.export_chrome_trace(f"{folder}/trace.json")
        events = json.loads(Path(f"{folder}/trace.json").read_text())["traceEvents"]
    totals = [
        (e["args"]["Total Allocated"], e["args"]["Bytes"]) for e in events if e.get("name") == "[memory]"
    ]
    if not totals:
        return 0.0
    baseline = totals[0][0] - totals[0][1]  # allocated before the first event of the call
    return (max(total for total, _ in totals) - baseline) / 2**20


def memory_probe(arch: str, mode: str, batch: int) -> dict:
    """Runs in a fresh subprocess: peak memory added by one call of ``mode`` (Linux only).

    ``rss_mb``: building a model briefly needs more memory than keeping it, which would hide the
    call's peak from ``ru_maxrss``; writing "5" to /proc/self/clear_refs resets the peak (VmHWM) to the
    current resident set just before the call, so VmHWM afterwards minus VmRSS before is the call's own
    peak (including allocator slack). ``torch_mb``: a second, profiled call gives the peak of live
    tensors alone (torch's CPU allocator does not cache, so the second call allocates like the first).
    """
    bundle = _load(arch)
    images = _images(bundle, batch)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = _status_kb("VmRSS")
    output_mb = _run(bundle, mode, images)
    rss_mb = (_status_kb("VmHWM") - before) / 1024
    return {
        "rss_mb": rss_mb,
        "torch_mb": _torch_peak_mb(bundle, mode, images),
        "output_mb": output_mb,
        "rss_before_mb": before / 1024,
    }


def memory_model(arch: str, batch: int, threads: int) -> dict:
    out = {"model": arch, "batch": batch}
    for mode in MODES:
        result = subprocess.run(
            [sys.executable, __file__, "--memory-probe", arch, mode, str(batch), "--threads", str(threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    for mode in ("head", "patch"):
        for kind in ("rss", "torch"):
            out[f"{mode}_{kind}_ratio"] = out[mode][f"{kind}_mb"] / max(out["plain"][f"{kind}_mb"], 1e-9)
    print(
        f"{arch:9s} B={batch:<2d} peak extra memory, resident / live tensors (output): plain "
        f"{out['plain']['rss_mb']:.0f} / {out['plain']['torch_mb']:.0f} MB | "
        + " | ".join(
            f"{m} {out[m]['rss_mb']:.0f} / {out[m]['torch_mb']:.0f} MB ({out[m]['output_mb']:.0f}) "
            f"x{out[m + '_rss_ratio']:.2f} / x{out[m + '_torch_ratio']:.2f}"
            for m in ("head", "patch")
        ),
        flush=True,
    )
    return out


class _RandomImages:
    """A dataset of fixed random preprocessed images in the cache's dataset protocol."""

    def __init__(self, n: int, size: tuple[int, int]):
        self.n, self.size = n, size
        self.labels = {"label": np.zeros(n, dtype=np.int64)}
        self.ids = [f"random/{i}" for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def image(self, index: int) -> torch.Tensor:
        return torch.randn(3, *self.size, generator=torch.Generator().manual_seed(index))

    def content_key(self) -> dict:
        return {"kind": "random", "n": self.n, "size": list(self.size)}


def cache_scaling(arch: str, counts: list[int], batch: int) -> list[dict]:
    """Seconds per image of a cache build (head level, fp16 shards) vs plain encoding, over N images."""
    from clipdecomp.cache import DecompositionCache

    bundle = _load(arch)
    size = bundle.image_size
    rows = []
    for n in counts:
        data = _RandomImages(n, size)
        start = time.perf_counter()
        with torch.no_grad():
            for first in range(0, n, batch):
                bundle.model.encode_image(
                    torch.stack([data.image(i) for i in range(first, min(n, first + batch))])
                )
        plain = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            DecompositionCache.build(bundle, data, Path(folder) / "cache", batch_size=batch, progress=False)
            built = time.perf_counter() - start
            disk = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
        row = {
            "model": arch,
            "images": n,
            "batch": batch,
            "plain_s_per_image": plain / n,
            "cache_s_per_image": built / n,
            "ratio": built / plain,
            "disk_mb_per_image": disk / n / 2**20,
        }
        print(
            f"{arch:9s} N={n:<3d} plain {plain / n:.2f} s/img | cache build {built / n:.2f} s/img "
            f"x{row['ratio']:.2f} | {row['disk_mb_per_image']:.2f} MB/img on disk",
            flush=True,
        )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="ViT-B-32 and ViT-B-16, small batches")
    parser.add_argument("--json", type=Path, help="write all measurements to this JSON file")
    parser.add_argument("--repeats", type=int, help="timed runs per mode (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--models", nargs="+", help="towers to time (names in MODELS or clipdecomp.load specs)"
    )
    parser.add_argument("--batches", nargs="+", type=int, help="batch sizes for --models (default 1 2 4)")
    parser.add_argument(
        "--no-cache", action="store_true", help="skip the image-count (cache build) measurement"
    )
    parser.add_argument("--memory-probe", nargs=3, metavar=("MODEL", "MODE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        arch, mode, batch = args.memory_probe
        print(json.dumps(memory_probe(arch, mode, int(batch))))
        return

    if args.quick:
        plan = {"ViT-B-32": [1, 2, 4], "ViT-B-16": [1, 2, 4]}
        repeats, memory_batch, counts, scale_model = args.repeats or 3, 4, [8, 16], "ViT-B-32"
    else:
        plan = {"ViT-B-16": [1, 2, 4, 8], "ViT-L-14": [1, 2, 4, 8]}
        repeats, memory_batch, counts, scale_model = args.repeats or 2, 8, [8, 32], "ViT-B-16"
    if args.models:
        plan = {name: args.batches or [1, 2, 4] for name in args.models}
        memory_batch = max(plan[args.models[0]])
    started = time.perf_counter()
    report = {
        "targets": TARGETS,
        "threads": args.threads,
        "repeats": repeats,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "processor": platform.processor() or platform.machine(),
        "timing": [],
        "memory": [],
        "cache": [],
    }
    for arch, batches in plan.items():
        report["timing"] += time_model(arch, batches, repeats)
    for arch in plan:
        report["memory"].append(memory_model(arch, memory_batch, args.threads))
    report["cache"] = [] if args.no_cache else cache_scaling(scale_model, counts, batch=8)
    report["seconds"] = time.perf_counter() - started

    print(
        "\nSummary (median CPU-time ratio decompose / the backend's own forward; "
        "targets: head <= 1.3, patch <= 2.0)"
    )
    for row in report["timing"]:
        verdict = " ".join(
            f"{m} x{row[f'{m}_cpu_ratio']:.2f} {'met' if row[f'{m}_cpu_ratio'] <= t else 'MISSED'}"
            for m, t in TARGETS.items()
        )
        print(f"  {row['model']:9s} B={row['batch']:<2d} {verdict}")
    print(f"total {report['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
