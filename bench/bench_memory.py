"""Memory and time of the per-patch decomposition against a plain ``encode_image`` of the same batch.

The per-patch result is large: ``heads`` [B, L', N, H, d'] in fp32 (ViT-L-14, batch 8, last 4 layers:
396 MB; every layer: 2.4 GB). Two targets (issue 17):

* memory: the peak memory the call adds, beyond what the plain forward adds, is at most 1.5x the
  result: ``(peak(patch) - peak(plain)) / result <= 1.5``, for live tensors and for resident memory;
* time: per patch in every layer <= 1.5x ``encode_image``, in the last 4 layers <= 1.3x (CPU time).

Modes on the same random batch: ``plain`` (the tower's own forward, :meth:`Tower.features`),
``patch_all`` (``decompose(spatial=True)``, every layer) and ``patch_last4`` (``layers=range(-4, 0)``).
Peak memory: each (model, mode) in a fresh subprocess, two figures. *Resident*: VmHWM is reset just
before the call (``5`` to ``/proc/self/clear_refs``, Linux); VmHWM after minus VmRSS before is the
call's own peak, including what glibc's heap keeps of freed blocks. *Live tensors*: a second call under
``torch.profiler`` (``profile_memory=True``): the largest total of allocated tensors during the call,
minus the total before it (torch's CPU allocator does not cache, so this is what is really held).
Time: one torch thread, modes interleaved, median CPU seconds (``time.process_time``) of
``--repeats`` runs after a warm-up, so that other jobs on a shared machine disturb it little.

Usage: ``python bench/bench_memory.py [--models ViT-B-16 ViT-L-14] [--batch 8] [--json PATH]``.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decompose import _images, _load, _status_kb  # noqa: E402 (the shared model and probe helpers)

MODES = {"plain": None, "patch_all": None, "patch_last4": range(-4, 0)}
TIME_TARGETS = {"patch_all": 1.5, "patch_last4": 1.3}
MEMORY_TARGET = 1.5


def _run(bundle, mode: str, images: torch.Tensor) -> int:
    """One call of ``mode``; returns the bytes of the per-patch result (0 for the plain forward)."""
    import clipdecomp

    with torch.no_grad():
        if mode == "plain":
            clipdecomp.vision_tower(bundle).features(images)
            return 0
        parts = clipdecomp.decompose(bundle, images, spatial=True, layers=MODES[mode])
    return parts.heads.numel() * parts.heads.element_size()


def _live_peak_mb(bundle, mode: str, images: torch.Tensor) -> float:
    """The peak of live tensors during one call, from the profiler's memory events (MB)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _run(bundle, mode, images)
    with tempfile.TemporaryDirectory() as folder:
        prof.export_chrome_trace(f"{folder}/trace.json")
        events = json.loads(Path(f"{folder}/trace.json").read_text())["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    before = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return (max(e["Total Allocated"] for e in memory) - before) / 2**20


def probe(arch: str, mode: str, batch: int) -> dict:
    """In a fresh process: the peak resident memory and live tensors one call adds, and its result (MB)."""
    bundle = _load(arch)
    images = _images(bundle, batch)
    _run(bundle, mode, _images(bundle, 1))  # one-off costs (output maps, kernel choice) outside the peak
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = _status_kb("VmRSS")
    result = _run(bundle, mode, images)
    return {
        "peak_mb": (_status_kb("VmHWM") - before) / 1024,
        "live_mb": _live_peak_mb(bundle, mode, images),
        "result_mb": result / 2**20,
    }


def measure(arch: str, batch: int, repeats: int, threads: int) -> dict:
    row: dict = {"model": arch, "batch": batch}
    for mode in MODES:
        done = subprocess.run(
            [sys.executable, __file__, "--probe", arch, mode, str(batch), "--threads", str(threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        row[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    bundle = _load(arch)
    images = _images(bundle, batch)
    for mode in MODES:
        _run(bundle, mode, _images(bundle, 1))
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode in MODES:
            start = time.process_time()
            _run(bundle, mode, images)
            cpu[mode].append(time.process_time() - start)
    plain = statistics.median(cpu["plain"])
    row["plain"]["cpu_s"] = plain
    for mode in ("patch_all", "patch_last4"):
        entry = row[mode]
        entry["cpu_s"] = statistics.median(cpu[mode])
        entry["time_ratio"] = entry["cpu_s"] / plain
        entry["memory_ratio"] = (entry["peak_mb"] - row["plain"]["peak_mb"]) / entry["result_mb"]
        entry["live_ratio"] = (entry["live_mb"] - row["plain"]["live_mb"]) / entry["result_mb"]
        entry["time_target"], entry["memory_target"] = TIME_TARGETS[mode], MEMORY_TARGET
        entry["met"] = {
            "time": entry["time_ratio"] <= TIME_TARGETS[mode],
            "live memory": entry["live_ratio"] <= MEMORY_TARGET,
            "resident memory": entry["memory_ratio"] <= MEMORY_TARGET,
        }
    row["raw_cpu_s"] = cpu
    plain_row = row["plain"]
    print(
        f"{arch} B={batch}: plain {plain:.1f} s CPU, peak +{plain_row['peak_mb']:.0f} MB resident, "
        f"+{plain_row['live_mb']:.0f} MB live tensors"
    )
    for mode in ("patch_all", "patch_last4"):
        entry = row[mode]
        verdict = ", ".join(f"{what} {'met' if ok else 'MISSED'}" for what, ok in entry["met"].items())
        print(
            f"  {mode:11s} result {entry['result_mb']:.0f} MB | (peak - plain peak) / result: live "
            f"x{entry['live_ratio']:.2f}, resident x{entry['memory_ratio']:.2f} "
            f"(target <= {MEMORY_TARGET}) | "
            f"time x{entry['time_ratio']:.2f} (target <= {TIME_TARGETS[mode]}) | {verdict}",
            flush=True,
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["ViT-B-16", "ViT-L-14"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, help="write every measurement to this JSON file")
    parser.add_argument("--probe", nargs=3, metavar=("MODEL", "MODE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        arch, mode, batch = args.probe
        print(json.dumps(probe(arch, mode, int(batch))))
        return
    for arch in args.models:
        row = measure(arch, args.batch, args.repeats, args.threads)
        if args.json:  # rows of other models already in the file are kept, so models can be run one by one
            old = json.loads(args.json.read_text())["rows"] if args.json.exists() else []
            rows = [r for r in old if (r["model"], r["batch"]) != (arch, args.batch)] + [row]
            args.json.parent.mkdir(parents=True, exist_ok=True)
            report = {"machine": platform.platform(), "torch": torch.__version__, "threads": args.threads}
            args.json.write_text(json.dumps({**report, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
