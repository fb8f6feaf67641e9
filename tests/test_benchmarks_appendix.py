"""The benchmarks appendix (clipdecomp.book.benchmarks): tables and facts from bench/results/*.json."""

from __future__ import annotations

import json
import shutil

import pytest
from clipdecomp.book.benchmarks import BenchResults
from clipdecomp.paths import repo_root

RESULTS = repo_root() / "bench" / "results"


def test_the_shipped_results_give_every_table_with_its_targets():
    bench = BenchResults.read()
    timing = bench.decomposition_time().data
    decompose = json.loads((RESULTS / "decompose.json").read_text())
    assert len(timing) == len(decompose["timing"]) + len(
        bench.results.get("decompose_quick", {}).get("timing", [])
    )
    first = decompose["timing"][0]
    row = timing.loc[("full", first["model"], first["batch"])]
    assert row["head / plain"] == first["head_cpu_ratio"]
    assert row[f"head ≤ {decompose['targets']['head']}"] == ("✓" if first["head_cpu_ratio"] <= 1.3 else "✗")
    assert set(timing.filter(like="≤").stack()) <= {"✓", "✗"}  # no True/False columns
    facts = bench.facts()
    head_column = f"head ≤ {decompose['targets']['head']}"
    assert facts["head_met"] == f"{(timing[head_column] == '✓').sum()} of {len(timing)}"
    span = json.loads((RESULTS / "text_span.json").read_text())
    assert facts["span_speedup"] == f"{span['speedup_cpu']:.1f}"
    assert bench.text_span().data.loc["identical picks", "value"] in {"✓", "✗"}


def test_missing_results_are_said_to_be_missing(tmp_path):
    bench = BenchResults.read(tmp_path)
    assert bench.decomposition_time() == f"not measured (no {tmp_path / 'decompose.json'})"
    assert bench.gpu() == [] and "no " in bench.facts()["gpu_note"]
    assert set(bench.facts()) >= {"head_met", "span_same", "memory_met", "so_summary", "gpu_note"}
    with pytest.raises(FileNotFoundError, match="not a folder of benchmark results"):
        BenchResults.read(tmp_path / "absent")


def test_a_gpu_result_becomes_a_table_and_a_note(tmp_path):
    shutil.copy(RESULTS / "text_span.json", tmp_path)
    rows = {
        mode: {"batch": 64, "seconds": s, "images_per_s": 64 / s, "peak_mb": 100.0 * s}
        for mode, s in (("plain", 1.0), ("head", 1.1), ("patch", 1.5))
    }
    gpu = {
        "model": "ViT-L-14",
        "precision": "fp16",
        "device": "NVIDIA H200",
        "rows": rows,
        "time_ratio": {"head": 1.1, "patch": 1.5},
    }
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    bench = BenchResults.read(tmp_path)
    [table] = bench.gpu()
    assert table.data.loc["patch", "time / plain"] == pytest.approx(1.5)
    assert bench.facts()["gpu_note"].startswith(
        "Measured on NVIDIA H200: the head-level decomposition runs at 1.10"
    )
