"""The book: sources stored clean, every chapter executes under the ci profile, strict site build."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from clipdecomp.book import repo_root
from clipdecomp.book.chapters import SETUP_CELL
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
    assert code[0].source == SETUP_CELL, f"{path.name}: first code cell must be the standard setup cell"
    assert "parameters" in code[1].metadata.get("tags", []), f"{path.name}: second code cell must be tagged parameters"
    assert "sys.path" not in "".join(c.source for c in code), f"{path.name}: import clipdecomp by name, no sys.path hacks"


def test_every_notebook_is_in_the_toc():
    listed = set(toc_notebooks(ROOT))
    assert {f"notebooks/{p.stem}" for p in NOTEBOOKS} <= listed


def test_book_executes_and_builds_strictly(built_book):
    staging, html, runs = built_book
    assert [run.entry for run in runs] == toc_notebooks(ROOT)
    for run in runs:
        executed = json.loads((staging / f"{run.entry}.ipynb").read_text())
        errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{run.entry} has error outputs"
    for entry in toc_notebooks(ROOT) + ["book/status"]:
        assert (html / f"{entry}.html").is_file()
    status = (html / "book" / "status.html").read_text()
    assert "ci</strong> profile" in status and "01_decomposition" in status
