"""What every chapter shares: the standard setup cell, and its "Open in Colab" link."""

from __future__ import annotations

from pathlib import Path

import nbformat

from clipdecomp import __version__

from ..paths import repo_root

__all__ = ["REPOSITORY", "SETUP_CELL", "colab_url", "add_colab_link", "write_setup_cells"]

REPOSITORY = "clipdecomp/clipdecomp"
"""GitHub ``owner/name`` the book's Colab links and Colab installs point to (set once, here)."""

_CLONE = f"git clone -q --depth 1 -b v{__version__} https://github.com/{REPOSITORY}"

SETUP_CELL = f"""\
# Standard setup (the same in every chapter): on Colab, install this book's clipdecomp; seed; versions.
import sys

if "google.colab" in sys.modules:  # the clone in ./clipdecomp is also where the data is found
    !test -d clipdecomp || {_CLONE}
    %pip install --quiet ./clipdecomp
import clipdecomp
from clipdecomp.notebook import glue, pick_device, setup

setup(seed=0)"""


def colab_url(entry: str) -> str:
    """Colab link that opens the source notebook ``entry`` (e.g. ``notebooks/01_decomposition``)."""
    return f"https://colab.research.google.com/github/{REPOSITORY}/blob/v{__version__}/{entry}.ipynb"


def add_colab_link(notebook: nbformat.NotebookNode, entry: str) -> None:
    """Append an "Open in Colab" link to the notebook's title cell (a text link: no external image)."""
    title = next(cell for cell in notebook.cells if cell.cell_type == "markdown")
    title.source += f"\n\n[Open in Colab ↗]({colab_url(entry)})"


def write_setup_cells(folder: Path | None = None) -> list[str]:
    """Make the first code cell of every notebook in ``folder`` (default: the book's) :data:`SETUP_CELL`.

    Only that cell's source changes; returns the names of the notebooks that changed.
    """
    changed = []
    for path in sorted((folder or repo_root() / "notebooks").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        first = next((cell for cell in notebook.cells if cell.cell_type == "code"), None)
        if first is None:
            raise ValueError(f"{path} has no code cell to hold the setup cell.")
        if first.source != SETUP_CELL:
            first.source = SETUP_CELL
            nbformat.write(notebook, path)
            changed.append(path.name)
    return changed
