"""Where the repository and its data live: the one place that locates them.

The package is installed in editable mode from ``lib/``, so the repository is two folders above it.
On Colab the chapters' setup cell clones the book into the working folder (``./clipdecomp``) and
installs the package from there, so that clone is the repository. ``$CLIPDECOMP_DATA`` points the data
(the toy model, the text pools) anywhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["repo_root", "data_dir"]


def repo_root() -> Path:
    """The book's repository (``notebooks/``, ``bench/``, ``_toc.yml``, ``data/``): the one this package is
    installed from in editable mode, else a clone ``./clipdecomp`` in the working folder."""
    editable = Path(__file__).resolve().parents[2]
    for root in (editable, Path.cwd() / "clipdecomp"):
        if (root / "_toc.yml").is_file():
            return root
    return editable  # neither: files looked up there are reported missing by whoever needs them


def data_dir() -> Path:
    """The data folder: ``$CLIPDECOMP_DATA`` if set, else the repository's ``data/``."""
    root = os.environ.get("CLIPDECOMP_DATA")
    return Path(root) if root else repo_root() / "data"
