"""The book: sources stored clean, every chapter executes under the ci profile, strict site build."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from clipdecomp.book import repo_root
from clipdecomp.book.chapters import SETUP_CELL
from clipdecomp.book.runner import toc_notebooks

from conftest import nbval_rerun

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
    assert "parameters" in code[1].metadata.get("tags", []), (
        f"{path.name}: second code cell must be tagged parameters"
    )
    assert "sys.path" not in "".join(c.source for c in code), (
        f"{path.name}: import clipdecomp by name, no sys.path hacks"
    )


def test_every_notebook_is_in_the_toc():
    listed = set(toc_notebooks(ROOT))
    assert {f"notebooks/{p.stem}" for p in NOTEBOOKS} <= listed


def test_book_executes_and_builds_strictly(built_book):
    staging, html, runs = built_book
    assert [run.entry for run in runs] == toc_notebooks(ROOT)
    for run in runs:
        executed = json.loads((staging / f"{run.entry}.ipynb").read_text())
        errors = [
            o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"
        ]
        assert not errors, f"{run.entry} has error outputs"
    for entry in toc_notebooks(ROOT) + ["book/status"]:
        assert (html / f"{entry}.html").is_file()
    from clipdecomp.book.links import broken_internal_links

    assert broken_internal_links(html) == []
    status = (html / "book" / "status.html").read_text()
    assert "ci</strong> profile" in status and "01_decomposition" in status


def test_rerun_gives_the_same_outputs(built_book, capsys):
    """nbval (not --nbval-lax) re-executes every executed chapter and compares each cell's outputs with
    the first run's: text, tables, glued values and images; only clipdecomp.book.rerun's named patterns
    are sanitised."""
    staging, _, runs = built_book
    rerun = nbval_rerun([staging / f"{run.entry}.ipynb" for run in runs], cwd=staging)
    summary = next((line for line in rerun.stdout.splitlines() if line.startswith("nbval rerun:")), None)
    with capsys.disabled():
        print(f"\n{summary}")
    assert rerun.returncode == 0, rerun.stdout[-8000:]
    assert summary and f"nbval rerun: {len(runs)} notebooks" in summary and " 0 images" not in summary


def test_link_check_finds_missing_pages_files_and_anchors(tmp_path):
    from clipdecomp.book.links import broken_internal_links

    (tmp_path / "sub").mkdir()
    (tmp_path / "pic.png").write_bytes(b"png")
    (tmp_path / "index.html").write_text(
        '<a href="sub/page.html#there">ok</a><a href="sub/page.html#nowhere">bad anchor</a>'
        '<a href="#top" id="top">self</a><img src="pic.png" alt="a"><img src="gone.png" alt="b">'
        '<a href="https://example.org/x">outside, not followed</a><a href="../../etc/passwd">escape</a>'
    )
    (tmp_path / "sub" / "page.html").write_text(
        '<h1 id="there">x</h1><a href="../index.html">back</a><a href="missing.html">missing</a>'
    )
    broken = broken_internal_links(tmp_path)
    assert broken == [
        "index.html -> sub/page.html#nowhere (no element with id 'nowhere')",
        "index.html -> gone.png (no such file)",
        "index.html -> ../../etc/passwd (points outside the site)",
        "sub/page.html -> missing.html (no such file)",
    ]


def test_every_plot_cell_carries_alt_text():
    """Figures reach the site as <img> elements; their alt text comes from the cell's mystnb metadata."""
    for path in NOTEBOOKS:
        for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type == "code" and "plt.show()" in cell.source:
                alt = cell.metadata.get("mystnb", {}).get("image", {}).get("alt", "")
                assert len(alt) > 20, (
                    f"{path.name} cell {index} shows a figure without alt text (metadata mystnb.image.alt)"
                )


def test_repository_is_named_once_for_colab_links_and_the_site():
    import yaml
    from clipdecomp.book.chapters import REPOSITORY

    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["repository"]["url"] == f"https://github.com/{REPOSITORY}", (
        "_config.yml's repository url and clipdecomp.book.chapters.REPOSITORY must name the same repository"
    )


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if "benchmarks" not in p.name], ids=lambda p: p.name)
def test_every_chapter_has_the_reader_furniture(path: Path):
    """Title, one-line summary, objectives, time and GPU notes up front; summary and exercises with
    collapsed solutions at the end."""
    cells = nbformat.read(path, as_version=4).cells
    first, text = cells[0].source, "\n".join(c.source for c in cells if c.cell_type == "markdown")
    assert first.startswith("# "), f"{path.name}: the first cell must hold the chapter's title"
    for marker in ("**In one line:**", "Learning objectives", "Estimated time", "Needs a GPU?"):
        assert marker in first, f"{path.name}: the title cell lacks {marker!r}"
    assert text.index("## Summary") < text.index("## Exercises"), (
        f"{path.name}: end with a summary, then exercises"
    )
    assert ":class: dropdown" in text.split("## Exercises")[1], (
        f"{path.name}: exercise solutions must be collapsed"
    )


def test_paper_profile_reads_dataset_locations_and_fails_fast_without_them(tmp_path, monkeypatch):
    import papermill
    from clipdecomp.book.runner import CHAPTER_PARAMETERS, chapter_parameters, execute_notebooks

    for profile, chapters in CHAPTER_PARAMETERS.items():  # every override names a declared parameter
        for name, overrides in chapters.items():
            declared = papermill.inspect_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"))
            assert set(overrides) <= set(declared), (
                f"{profile}/{name}: {set(overrides) - set(declared)} not declared"
            )
    for name in ("CLIPDECOMP_IMAGENET_VAL", "CLIPDECOMP_WATERBIRDS", "CLIPDECOMP_IMAGENET_SEG"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(FileNotFoundError, match="CLIPDECOMP_IMAGENET_VAL is not set.*CLIPDECOMP_WATERBIRDS"):
        execute_notebooks("paper", staging=tmp_path / "src")
    assert not (tmp_path / "src").exists(), "nothing may run or be staged before the check"
    monkeypatch.setenv("CLIPDECOMP_IMAGENET_VAL", str(tmp_path / "val"))
    with pytest.raises(FileNotFoundError, match="val, which does not exist"):
        execute_notebooks("paper", only=["02_"], staging=tmp_path / "src")
    settings = chapter_parameters("paper", "notebooks/02_layer_ablations")
    assert settings["dataset"] == str(tmp_path / "val") and settings["model_spec"].startswith("ViT-L-14/")
    assert chapter_parameters("cpu", "notebooks/02_layer_ablations") == {"device": "cpu"}


def test_setup_cells_command_rewrites_only_the_setup_cell(tmp_path):
    import shutil

    from clipdecomp.book.chapters import write_setup_cells

    shutil.copy(NOTEBOOKS[0], tmp_path / NOTEBOOKS[0].name)
    shutil.copy(NOTEBOOKS[1], tmp_path / NOTEBOOKS[1].name)
    stale = nbformat.read(tmp_path / NOTEBOOKS[0].name, as_version=4)
    next(c for c in stale.cells if c.cell_type == "code").source = "# an old setup cell"
    nbformat.write(stale, tmp_path / NOTEBOOKS[0].name)
    assert write_setup_cells(tmp_path) == [NOTEBOOKS[0].name]
    fixed = nbformat.read(tmp_path / NOTEBOOKS[0].name, as_version=4)
    original = nbformat.read(NOTEBOOKS[0], as_version=4)
    assert [c.source for c in fixed.cells] == [c.source for c in original.cells]
    assert write_setup_cells(tmp_path) == []
