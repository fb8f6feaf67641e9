"""The benchmarks appendix: the ``bench/`` scripts' JSON results laid out as tables, each with its target.

Nothing is measured here: the scripts take minutes to an hour and write ``bench/results/*.json``;
:class:`BenchResults` reads them and shows every ratio beside its target, met or not (✓/✗). A result
file that is missing is said to be missing instead of failing the chapter.

>>> bench = BenchResults.read()
>>> bench.facts()["span_same"]
'identical'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pandas.io.formats.style import Styler

from ..paths import repo_root

__all__ = ["BenchResults", "mark"]

_MODES = {"patch_all": "every layer", "patch_last4": "last 4 layers"}  # memory.json's per-patch modes


def mark(met: bool) -> str:
    """✓ or ✗."""
    return "✓" if met else "✗"


@dataclass(frozen=True)
class BenchResults:
    """Every ``<name>.json`` of a results folder, by name (``decompose``, ``text_span``, ``gpu``, ...)."""

    folder: Path
    results: dict[str, dict]

    @classmethod
    def read(cls, folder: str | Path | None = None) -> "BenchResults":
        """Read ``folder`` (default: the repository's ``bench/results``)."""
        folder = Path(folder) if folder is not None else repo_root() / "bench" / "results"
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} is not a folder of benchmark results; run the scripts in bench/ with --json "
                "(see bench/README.md) or pass the folder that holds their JSON files."
            )
        return cls(folder, {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))})

    def file(self, name: str) -> str:
        """Where ``<name>.json`` is (or would be), relative to the repository when inside it."""
        path = self.folder.resolve() / f"{name}.json"
        return str(path.relative_to(repo_root())) if path.is_relative_to(repo_root()) else str(path)

    def missing(self, name: str) -> str:
        """What a table or a fact says when ``<name>.json`` was never written."""
        return f"not measured (no {self.file(name)})"

    def _timing(self) -> list[tuple[str, dict, dict[str, bool]]]:
        """(run, timing row, {"head": met, "patch": met}) of the full and the quick decomposition runs."""
        targets = self.results["decompose"]["targets"]
        runs = {"full": self.results["decompose"], "quick": self.results.get("decompose_quick", {})}
        return [
            (run, t, {kind: t[f"{kind}_cpu_ratio"] <= targets[kind] for kind in ("head", "patch")})
            for run, report in runs.items()
            for t in report.get("timing", [])
        ]

    def _memory_met(self) -> list[bool]:
        """Whether every target of each (model, layers) row of ``memory.json`` was met, in order."""
        return [all(row[mode]["met"].values()) for row in self.results["memory"]["rows"] for mode in _MODES]

    def decomposition_time(self) -> Styler | str:
        """CPU time of the head-level and per-patch decompositions over ``encode_image``, against targets."""
        if "decompose" not in self.results:
            return self.missing("decompose")
        targets = self.results["decompose"]["targets"]
        rows = [
            {
                "run": run,
                "model": t["model"],
                "batch": t["batch"],
                "head / plain": t["head_cpu_ratio"],
                f"head ≤ {targets['head']}": mark(met["head"]),
                "patch / plain": t["patch_cpu_ratio"],
                f"patch ≤ {targets['patch']}": mark(met["patch"]),
            }
            for run, t, met in self._timing()
        ]
        table = pd.DataFrame(rows).set_index(["run", "model", "batch"])
        return table.style.format("{:.2f}", subset=["head / plain", "patch / plain"]).set_caption(
            "CPU time over encode_image (one thread)"
        )

    def decomposition_memory(self) -> Styler | str:
        """Peak resident memory of each call, and the per-patch result's own size."""
        if "decompose" not in self.results:
            return self.missing("decompose")
        rows = [
            {
                "model": m["model"],
                "batch": m["batch"],
                "plain (MB)": m["plain"]["rss_mb"],
                "head (MB)": m["head"]["rss_mb"],
                "patch (MB)": m["patch"]["rss_mb"],
                "patch result (MB)": m["patch"]["output_mb"],
            }
            for m in self.results["decompose"]["memory"]
        ]
        table = pd.DataFrame(rows).set_index(["model", "batch"])
        return table.style.format("{:.0f}").set_caption("Peak resident memory of the call")

    def bounded_memory(self) -> Styler | str:
        """Per-patch decomposition: added peak memory over the result's size, and time, against targets."""
        if "memory" not in self.results:
            return self.missing("memory")
        cases = [(row, mode) for row in self.results["memory"]["rows"] for mode in _MODES]
        rows = [
            {
                "model": row["model"],
                "layers": _MODES[mode],
                "memory / result": row[mode]["live_ratio"],
                "memory target": row[mode]["memory_target"],
                "time / plain": row[mode]["time_ratio"],
                "time target": row[mode]["time_target"],
                "met": mark(met),
            }
            for (row, mode), met in zip(cases, self._memory_met())
        ]
        ratios = ["memory / result", "memory target", "time / plain", "time target"]
        table = pd.DataFrame(rows).set_index(["model", "layers"])
        return table.style.format("{:.2f}", subset=ratios).set_caption("Per-patch decomposition, batch 8")

    def text_span(self) -> Styler | str:
        """The fast TEXT SPAN against the authors' direct loop (CPU seconds per head)."""
        if "text_span" not in self.results:
            return self.missing("text_span")
        span = self.results["text_span"]
        rows = {
            "fast (CPU s per head)": f"{span['fast_cpu_seconds_per_head']:.2f}",
            "direct loop (CPU s per head)": f"{span['direct_cpu_seconds_per_head']:.1f}",
            "speed-up (CPU)": f"{span['speedup_cpu']:.1f}×",
            "identical picks": mark(span["identical_picks"]),
            "heads the direct loop was timed on": str(span["direct_heads_timed"]),
        }
        return pd.Series(rows).to_frame("value").style.set_caption("TEXT SPAN, a ViT-L-14-sized problem")

    def second_order(self) -> Styler | str:
        """One layer's second-order effects over ``encode_image`` (CPU time), the authors' loop beside."""
        if "second_order" not in self.results:
            return self.missing("second_order")
        second = self.results["second_order"]
        rows = {
            f"{e['model']} layer {e['layer']}, batch {e['batch']}": e["ratio_cpu"] for e in second["effects"]
        }
        rows["authors' literal loop, 1 image (reference)"] = second["literal"]["ratio_cpu"]
        table = pd.Series(rows).to_frame("CPU time / encode_image")
        return table.style.format("{:.2f}").set_caption("Second-order effects of one layer")

    def gpu(self) -> list[Styler]:
        """Throughput and peak memory on a GPU, one table per ``gpu*.json`` (none measured: empty)."""
        tables = []
        for name in sorted(n for n in self.results if n.startswith("gpu")):
            gpu = self.results[name]
            plain = gpu["rows"]["plain"]["seconds"]
            rows = {
                mode: {
                    "batch": row["batch"],
                    "images/s": row["images_per_s"],
                    "time / plain": row["seconds"] / plain,
                    "peak memory (MB)": row.get("peak_mb", float("nan")),
                }
                for mode, row in gpu["rows"].items()
            }
            formats = {
                "batch": "{:.0f}",
                "images/s": "{:.1f}",
                "time / plain": "{:.2f}",
                "peak memory (MB)": "{:.0f}",
            }
            caption = f"{gpu['model']} {gpu['precision']} on {gpu['device']}"
            tables.append(pd.DataFrame(rows).T.style.format(formats, na_rep="–").set_caption(caption))
        return tables

    def facts(self) -> dict[str, str]:
        """The appendix's prose values (for glue): targets met, worst ratios, speed-ups, notes."""
        facts = dict.fromkeys(("head_met", "patch_met", "head_worst"), self.missing("decompose"))
        facts |= dict.fromkeys(("span_speedup", "span_same"), self.missing("text_span"))
        if "decompose" in self.results:
            timing = self._timing()
            for kind in ("head", "patch"):
                facts[f"{kind}_met"] = f"{sum(met[kind] for *_, met in timing)} of {len(timing)}"
            facts["head_worst"] = f"{max(t['head_cpu_ratio'] for _, t, _ in timing):.2f}"
        if "memory" in self.results:
            checks = self._memory_met()
            facts["memory_met"] = f"{sum(checks)} of {len(checks)}"
        else:
            facts["memory_met"] = self.missing("memory")
        if "text_span" in self.results:
            span = self.results["text_span"]
            facts["span_speedup"] = f"{span['speedup_cpu']:.1f}"
            facts["span_same"] = "identical" if span["identical_picks"] else "NOT identical"
        second = self.results.get("second_order")
        targets = second["targets"] if second else {"effects": 3, "omp_speedup": 10}
        facts["so_effects_target"] = f"{targets['effects']:.0f}"
        facts["so_omp_target"] = f"{targets['omp_speedup']:.0f}"
        if second:
            omp = second["omp"]
            facts["so_summary"] = (
                f"effects {max(e['ratio_cpu'] for e in second['effects']):.2f}x at worst; OMP over "
                f"{omp['targets']:,} neurons and {omp['texts']:,} texts {omp['speedup_cpu']:.0f}x faster, "
                f"{'identical' if omp['same_picks'] else 'NOT identical'} picks"
            )
        else:
            facts["so_summary"] = self.missing("second_order")
        gpu = self.results.get("gpu")
        if gpu:
            head, patch = gpu["time_ratio"]["head"], gpu["time_ratio"]["patch"]
            facts["gpu_note"] = (
                f"Measured on {gpu['device']}: the head-level decomposition runs at {head:.2f} times the "
                f"plain forward time, per patch at {patch:.2f} times."
            )
        else:
            facts["gpu_note"] = (
                "Not measured yet: no GPU was available to the sessions that built this book, so there "
                f"is no {self.file('gpu')}."
            )
        return facts
