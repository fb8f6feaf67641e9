"""The book: sources stored clean, every chapter executes under the ci profile, strict site build."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from clipdecomp.book import build_site, execute_notebooks, repo_root
from clipdecomp.book.runner import toc_notebooks

ROOT = repo_root()
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_stored_without_outputs_and_with_parameters(path: Path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} has stored outputs"
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert "setup(" in code[0].source, f"{path.name}: first code cell must be the standard setup cell"
    assert "parameters" in code[1].metadata.get("tags", []), f"{path.name}: second code cell must be tagged parameters"
    assert "sys.path" not in "".join(c.source for c in code), f"{path.name}: import clipdecomp by name, no sys.path hacks"


def test_every_notebook_is_in_the_toc():
    listed = set(toc_notebooks(ROOT))
    assert {f"notebooks/{p.stem}" for p in NOTEBOOKS} <= listed


def test_book_executes_and_builds_strictly(tmp_path):
    staging = tmp_path / "src"
    timings = execute_notebooks("ci", staging=staging)
    assert set(timings) == set(toc_notebooks(ROOT))
    for entry in timings:
        executed = json.loads((staging / f"{entry}.ipynb").read_text())
        errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{entry} has error outputs"
    html = build_site(staging=staging, output=tmp_path)
    for entry in timings:
        assert (html / f"{entry}.html").is_file()
