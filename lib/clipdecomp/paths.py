"""Where the repository and its data live: the one place that locates them.

The package is installed in editable mode from ``lib/``, so the repository is two folders above
it. ``$CLIPDECOMP_DATA`` points the data (the toy model, the text pools) elsewhere, e.g. on Colab
where only the package is installed.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["repo_root", "data_dir"]


def repo_root() -> Path:
    """The repository holding this (editable) package: ``notebooks/``, ``bench/``, ``_toc.yml`` live here."""
    return Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """The data folder: ``$CLIPDECOMP_DATA`` if set, else the repository's ``data/``."""
    root = os.environ.get("CLIPDECOMP_DATA")
    return Path(root) if root else repo_root() / "data"
